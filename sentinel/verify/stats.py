"""Error statistics between an export's outputs and the reference's (Polygraphy-style, and more)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sentinel import scores

_EPS = 1e-12


@dataclass(frozen=True)
class ErrorStats:
    """Per-element errors of one output over all samples."""

    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    min_atol: float   # smallest atol that passes at the policy's rtol (|a-b| <= atol + rtol·|b|)
    min_rtol: float   # smallest rtol that passes at the policy's atol
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return self.min_atol <= self.atol

    def as_dict(self) -> dict[str, float | bool]:
        d = {k: float(f"{getattr(self, k):.6g}") for k in
             ("max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel", "min_atol", "min_rtol", "atol", "rtol")}
        return {**d, "passed": self.passed}


def error_stats(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> ErrorStats:
    """Absolute and relative error statistics, and the minimum tolerances that would pass."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"output shape {got.shape} differs from the reference's {ref.shape}")
    diff = np.abs(got - ref)
    mag = np.abs(ref)
    rel = diff / np.maximum(mag, _EPS)
    min_atol = float(np.max(np.maximum(diff - rtol * mag, 0.0))) if diff.size else 0.0
    min_rtol = float(np.max(np.maximum(diff - atol, 0.0) / np.maximum(mag, _EPS))) if diff.size else 0.0
    return ErrorStats(
        max_abs=float(diff.max(initial=0.0)), mean_abs=float(diff.mean()) if diff.size else 0.0,
        p99_abs=float(np.percentile(diff, 99)) if diff.size else 0.0,
        max_rel=float(rel.max(initial=0.0)), mean_rel=float(rel.mean()) if rel.size else 0.0,
        p99_rel=float(np.percentile(rel, 99)) if rel.size else 0.0,
        min_atol=min_atol, min_rtol=min_rtol, atol=atol, rtol=rtol)


def topk_agreement(got_logits: np.ndarray, ref_logits: np.ndarray, k: int) -> float:
    """Fraction of samples whose reference top-1 class is among the export's top-k (k=1: equal argmax)."""
    if len(ref_logits) == 0:
        return float("nan")
    ref_top1 = ref_logits.argmax(1)
    k = min(k, got_logits.shape[1])
    topk = np.argpartition(-got_logits, k - 1, axis=1)[:, :k] if k > 1 else got_logits.argmax(1)[:, None]
    return float(np.mean(np.any(topk == ref_top1[:, None], axis=1)))


softmax = scores.softmax
