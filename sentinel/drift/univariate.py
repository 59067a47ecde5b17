"""Per-feature two-sample tests (KS or Cramér-von Mises) with a Bonferroni correction.

One reference matrix (N×F) is fitted once; each window (M×F) is tested feature by feature
and the detector's p-value is the Bonferroni-corrected minimum, `min(1, F·min_j p_j)`,
which bounds the family-wise false-alarm rate by alpha under any dependence between features
(Bonferroni; Failing Loudly, Rabanser et al. 2019, uses exactly this for BBSD).
"""

from __future__ import annotations

import enum
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from sentinel.drift.result import DetectorResult, abstain, decide


class Univariate(str, enum.Enum):
    """Which univariate two-sample test runs on each feature."""

    KS = "ks"     # Kolmogorov-Smirnov, scipy.stats.ks_2samp(method="auto"): exact below 10,000 samples
    CVM = "cvm"   # Cramér-von Mises, scipy.stats.cramervonmises_2samp(method="auto")


# Fewer samples than this and a detector abstains: with 9 or fewer window samples a KS test
# at the Bonferroni level of 10 classes cannot reject at all, and chi-square approximations fail.
MIN_SAMPLES = 10


def _keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 keys of values at float32 precision (−0.0 folded into +0.0)."""
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32) + np.float32(0.0))
    b = a.view(np.uint32)
    return np.where(b >> 31 == 1, ~b, b | np.uint32(0x80000000)).astype(np.uint64)


def reference_keys(reference: np.ndarray) -> np.ndarray:
    """F×N sorted keys of an N×F reference, for `ks_statistics` (computed once per reference)."""
    return np.sort(_keys(np.asarray(reference).T) << np.uint64(1), axis=1)


def ks_statistics(ref_keys: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Two-sided KS statistic D per column of an M×F window against `reference_keys(reference)`.

    Vectorized over columns, values compared at float32 precision (served outputs are float32):
    each value becomes an order-preserving integer key with its sample (reference 0, window 1)
    in the lowest bit; one sort merges both samples, cumulative counts give both ECDFs, and D is
    the largest |F_ref − F_win| taken at the last element of each run of equal values — scipy's
    ks_2samp statistic on the same values.
    """
    n = ref_keys.shape[1]
    m = window.shape[0]
    k = np.concatenate([ref_keys, (_keys(np.asarray(window).T) << np.uint64(1)) | np.uint64(1)], axis=1)
    k.sort(axis=1)
    # (F_ref − F_win)·n·m after each merged element = i·m − c·(n + m), with c the window values so
    # far (the low bit, read from the low 32-bit word); int32 when it cannot overflow (fewer passes).
    dt = np.int32 if (n + m) * max(n, m) < 2 ** 31 else np.int64
    low = k.view(np.uint32)[:, ::2] if sys.byteorder == "little" else (k & np.uint64(1))
    c: np.ndarray = np.cumsum(low & low.dtype.type(1), axis=1, dtype=dt)
    c *= -(n + m)
    c += np.arange(1, n + m + 1, dtype=dt) * m
    tie = (k[:, 1:] ^ k[:, :-1]) < np.uint64(2)      # the next element has the same value: not a run's end
    if tie.any():
        c[:, :-1][tie] = 0
    stat: np.ndarray = np.maximum(c.max(axis=1), -c.min(axis=1)) / float(n * m)
    return stat


@dataclass(frozen=True)
class FeatureShiftTest:
    """A fitted per-feature test: reference features in, `test(window)` gives a DetectorResult."""

    name: str
    reference: np.ndarray                 # N×F, finite
    features: tuple[str, ...]
    alpha: float = 0.05                   # alarm when the Bonferroni-corrected p-value is below this
    method: Univariate = Univariate.KS
    min_samples: int = MIN_SAMPLES
    _ref_keys: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ref = np.asarray(self.reference, dtype=np.float64)
        if ref.ndim != 2 or ref.shape[1] != len(self.features):
            raise ValueError(f"{self.name}: reference has shape {ref.shape}, expected N×{len(self.features)}")
        if not np.isfinite(ref).all():
            raise ValueError(f"{self.name}: reference contains NaN or inf")
        object.__setattr__(self, "reference", ref)
        object.__setattr__(self, "_ref_keys", reference_keys(ref))

    def test(self, window: np.ndarray) -> DetectorResult:
        """Test one window (M×F); rows with NaN/inf are dropped first."""
        win = np.asarray(window, dtype=np.float64)
        if win.ndim != 2 or win.shape[1] != len(self.features):
            raise ValueError(f"{self.name}: window has shape {win.shape}, expected M×{len(self.features)}")
        win = win[np.isfinite(win).all(axis=1)]
        n, m = len(self.reference), len(win)
        if min(n, m) < self.min_samples:
            return abstain(self.name, self.alpha, n, m,
                           f"needs at least {self.min_samples} reference and window samples, has {n} and {m}")
        k = len(self.features)
        if self.method is Univariate.KS:
            d = ks_statistics(self._ref_keys, win)
            j = int(np.argmax(d))
            dmax = float(d[j])
            # Same n and m for every feature, so the KS p-value falls as D grows: the smallest
            # p-value is that of the largest D, computed by scipy itself for that feature only.
            p = _ks_pvalue(self.reference[:, j], win[:, j])
            return decide(self.name, dmax, k * p, self.alpha, n, m, self.features[j])
        stats, ps = _cvm(self.reference, win)
        j = int(np.argmin(ps))
        return decide(self.name, float(stats[j]), k * float(ps[j]), self.alpha, n, m, self.features[j])


def _ks_pvalue(ref: np.ndarray, win: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    with warnings.catch_warnings():
        # scipy warns when the exact computation falls back to the asymptotic one; that is fine here.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ks_2samp(ref, win, method="auto").pvalue)


def _cvm(ref: np.ndarray, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import cramervonmises_2samp

    stats, ps = [], []
    for j in range(ref.shape[1]):
        r = cramervonmises_2samp(ref[:, j], win[:, j], method="auto")
        stats.append(r.statistic)
        ps.append(r.pvalue)
    return np.asarray(stats, float), np.asarray(ps, float)
