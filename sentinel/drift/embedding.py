"""Embedding drift: PCA fitted on golden embeddings, then KS per component or an MMD permutation test."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sentinel.drift.result import DetectorResult, abstain, decide
from sentinel.drift.univariate import MIN_SAMPLES


@dataclass(frozen=True)
class PCA:
    """Principal components of reference embeddings (numpy SVD); `transform` projects onto them."""

    mean: np.ndarray            # D
    components: np.ndarray      # k×D, orthonormal rows
    explained: np.ndarray       # k, fraction of variance per component

    @classmethod
    def fit(cls, x: np.ndarray, n_components: int = 8) -> PCA:
        """Fit on N×D finite embeddings; keeps at most min(n_components, N−1, D) components."""
        a = np.asarray(x, dtype=np.float64)
        if a.ndim != 2 or len(a) < 2:
            raise ValueError(f"PCA needs an N×D array with N ≥ 2, got shape {a.shape}")
        mean = a.mean(axis=0)
        c = a - mean
        # Eigen-decomposition of the smaller Gram matrix: same components as an SVD of c, and
        # much cheaper than LAPACK's SVD for the tall or wide matrices seen here.
        if c.shape[1] <= c.shape[0]:
            var, vecs = np.linalg.eigh(c.T @ c)
            var, vt = var[::-1], vecs[:, ::-1].T
        else:
            var, u = np.linalg.eigh(c @ c.T)
            var, u = var[::-1], u[:, ::-1]
            keep = var > 0
            vt = np.zeros((len(var), c.shape[1]))
            vt[keep] = (u[:, keep].T @ c) / np.sqrt(var[keep])[:, None]
        var = np.clip(var, 0.0, None)
        k = int(min(n_components, len(a) - 1, a.shape[1], int((var > var.sum() * 1e-12).sum())))
        return cls(mean, vt[:k].copy(), (var[:k] / var.sum()) if var.sum() > 0 else np.zeros(k))

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """N×D → N×k projections."""
        proj: np.ndarray = (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T
        return proj


@dataclass(frozen=True)
class MMDTest:
    """Maximum mean discrepancy with a Gaussian kernel and a permutation test (Gretton et al., JMLR 2012).

    Statistic: the biased MMD² estimate between reference and window. Bandwidth: the median
    pairwise distance of the pooled sample, which does not depend on which rows are labelled
    reference, so the permutation test stays exact. p-value: (1 + #{permuted MMD² ≥ observed})
    / (1 + permutations) (Phipson & Smyth 2010), never 0; its smallest value 1/(1+B) must be below
    the level it is compared with (alpha divided by the number of detectors under Bonferroni),
    hence B = 199 by default. Cost is bounded by testing at most `max_samples` rows of each side
    (a seeded random subsample): O((2·max_samples)²·B).
    """

    reference: np.ndarray                 # N×k (already reduced, e.g. PCA projections)
    alpha: float = 0.05                   # alarm when the permutation p-value is below this
    permutations: int = 199
    max_samples: int = 200
    min_samples: int = MIN_SAMPLES
    seed: int = 0
    name: str = "mmd"
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reference", np.asarray(self.reference, dtype=np.float64))
        object.__setattr__(self, "_rng", np.random.default_rng(self.seed))

    def test(self, window: np.ndarray) -> DetectorResult:
        """Permutation test of one window (M×k); rows with NaN/inf are dropped first."""
        win = np.asarray(window, dtype=np.float64)
        win = win[np.isfinite(win).all(axis=1)]
        n, m = len(self.reference), len(win)
        if min(n, m) < self.min_samples:
            return abstain(self.name, self.alpha, n, m,
                           f"needs at least {self.min_samples} reference and window samples, has {n} and {m}")
        rng = self._rng
        ref = self.reference
        if n > self.max_samples:
            ref = ref[rng.choice(n, self.max_samples, replace=False)]
        if m > self.max_samples:
            win = win[rng.choice(m, self.max_samples, replace=False)]
        stat, p = mmd_permutation(ref, win, self.permutations, rng)
        return decide(self.name, stat, p, self.alpha, n, m)


def mmd_permutation(x: np.ndarray, y: np.ndarray, permutations: int,
                    rng: np.random.Generator) -> tuple[float, float]:
    """Biased MMD² of x vs y with a median-heuristic Gaussian kernel, and its permutation p-value."""
    z = np.concatenate([x, y])
    nx, n = len(x), len(x) + len(y)
    sq = (z ** 2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    med = np.median(d2[np.triu_indices(n, 1)])
    k = np.exp(-d2 / (med if med > 0 else 1.0))
    # MMD² = vᵀKv with v = +1/nx on x rows, −1/ny on y rows; all permutations in one matmul.
    v = np.empty((n, permutations + 1))
    base = np.concatenate([np.full(nx, 1.0 / nx), np.full(n - nx, -1.0 / (n - nx))])
    v[:, 0] = base
    perms = np.empty((permutations, n), np.intp)
    for b in range(permutations):                 # one draw per permutation, in order: the same stream as ever
        perms[b] = rng.permutation(n)
    v[:, 1:] = base[perms.T]
    stats = np.einsum("ib,ib->b", v, k @ v)
    observed = float(stats[0])
    exceed = int((stats[1:] >= observed - 1e-12 * abs(observed)).sum())
    return observed, (1.0 + exceed) / (1.0 + permutations)
