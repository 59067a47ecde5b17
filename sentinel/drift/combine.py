"""The combined verdict: one p-value over all detectors with a controlled family-wise false-alarm rate."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence

import numpy as np

from sentinel.drift.result import DetectorResult, abstain, decide


class Combination(str, enum.Enum):
    """How detector p-values are combined into one verdict."""

    # p = min(1, K·min_k p_k) over the K detectors that did not abstain. The family-wise
    # false-alarm rate is at most alpha under any dependence between detectors (all of them
    # test the same window, so they are dependent); the price is conservatism.
    BONFERRONI = "bonferroni"
    # Cauchy combination (Liu & Xie, JASA 2020): T = mean_k tan((0.5 − p_k)π), p = 0.5 − arctan(T)/π.
    # Its size is approximately alpha under arbitrary dependence as alpha → 0, exact when the p-values are
    # identical or independent; at alpha = 0.05 it can be slightly liberal, and p-values near 1
    # (common after Bonferroni capping) dilute it. Measured, not assumed: see `sentinel drift eval`.
    CAUCHY = "cauchy"


def combine(results: Sequence[DetectorResult], alpha: float,
            method: Combination = Combination.BONFERRONI, name: str = "combined",
            weights: Mapping[str, float] | None = None) -> DetectorResult:
    """One result over the non-abstaining `results`; abstains when all of them abstain.

    `weights` (Bonferroni only) give a weighted Bonferroni test: detector k is tested at level
    alpha·w_k/Σw over the live detectors, i.e. p = min(1, min_k p_k·Σw/w_k). The family-wise
    false-alarm rate stays at most alpha under any dependence (Holm 1979; Benjamini & Hochberg
    1997 "multiple hypotheses testing with weights"); a larger weight buys one detector power.
    """
    live = [r for r in results if not r.abstained]
    n_ref = max((r.n_reference for r in results), default=0)
    n_win = max((r.n_window for r in results), default=0)
    if not live:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in results) or "no detectors configured"
        return abstain(name, alpha, n_ref, n_win, f"every detector abstained ({reasons})")
    ps = np.array([r.p_value for r in live], dtype=np.float64)
    best = live[int(np.argmin(ps))].name
    if method is Combination.BONFERRONI:
        w = np.array([float((weights or {}).get(r.name, 1.0)) for r in live])
        adj = ps * w.sum() / np.maximum(w, 1e-12)
        i = int(np.argmin(adj))
        return decide(name, float(ps[i]), min(1.0, float(adj[i])), alpha, n_ref, n_win, live[i].name)
    clipped = np.clip(ps, 1e-300, 1.0 - 1e-15)
    t = float(np.mean(np.tan((0.5 - clipped) * math.pi)))
    p = 0.5 - math.atan(t) / math.pi
    if t > 1e15:                       # far tail: p ≈ 1/(πT) avoids cancellation in 0.5 − atan(T)/π
        p = 1.0 / (math.pi * t)
    return decide(name, t, p, alpha, n_ref, n_win, best)
