"""Per-sample support checks and ATC verdicts: likely correct, likely wrong, or unknown.

ATC assumes the model stays calibrated, which fails outside the training support: a wrong
input scale or heavy blur makes a DenseNet confidently wrong. So a sample is `unknown` (not
trusted by ATC) when it violates the input contract, or when it is out of the golden support:
its k-nearest-neighbour distance (Sun et al., ICML 2022) in a standardised feature space — the
input signature, and the golden PCA of the reference embeddings when the shadow ran — exceeds
the golden set's own `OOD_QUANTILE` leave-one-out kNN distance. Otherwise ATC decides: score at
or above its threshold → `likely_correct`, else `likely_wrong`.

The accuracy lower bound counts unknown as wrong: likely_correct / all. It is reliable when the
share of unknown samples is at most `UNRELIABLE_SHARE` and the window is not diagnosed as a
preprocessing mismatch or an input-contract breach (then the model's confidence proves nothing,
even for samples that pass the support check: a flipped digit still looks like a digit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VERDICTS = ("likely_correct", "likely_wrong", "unknown")
LIKELY_CORRECT, LIKELY_WRONG, UNKNOWN = 0, 1, 2
OOD_QUANTILE = 0.998      # a golden sample is beyond this quantile of golden LOO kNN distances 0.2% of the time
OOD_K = 5
UNRELIABLE_SHARE = 0.10
MAX_REFERENCE = 2000      # reference rows kept for kNN (seeded subsample beyond)   # more unknown than this in a window and the estimate is flagged unreliable


@dataclass(frozen=True)
class KnnSupport:
    """kNN distance to a standardised reference, and the reference's own LOO quantile as threshold."""

    reference: np.ndarray        # N×F standardised
    center: np.ndarray
    scale: np.ndarray
    threshold: float
    k: int = OOD_K

    @classmethod
    def fit(cls, features: np.ndarray, k: int = OOD_K, quantile: float = OOD_QUANTILE,
            max_samples: int = MAX_REFERENCE, seed: int = 0) -> KnnSupport:
        f = np.asarray(features, np.float64)
        if len(f) > max_samples:       # bounded memory and time: distances are N×N at fit, M×N per batch
            f = f[np.sort(np.random.default_rng(seed).choice(len(f), max_samples, replace=False))]
        center = f.mean(axis=0)
        sd = f.std(axis=0)
        scale = np.where(sd > 1e-9 * (np.abs(center) + 1), sd, 1.0)
        z = (f - center) / scale
        k = int(min(k, len(z) - 1))
        d = _knn(z, z, k + 1)[:, -1]          # the nearest "neighbour" is the sample itself
        return cls(z, center, scale, float(np.quantile(d, quantile)), k)

    def score(self, features: np.ndarray) -> np.ndarray:
        """N: kNN distance divided by the threshold (> 1: out of support)."""
        f = np.nan_to_num(np.asarray(features, np.float64), nan=1e6, posinf=1e6, neginf=-1e6)
        if len(f) == 0:
            return np.zeros(0)
        return _knn((f - self.center) / self.scale, self.reference, self.k)[:, -1] / max(self.threshold, 1e-12)


def _knn(q: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """Sorted distances to the k nearest rows of `ref`, per row of `q` (N×k)."""
    d2 = (q ** 2).sum(axis=1)[:, None] + (ref ** 2).sum(axis=1)[None, :] - 2.0 * q @ ref.T
    d2 = np.maximum(d2, 0.0)
    part = np.partition(d2, k - 1, axis=1)[:, :k]
    dist: np.ndarray = np.sqrt(np.sort(part, axis=1))
    return dist


def verdicts(atc_scores: np.ndarray, threshold: float, unknown: np.ndarray | None) -> np.ndarray:
    """Per-sample verdict codes (LIKELY_CORRECT, LIKELY_WRONG, UNKNOWN)."""
    v = np.where(np.asarray(atc_scores) >= threshold, LIKELY_CORRECT, LIKELY_WRONG).astype(np.int8)
    if unknown is not None:
        v[np.asarray(unknown, bool)] = UNKNOWN
    return v


def verdict_counts(codes: np.ndarray) -> dict[str, int]:
    c = np.bincount(np.asarray(codes, np.int64), minlength=3)
    return {name: int(c[i]) for i, name in enumerate(VERDICTS)}


def lower_bound(codes: np.ndarray) -> tuple[float, float]:
    """(likely_correct / all, unknown share); NaN for an empty window."""
    codes = np.asarray(codes)
    if len(codes) == 0:
        return float("nan"), float("nan")
    return float(np.mean(codes == LIKELY_CORRECT)), float(np.mean(codes == UNKNOWN))
