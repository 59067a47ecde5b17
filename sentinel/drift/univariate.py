"""Per-feature two-sample tests (KS or Cramér-von Mises) with a Bonferroni correction.

One reference matrix (N×F) is fitted once; each window (M×F) is tested feature by feature
and the detector's p-value is the Bonferroni-corrected minimum, `min(1, F·min_j p_j)`,
which bounds the family-wise false-alarm rate by alpha under any dependence between features
(Bonferroni; Failing Loudly, Rabanser et al. 2019, uses exactly this for BBSD).
"""

from __future__ import annotations

import enum
import math
import threading
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

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


def _nonnegative_keys(reference: np.ndarray) -> np.ndarray | None:
    """F×N sorted uint32 keys of a non-negative N×F reference (None when any value is negative).

    A non-negative float32 (−0.0 folded into +0.0) has its sign bit clear, so its bit pattern
    read as an unsigned integer orders like the value and fits in 31 bits: shifted left once,
    the lowest bit is free for the sample (0 reference, 1 window). Softmax outputs, confidences
    and entropies are non-negative, so BBSD sorts 32-bit keys, half the bytes of the general path.
    """
    a = np.ascontiguousarray(np.asarray(reference, dtype=np.float32).T) + np.float32(0.0)
    if a.size and not a.min() >= 0:
        return None
    k = a.view(np.uint32)
    k <<= np.uint32(1)
    k.sort(axis=1)
    return k


def _window_keys32(bits: np.ndarray, out: np.ndarray) -> None:
    """Write the keys of an M×F' block of non-negative float32 values (as uint32 bits), transposed, into F'×M `out`.

    Shifting the bits left drops the sign bit, which among values ≥ 0 only −0.0 has: it becomes +0.0's key.
    """
    np.left_shift(bits.T, np.uint32(1), out=out)
    out |= np.uint32(1)


# Merged values per block of features (512 kB of 32-bit keys): a block's keys, counts and ECDF
# gaps stay in the CPU cache between the passes over them.
CHUNK = 1 << 17


class _Scratch(threading.local):
    """Per-thread work buffers for `_gaps`, kept between windows.

    Fresh arrays of a megabyte or more come from the kernel page by page on every window, which
    costs as much as the arithmetic. Bounded: one set per thread, as large as the largest block
    seen (about CHUNK merged values, or one feature's n + m when that is more).
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, int], dtype: type | np.dtype[Any]) -> np.ndarray:
        size = shape[0] * shape[1]
        itemsize = np.dtype(dtype).itemsize
        buf = self.buffers.get((name, itemsize))
        if buf is None or buf.size < size:
            buf = self.buffers[(name, itemsize)] = np.empty(size, np.dtype(f"u{itemsize}"))
        return buf[:size].view(dtype).reshape(shape)


_SCRATCH = _Scratch()


def _gaps(k: np.ndarray, n: int, m: int) -> np.ndarray:
    """Largest |F_ref − F_win|·n·m per row of F×(n+m) merged sorted keys (sample in the lowest bit).

    After the i-th merged element (i from 1) with c window values among them, (F_ref − F_win)·n·m
    = i·m − c·(n + m). Only the last element of each run of equal values is a point of both ECDFs,
    so in rows with equal values the others are zeroed before the extremes are taken (scipy's
    ks_2samp statistic).
    """
    dt = np.int32 if (n + m) * max(n, m) < 2 ** 31 else np.int64
    low = _SCRATCH.get("low", k.shape, k.dtype)
    np.bitwise_and(k, k.dtype.type(1), out=low)
    c: np.ndarray = np.cumsum(low, axis=1, dtype=dt, out=_SCRATCH.get("c", k.shape, dt))
    c *= -(n + m)
    c += np.arange(1, n + m + 1, dtype=dt) * m
    x = np.bitwise_xor(k[:, 1:], k[:, :-1], out=low[:, :-1])    # < 2: the next element has the same value
    if x.shape[1]:
        rows = np.flatnonzero(x.min(axis=1) < 2)
        if len(rows):
            c[rows, :-1] *= x[rows] > 1
    g: np.ndarray = np.maximum(c.max(axis=1), -c.min(axis=1))
    return g


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
    stat: np.ndarray = _gaps(k, n, m) / float(n * m)
    return stat


@lru_cache(maxsize=4096)
def _ks_pvalue_lattice(n: int, m: int, h: int) -> float:
    """scipy's two-sided ks_2samp p-value for samples of n and m values whose statistic is h/lcm(n, m).

    The null distribution of D depends on n, m and D only (exact below scipy's 10,000 samples,
    where D is first rounded to the 1/lcm(n, m) lattice; Smirnov's asymptotic form above), so
    scipy is asked once per (n, m, h), on two samples built to have that statistic: a reference
    values at 0 and n − a at 1, b window values at 0 and m − b at 1, with a·m − b·n = h·gcd(n, m).
    Bounded: windows of one size have at most lcm(n, m) distinct statistics.
    """
    from scipy.stats import ks_2samp

    a, b = _counts_for(n, m, h * math.gcd(n, m))
    ref = np.concatenate([np.zeros(a), np.ones(n - a)])
    win = np.concatenate([np.zeros(b), np.ones(m - b)])
    with warnings.catch_warnings():
        # scipy warns when the exact computation falls back to the asymptotic one; that is fine here.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ks_2samp(ref, win, method="auto").pvalue)


def _counts_for(n: int, m: int, c: int) -> tuple[int, int]:
    """Counts 0 ≤ a ≤ n, 0 ≤ b ≤ m with a·m − b·n = c (c a multiple of gcd(n, m), |c| ≤ n·m)."""
    g = math.gcd(n, m)
    ng, mg, cg = n // g, m // g, c // g
    # a·mg ≡ cg (mod ng); the smallest such a ≥ 0 gives b = (a·m − c)/n, then shift along the solution line
    a = (cg * pow(mg, -1, ng)) % ng if ng > 1 else 0
    b = (a * m - c) // n
    if b < 0:
        t = -(b // mg)                      # the fewest steps that make b non-negative
        a, b = a + t * ng, b + t * mg
    if a > n or b > m:
        raise ValueError(f"no ECDF gap {c}/{n * m} for samples of {n} and {m}")
    return a, b


@dataclass(frozen=True)
class FeatureShiftTest:
    """A fitted per-feature test: reference features in, `test(window)` gives a DetectorResult."""

    name: str
    reference: np.ndarray                 # N×F, finite
    features: tuple[str, ...]
    alpha: float = 0.05                   # alarm when the Bonferroni-corrected p-value is below this
    method: Univariate = Univariate.KS
    min_samples: int = MIN_SAMPLES
    _ref32: np.ndarray | None = field(init=False, repr=False, compare=False)      # uint32 keys, non-negative
    _ref64: np.ndarray | None = field(init=False, repr=False, compare=False)      # uint64 keys, made when needed

    def __post_init__(self) -> None:
        ref = np.asarray(self.reference, dtype=np.float64)
        if ref.ndim != 2 or ref.shape[1] != len(self.features):
            raise ValueError(f"{self.name}: reference has shape {ref.shape}, expected N×{len(self.features)}")
        if not np.isfinite(ref).all():
            raise ValueError(f"{self.name}: reference contains NaN or inf")
        object.__setattr__(self, "reference", ref)
        # The reference side never changes: its keys are sorted once here, not per window.
        object.__setattr__(self, "_ref32", _nonnegative_keys(ref) if self.method is Univariate.KS else None)
        object.__setattr__(self, "_ref64", None)

    def gaps(self, window: np.ndarray) -> np.ndarray:
        """max |F_ref − F_win|·n·m per feature (integers) of a finite M×F window; D = gaps / (n·m)."""
        n, m, f = len(self.reference), len(window), len(self.features)
        out = np.empty(f, np.int64)
        # Features in blocks of about CHUNK merged values: each block's keys and counts stay in cache
        # from the sort to the extremes (one 1,000-class window at once is 24 MB of them).
        step = max(1, CHUNK // (n + m))
        if self._ref32 is not None:
            w = np.asarray(window, dtype=np.float32)
            if not w.size or w.min() >= 0:
                bits = w.view(np.uint32)
                for j in range(0, f, step):
                    e = min(f, j + step)
                    k = _SCRATCH.get("keys", (e - j, n + m), np.uint32)
                    k[:, :n] = self._ref32[j:e]
                    _window_keys32(bits[:, j:e], k[:, n:])
                    k.sort(axis=1)
                    out[j:e] = _gaps(k, n, m)
                return out
        if self._ref64 is None:
            object.__setattr__(self, "_ref64", reference_keys(self.reference))
        ref64 = self._ref64
        assert ref64 is not None
        for j in range(0, f, step):
            e = min(f, j + step)
            k = np.concatenate([ref64[j:e], (_keys(np.asarray(window)[:, j:e].T) << np.uint64(1)) | np.uint64(1)],
                               axis=1)
            k.sort(axis=1)
            out[j:e] = _gaps(k, n, m)
        return out

    def test(self, window: np.ndarray) -> DetectorResult:
        """Test one window (M×F); rows with NaN/inf are dropped first."""
        win = np.asarray(window)
        if win.dtype not in (np.float32, np.float64):
            win = win.astype(np.float64)   # float32 stays float32: values are compared at float32 anyway
        if win.ndim != 2 or win.shape[1] != len(self.features):
            raise ValueError(f"{self.name}: window has shape {win.shape}, expected M×{len(self.features)}")
        finite = np.isfinite(win).all(axis=1)
        if not finite.all():
            win = win[finite]
        n, m = len(self.reference), len(win)
        if min(n, m) < self.min_samples:
            return abstain(self.name, self.alpha, n, m,
                           f"needs at least {self.min_samples} reference and window samples, has {n} and {m}")
        k = len(self.features)
        if self.method is Univariate.KS:
            g = self.gaps(win)
            j = int(np.argmax(g))
            # Same n and m for every feature, so the KS p-value falls as D grows: the smallest
            # p-value is that of the largest D, scipy's for that D (cached per n, m and D).
            p = _ks_pvalue_lattice(n, m, int(g[j]) // math.gcd(n, m))
            return decide(self.name, int(g[j]) / (n * m), k * p, self.alpha, n, m, self.features[j])
        stats, ps = _cvm(self.reference, win.astype(np.float64))
        j = int(np.argmin(ps))
        return decide(self.name, float(stats[j]), k * float(ps[j]), self.alpha, n, m, self.features[j])


def _cvm(ref: np.ndarray, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import cramervonmises_2samp

    stats, ps = [], []
    for j in range(ref.shape[1]):
        r = cramervonmises_2samp(ref[:, j], win[:, j], method="auto")
        stats.append(r.statistic)
        ps.append(r.pvalue)
    return np.asarray(stats, float), np.asarray(ps, float)
