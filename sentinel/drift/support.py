"""Per-sample support checks and ATC verdicts: likely correct, likely wrong, or unknown.

ATC assumes the model stays calibrated, which fails outside the training support: a wrong
input scale or heavy blur makes a DenseNet confidently wrong. So a sample is `unknown` (not
trusted by ATC) when it violates the input contract, or when it is out of the golden support:
its k-nearest-neighbour distance (Sun et al., ICML 2022) in a standardised feature space — the
input signature, and the golden PCA of the reference embeddings when the shadow ran — exceeds
the golden set's own `OOD_QUANTILE` leave-one-out kNN distance; or when it looks like a transformed
golden sample (`TransformLike`: a digit rotated by 180° stays in the support, and the model is
confidently wrong on it). Otherwise ATC decides: score at
or above its threshold → `likely_correct`, else `likely_wrong`.

The accuracy lower bound counts unknown as wrong: likely_correct / all. It is reliable when the
share of unknown samples is at most `UNRELIABLE_SHARE` and the window is not diagnosed as a
preprocessing mismatch or an input-contract breach (then the model's confidence proves nothing,
even for samples that pass the support check: a flipped digit still looks like a digit).

A window can also leave the support as a population while each of its samples passes: a dead
row of pixels or noise moves every sample's kNN distance up, but not past the per-sample
threshold, and the model can be confidently wrong on them. `outside_share` bounds, from below,
the share of the window that does not follow the golden distribution of kNN distances (mixture
proportion estimation, Blanchard, Lee & Scott, JMLR 2010 / Storey-like): if a window is the
mixture (1 − s)·F0 + s·F1 of golden-like samples (distance CDF F0, the golden leave-one-out
distances) and anything else, its CDF G satisfies G(t) ≥ (1 − s)·F0(t) for every t, so
s ≥ 1 − G(t)/F0(t); with the empirical CDFs and a two-sample DKW margin
ε = sqrt(ln(1/δ)/2 · (1/M + 1/N)) on F0 − G, s ≥ max_t (F̂0(t) − Ĝ(t) − ε)/F̂0(t) holds with
probability about 1 − δ. The suite counts that share as unknown in the window's lower bound and
its unknown share (so the estimate is flagged unreliable beyond `UNRELIABLE_SHARE`); the
per-sample verdict counters are unchanged.

The support checks judge inputs; they cannot see answers that changed for inputs like golden's (a
label map off by one: every answer confident and wrong, every input golden-like). `AnswerCheck`
compares each served class with the plurality class of its input's golden neighbours (in the
signature space, and in the shadow's embedding space when the window has it) against golden's own
leave-one-out agreement per class; with significantly more disagreement than that, the disagreeing
answers are unknown to the bound, and a lower confidence bound on the share of answers unlike
golden's discounts it as `outside_share` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VERDICTS = ("likely_correct", "likely_wrong", "unknown")
LIKELY_CORRECT, LIKELY_WRONG, UNKNOWN = 0, 1, 2
OOD_QUANTILE = 0.998      # a golden sample is beyond this quantile of golden LOO kNN distances 0.2% of the time
OOD_K = 5
UNRELIABLE_SHARE = 0.10   # more unknown than this in a window and the estimate is flagged unreliable
MAX_REFERENCE = 2000      # reference rows kept for kNN (seeded subsample beyond)
SMALL_GOLDEN = 300        # fewer golden samples than this: the support thresholds (extreme order statistics
                          # of the golden set's own scores) also flag clean samples, a few % per window
                          # (150 toy RGB images: 3-8% outside the kNN support, 2-11% transform-like)
OUTSIDE_DELTA = 0.05      # error probability of the `outside_share` lower confidence bound
MIN_OUTSIDE_SAMPLES = 20  # fewer window scores than this: no population bound
TRANSFORM_LIKE_FPR = 0.01  # share of golden samples (leave-one-out) `TransformLike` may flag, at most
FIT_BLOCK = 1 << 21        # distances computed at once when fitting `TransformLike` (16 MiB)
TRANSFORM_LIKE_RATIO = 0.8  # ... and a flagged sample is at least this much nearer T(golden) than golden
CORROBORATE_P = 0.01       # a mixture's named transform with fewer rows flagged for it than this binomial tail: refuted
                           # (a correct name is withdrawn, to covariate_shift, in about this share of windows)
TRANSFORM_LIKE_MARGIN = 0.95  # ... and nearer by this factor than the golden samples' quantile: with ~300
                              # golden rows that quantile is their smallest ratio, which a new clean sample
                              # undercuts more often than the nominal rate (1.2% of clean digits at 1.0, 0.6% here)


@dataclass(frozen=True)
class KnnSupport:
    """kNN distance to a standardised reference, and the reference's own LOO quantile as threshold."""

    reference: np.ndarray        # N×F standardised
    center: np.ndarray
    scale: np.ndarray
    threshold: float
    k: int = OOD_K
    loo: np.ndarray | None = None  # leave-one-out scores of the reference (its own distance distribution)
    loo_classes: np.ndarray | None = None  # the reference rows' predicted classes, aligned with `loo`

    @classmethod
    def fit(cls, features: np.ndarray, k: int = OOD_K, quantile: float = OOD_QUANTILE,
            max_samples: int = MAX_REFERENCE, seed: int = 0, classes: np.ndarray | None = None) -> KnnSupport:
        """`classes` (the reference rows' predicted classes) let `outside_share` compare a window with
        the reference reweighted to the window's class shares (a pure prior shift is not "outside")."""
        f = np.asarray(features, np.float64)
        cl = None if classes is None or len(classes) != len(f) else np.asarray(classes, np.int64)
        if len(f) > max_samples:       # bounded memory and time: distances are N×N at fit, M×N per batch
            keep = np.sort(np.random.default_rng(seed).choice(len(f), max_samples, replace=False))
            f = f[keep]
            cl = None if cl is None else cl[keep]
        center = f.mean(axis=0)
        sd = f.std(axis=0)
        scale = np.where(sd > 1e-9 * (np.abs(center) + 1), sd, 1.0)
        z = (f - center) / scale
        k = int(min(k, len(z) - 1))
        d = _knn(z, z, k + 1)[:, -1]          # the nearest "neighbour" is the sample itself
        thr = float(np.quantile(d, quantile))
        return cls(z, center, scale, thr, k, d / max(thr, 1e-12), cl)

    def outside_share(self, features: np.ndarray, predicted: np.ndarray | None = None,
                      delta: float = OUTSIDE_DELTA, scores: np.ndarray | None = None) -> float | None:
        """Lower confidence bound on the share of these rows not distributed like the reference
        (module docstring); None with fewer than MIN_OUTSIDE_SAMPLES rows or no LOO scores. `scores`: the
        rows' `score`, when already computed.

        With the window's `predicted` classes (and the reference's), each reference score is weighted
        by q_c/p_c (window over reference share of its class), as a label shift would reweight it.
        """
        if self.loo is None or len(features) < MIN_OUTSIDE_SAMPLES or len(self.loo) < MIN_OUTSIDE_SAMPLES:
            return None
        weights = None
        if predicted is not None and self.loo_classes is not None and len(predicted):
            k = int(max(self.loo_classes.max(), np.max(predicted))) + 1
            q = np.bincount(np.asarray(predicted, np.int64), minlength=k) / len(predicted)
            p = np.bincount(self.loo_classes, minlength=k) / len(self.loo_classes)
            if q[p > 0].sum() >= 0.5:            # most of the window's classes are in the reference
                w = np.where(p > 0, q / np.maximum(p, 1e-12), 0.0)[self.loo_classes]
                weights = w if w.sum() > 0 else None
        return outside_share(self.score(features) if scores is None else scores, self.loo, delta, weights)

    def score(self, features: np.ndarray) -> np.ndarray:
        """N: kNN distance divided by the threshold (> 1: out of support)."""
        f = np.nan_to_num(np.asarray(features, np.float64), nan=1e6, posinf=1e6, neginf=-1e6)
        if len(f) == 0:
            return np.zeros(0)
        return _knn((f - self.center) / self.scale, self.reference, self.k)[:, -1] / max(self.threshold, 1e-12)


def outside_share(window_scores: np.ndarray, reference_scores: np.ndarray, delta: float = OUTSIDE_DELTA,
                  reference_weights: np.ndarray | None = None) -> float:
    """max(0, max_t (F̂0(t) − Ĝ(t) − ε)/F̂0(t)): a lower confidence bound on the share of the window
    that is not drawn from the reference's score distribution (larger scores = farther out).

    `reference_weights` make F̂0 a weighted ECDF; its n in ε is then Kish's effective size."""
    w = np.sort(np.asarray(window_scores, np.float64))
    order = np.argsort(np.asarray(reference_scores, np.float64), kind="stable")
    r = np.asarray(reference_scores, np.float64)[order]
    rw = np.ones(len(r)) if reference_weights is None else np.asarray(reference_weights, np.float64)[order]
    m = len(w)
    if m == 0 or len(r) == 0 or rw.sum() <= 0:
        return 0.0
    n = float(rw.sum() ** 2 / np.sum(rw ** 2))
    eps = float(np.sqrt(np.log(1.0 / delta) / 2.0 * (1.0 / m + 1.0 / n)))
    t = np.concatenate([w, r])
    cum = np.concatenate([[0.0], np.cumsum(rw)]) / rw.sum()
    f0 = cum[np.searchsorted(r, t, side="right")]
    g = np.searchsorted(w, t, side="right") / m
    ok = f0 > 0
    if not ok.any():
        return 0.0
    return float(np.clip(np.max((f0[ok] - g[ok] - eps) / f0[ok]), 0.0, 1.0))


@dataclass(frozen=True)
class TransformLike:
    """Per sample: does it look more like a transformed golden sample than like a golden one?

    A rotated or flipped digit can stay inside the golden support (its kNN distance passes) while
    the model is confidently wrong on it: ATC then counts it as correct. For each parameter-free
    candidate transform T of the diagnosis (`diagnosis._candidates`), the ratio
    r_T = d_k(sample, T(golden)) / d_k(sample, golden) of k-th nearest-neighbour distances in the
    golden-standardised signature space is small for such a sample. A sample is flagged when, for
    some T, r_T < min(TRANSFORM_LIKE_RATIO, t_T): clearly nearer T(golden) than golden (a sample about
    as near both, or far from both, is left to the support check), and below what golden samples
    themselves reach (t_T: TRANSFORM_LIKE_MARGIN × the TRANSFORM_LIKE_FPR / #candidates quantile of
    their leave-one-out ratios, the transformed copy of the sample itself left out too), so about
    TRANSFORM_LIKE_FPR of clean samples at most are flagged. A symmetric sample (a 0 rotated by 180°) is as near
    golden as T(golden) and is not flagged, as the model reads it right.
    """

    golden: np.ndarray               # N×F standardised golden signatures
    transformed: np.ndarray          # T×N×F standardised signatures of T(golden), per candidate
    names: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    thresholds: np.ndarray           # T: min(TRANSFORM_LIKE_RATIO, MARGIN × golden LOO quantile)
    k: int = OOD_K
    flat: np.ndarray | None = None   # (T·N)×F `transformed`, and its squared row norms (per-batch cost)
    flat_sq: np.ndarray | None = None
    hit_rates: np.ndarray | None = None  # T: share of T(golden)'s own rows flagged for T (leave-one-out)

    @classmethod
    def fit(cls, golden: np.ndarray, transformed: dict[str, np.ndarray], k: int = OOD_K,
            fpr: float = TRANSFORM_LIKE_FPR) -> TransformLike | None:
        """None without candidates or with too few golden rows."""
        g = np.asarray(golden, np.float64)
        names = tuple(n for n, t in transformed.items() if np.shape(t) == g.shape and np.isfinite(t).all())
        if not names or len(g) <= k + 1:
            return None
        center = g.mean(axis=0)
        sd = g.std(axis=0)
        scale = np.where(sd > 1e-9 * (np.abs(center) + 1), sd, 1.0)
        z = (g - center) / scale
        zt = np.stack([(np.asarray(transformed[n], np.float64) - center) / scale for n in names])
        d0 = _knn(z, z, k + 1)[:, -1]                      # the nearest is the sample itself
        n, t = len(z), len(names)
        flat = np.ascontiguousarray(zt.reshape(-1, zt.shape[2]))
        sq = (flat ** 2).sum(axis=1)
        dk = np.empty((n, t))
        step = max(1, FIT_BLOCK // max(t * n, 1))
        for a in range(0, n, step):                         # blocks of rows: bounded memory at fit
            rows = np.arange(a, min(n, a + step))
            d2 = _sq_dist(z[rows], flat, sq).reshape(len(rows), t, n)
            d2[np.arange(len(rows)), :, rows] = np.inf       # T(the sample itself) left out
            dk[rows] = np.sqrt(np.partition(d2, k - 1, axis=2)[:, :, k - 1])
        ratios = dk / np.maximum(d0, 1e-12)[:, None]
        thr = np.minimum(TRANSFORM_LIKE_RATIO, TRANSFORM_LIKE_MARGIN * np.quantile(ratios, fpr / t, axis=0))
        # Per candidate, the share of its own transformed golden rows the rule flags (T(g_i) against
        # golden without g_i and T(golden) without T(g_i), as a new transformed sample would be): a
        # rotated 0 or 8 is as near golden as T(golden) and is not flagged, so a rotate_180 client
        # shows in fewer flags than it has samples, a binarized one in nearly all.
        z_sq = (z ** 2).sum(axis=1)
        hits = np.zeros(t)
        for j in range(t):
            own = zt[j]
            d2g = _sq_dist(own, z, z_sq)
            np.fill_diagonal(d2g, np.inf)
            d2t = _sq_dist(own, own, sq[j * n:(j + 1) * n])
            np.fill_diagonal(d2t, np.inf)
            kg = np.sqrt(np.partition(d2g, k - 1, axis=1)[:, k - 1])
            kt = np.sqrt(np.partition(d2t, k - 1, axis=1)[:, k - 1])
            hits[j] = float(np.mean(kt < thr[j] * kg))
        return cls(z, zt, names, center, scale, thr, k, flat, sq, hits)

    def flags(self, features: np.ndarray) -> np.ndarray:
        """N bool: the row looks like a transformed golden sample (non-finite rows: False)."""
        return np.asarray(self.candidate_flags(features).any(axis=1), dtype=bool)

    def candidate_flags(self, features: np.ndarray) -> np.ndarray:
        """N×T bool: the row looks like T(golden) for each candidate T (non-finite rows: False)."""
        f = np.asarray(features, np.float64)
        t = len(self.names)
        out = np.zeros((len(f), t), bool)
        ok = np.isfinite(f).all(axis=1) if len(f) else np.zeros(0, bool)
        if not ok.any():
            return out
        z = (f[ok] - self.center) / self.scale
        d0 = np.maximum(_knn(z, self.golden, self.k)[:, -1], 1e-12)
        t, n, _ = self.transformed.shape
        flat = self.transformed.reshape(t * n, -1) if self.flat is None else self.flat
        # one product against every candidate's rows; the k-th nearest of T(golden) lies within
        # threshold·d0 exactly when at least k of its rows do (a count: cheaper than a partition)
        d2 = _sq_dist(z, flat, self.flat_sq).reshape(len(z), t, n)
        radius2 = (self.thresholds[None, :] * d0[:, None]) ** 2
        out[ok] = (d2 < radius2[:, :, None]).sum(axis=2) >= self.k
        return out

    def corroborates(self, name: str, share: float, features: np.ndarray, p_min: float = CORROBORATE_P
                     ) -> tuple[bool, int, float]:
        """Do the rows one by one bear out that a share `share` of them is T(golden) for the candidate
        `name` (its variants `name#2`, ...)? (passes, rows flagged for it, rows expected).

        A mixture fitted to a window's mean signature can credit a transform no sample resembles
        (half a window translated by a pixel has means a quarter-flipped window also has). If about
        share·n rows are T(golden), about share·n·h_T of them are flagged for T (h_T: `hit_rates`);
        far fewer (binomial lower tail below `p_min` for every variant) refutes it. A candidate
        this check has no rate for passes."""
        keys = [j for j, nm in enumerate(self.names) if nm.split("#")[0] == name]
        f = np.asarray(features, np.float64)
        if not keys or self.hit_rates is None or len(f) == 0:
            return True, 0, 0.0
        from scipy.stats import binom

        m = int(round(float(share) * int(np.isfinite(f).all(axis=1).sum())))
        got = self.candidate_flags(f)[:, keys].sum(axis=0)
        passes, flagged, expected = False, 0, 0.0
        for j, x in zip(keys, got, strict=True):
            p = min(float(self.hit_rates[j]), 1.0)
            passes |= m == 0 or p <= 0 or float(binom.cdf(int(x), m, p)) >= p_min
            if int(x) >= flagged:
                flagged, expected = int(x), m * p
        return passes, flagged, expected


def _sq_dist(q: np.ndarray, ref: np.ndarray, ref_sq: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances, len(q)×len(ref) (`ref_sq`: the rows' squared norms, when known)."""
    rs = (ref ** 2).sum(axis=1) if ref_sq is None else ref_sq
    d2: np.ndarray = np.maximum((q ** 2).sum(axis=1)[:, None] + rs[None, :] - 2.0 * (q @ ref.T), 0.0)
    return d2


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


ANSWER_K = 5               # golden neighbours whose (predicted) classes vote on a sample's class
ANSWER_P = 0.01            # answers disagreeing with their inputs' golden neighbourhood beyond this p-value: inconsistent
ANSWER_DELTA = 0.05        # error probability of the inconsistent share's lower confidence bound
MIN_ANSWER_SAMPLES = 10    # fewer aligned rows than this: no check
_Z_ANSWER_DELTA = 1.6448536269514722   # the standard normal's upper ANSWER_DELTA quantile


@dataclass(frozen=True)
class AnswerCheck:
    """Do a window's served classes agree with what the golden set says about inputs like theirs?

    Each row's served class is compared with the plurality class of its ANSWER_K nearest golden
    neighbours (golden's own predicted classes). Golden rows agree with their neighbours (leave-one-out)
    at rate a_c per class c; a window whose answers come from the same model as golden's, for inputs
    like golden's, disagrees at about Σ_i (1 − a_{ŷ_i}) rows, whatever its class mix (a label shift
    only reweights the classes). Many more disagreements mean the answers changed for the inputs: another
    model, a label map off by one, a different serving path (or inputs that moved, which other checks see).
    """

    space: str                  # "signature" or "embedding"
    n: int                      # aligned rows checked
    disagree: np.ndarray        # n bool: the served class differs from the neighbourhood's plurality class
    observed: float             # disagreeing share
    expected: float             # the share golden's own agreement predicts for these classes
    p_value: float              # one-sided: no more disagreement than golden's (normal approximation)
    share: float                # lower confidence bound (ANSWER_DELTA) on the share of answers unlike golden's

    @property
    def inconsistent(self) -> bool:
        return bool(self.p_value < ANSWER_P)


@dataclass(frozen=True)
class ClassVote:
    """Golden rows (standardised) and their predicted classes, for the kNN class vote of `AnswerCheck`."""

    reference: np.ndarray
    classes: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    agree: np.ndarray           # K: golden rows of each class agreeing with their LOO neighbourhood
    count: np.ndarray           # K: golden rows of each class
    space: str = "signature"
    k: int = ANSWER_K

    @classmethod
    def fit(cls, features: np.ndarray, classes: np.ndarray, space: str = "signature", k: int = ANSWER_K,
            max_samples: int = MAX_REFERENCE, seed: int = 0) -> ClassVote | None:
        """None with too few rows (fewer than 2k + 2) or non-finite features."""
        f = np.asarray(features, np.float64)
        cl = np.asarray(classes, np.int64)
        if len(f) != len(cl) or len(f) < 2 * k + 2 or not np.isfinite(f).all():
            return None
        if len(f) > max_samples:
            keep = np.sort(np.random.default_rng(seed).choice(len(f), max_samples, replace=False))
            f, cl = f[keep], cl[keep]
        center = f.mean(axis=0)
        sd = f.std(axis=0)
        scale = np.where(sd > 1e-9 * (np.abs(center) + 1), sd, 1.0)
        z = (f - center) / scale
        d2 = _sq_dist(z, z)
        np.fill_diagonal(d2, np.inf)                          # leave-one-out
        ok = _plurality(d2, cl, k) == cl
        kk = int(cl.max()) + 1
        return cls(z, cl, center, scale, np.bincount(cl[ok], minlength=kk).astype(np.float64),
                   np.bincount(cl, minlength=kk).astype(np.float64), space, k)

    def votes(self, features: np.ndarray) -> np.ndarray:
        """Plurality class of each row's k nearest golden rows (ties: the nearer neighbours' class)."""
        z = (np.asarray(features, np.float64) - self.center) / self.scale
        return _plurality(_sq_dist(z, self.reference), self.classes, self.k)

    def check(self, features: np.ndarray, served: np.ndarray) -> AnswerCheck | None:
        """The window's `AnswerCheck` (rows of `features` aligned with the `served` classes; rows with a
        non-finite feature are left out); None with fewer than MIN_ANSWER_SAMPLES usable rows."""
        import math

        f = np.asarray(features, np.float64)
        y = np.asarray(served, np.int64)
        ok = np.isfinite(f).all(axis=1) & (y >= 0)
        if ok.sum() < MIN_ANSWER_SAMPLES:
            return None
        f, y = f[ok], y[ok]
        kk = max(len(self.count), int(y.max()) + 1)
        agree = np.pad(self.agree, (0, kk - len(self.agree)))
        count = np.pad(self.count, (0, kk - len(self.count)))
        # golden's disagreement rate per class: the mean and variance of its Jeffreys posterior,
        # Beta(misses + 1/2, agreements + 1/2). A class golden's 30 rows never missed on is not a rate
        # of 0: with 30 rows a rate of a few % is as likely (a window of that class alone leans on it)
        miss = count - agree
        e = (miss + 0.5) / (count + 1.0)
        var_e = e * (1 - e) / (count + 2.0)
        dis = self.votes(f) != y
        n = len(y)
        n_c = np.bincount(y, minlength=kk).astype(np.float64)
        mu = float(np.sum(n_c * e))
        # binomial variance of the window's disagreements plus that of golden's per-class rates
        var = float(np.sum(n_c * e * (1 - e)) + np.sum(n_c ** 2 * var_e))
        d = float(dis.sum())
        sd = max(np.sqrt(var), 1e-9)
        p = 0.5 * math.erfc((d - 0.5 - mu) / sd / math.sqrt(2.0))    # normal upper tail, continuity-corrected
        margin = _Z_ANSWER_DELTA * sd
        share = float(np.clip((d - mu - margin) / max(n - mu, 1e-9), 0.0, 1.0))
        full = np.zeros(len(ok), bool)
        full[np.flatnonzero(ok)] = dis
        return AnswerCheck(self.space, n, full, d / n, mu / n, p, share)


def _plurality(d2: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """Per row of squared distances to the reference rows, the plurality class of its k nearest
    (a vote is worth 1 plus a little more the nearer it is, so ties go to the nearer neighbours)."""
    k = int(min(k, d2.shape[1]))
    if len(d2) == 0 or k == 0:
        return np.zeros(len(d2), np.int64)
    nn = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < d2.shape[1] else np.argsort(d2, axis=1)[:, :k]
    rank = np.argsort(np.take_along_axis(d2, nn, axis=1), axis=1)
    lab = classes[np.take_along_axis(nn, rank, axis=1)]               # N×k, nearest first
    w = 1.0 + 1e-3 * (k - np.arange(k))
    # each neighbour's class scores the weights of the neighbours sharing it (k×k per row, any K)
    score = ((lab[:, :, None] == lab[:, None, :]) * w[None, None, :]).sum(axis=2)
    out: np.ndarray = lab[np.arange(len(lab)), score.argmax(axis=1)]
    return out


@dataclass(frozen=True)
class AnswerScores:
    """Golden's per-sample ATC scores and predicted classes: does a window's confidence follow golden's
    for the classes it predicts? Under a label shift the model's confidence given its answer stays as it
    was on golden (only the classes are reweighted); a recalibrated, re-exported or swapped model, or
    probabilities softmaxed twice, change it for the same inputs."""

    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def fit(cls, scores: np.ndarray, classes: np.ndarray) -> AnswerScores | None:
        s = np.asarray(scores, np.float64)
        c = np.asarray(classes, np.int64)
        if len(s) != len(c) or len(s) < MIN_ANSWER_SAMPLES or not np.isfinite(s).all():
            return None
        return cls(s, c)

    def test(self, scores: np.ndarray, predicted: np.ndarray, min_d: float = 0.0) -> tuple[float, float] | None:
        """(KS statistic D, p-value) of the window's scores against golden's reweighted to the window's
        predicted-class shares (Kish's effective size for golden); None with fewer than
        MIN_ANSWER_SAMPLES rows, or when most of the window's classes are not golden's. A D below
        `min_d` reads p = 1 (the exact p-value costs a few ms, and such a D decides nothing)."""
        from scipy.stats import kstwo

        w = np.asarray(scores, np.float64)
        y = np.asarray(predicted, np.int64)
        ok = np.isfinite(w)
        w, y = w[ok], y[ok]
        if len(w) < MIN_ANSWER_SAMPLES:
            return None
        k = int(max(self.classes.max(), y.max())) + 1
        q = np.bincount(y, minlength=k) / len(y)
        p = np.bincount(self.classes, minlength=k) / len(self.classes)
        if q[p > 0].sum() < 0.5:
            return None
        rw = np.where(p > 0, q / np.maximum(p, 1e-12), 0.0)[self.classes]
        order = np.argsort(self.scores, kind="stable")
        r, rw = self.scores[order], rw[order]
        t = np.concatenate([r, np.sort(w)])
        cum = np.concatenate([[0.0], np.cumsum(rw)]) / rw.sum()
        f0 = cum[np.searchsorted(r, t, side="right")]
        g = np.searchsorted(np.sort(w), t, side="right") / len(w)
        d = float(np.max(np.abs(f0 - g)))
        if d < min_d:
            return d, 1.0
        n_eff = float(rw.sum() ** 2 / np.sum(rw ** 2))
        en = n_eff * len(w) / (n_eff + len(w))
        return d, float(kstwo.sf(d, max(int(round(en)), 1)))
