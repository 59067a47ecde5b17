"""A named diagnosis for an alarming window: which kind of shift, and which transform explains it.

Kinds (the `kind` label of `sentinel_drift_diagnosis`), decided in this order for a window whose
combined verdict alarms:

    preprocessing_mismatch  inputs moved, and one candidate transform T of the golden inputs
                            reproduces the window (T(golden) ≈ window, i.e. T⁻¹ brings the window
                            back to the golden distribution); the transform is named (also when
                            the inputs moved less, if T fits FIT_RATIO times better than golden
                            reweighted to the window's classes: a BGR client's classes are wrong)
    input_contract          at least `contract_share` of the window's samples violate the input contract
    preprocessing_mismatch  (again) one parameter-free T reproduces a share s of the window: the
                            mixture (1 − s)·golden + s·T(golden) matches its means and variances
                            (one client of several sending transformed inputs); `transformed_share`
    covariate_shift         inputs moved, even after reweighting golden by the window's class shares
                            (or more than OUTSIDE of the window lies outside the golden support as
                            a population, or the input-statistics test alarmed, and the class mix
                            either did not move or does not explain the inputs either)
    output_shift            the inputs are explained as for prior_shift, but what the model answers
                            for them is not what it answers on golden: the served classes disagree with
                            the classes of their inputs' golden neighbours far more often than golden's
                            own (support.AnswerCheck: a label map off by one, another model version), or
                            the confidence given the predicted class moved (KS D ≥ ANSWER_SHIFT_D: a
                            calibration or export change) — a label shift changes neither
    prior_shift             the outputs moved but the inputs are explained by the golden set
                            reweighted to the window's predicted-class shares (p(x|y) unchanged;
                            the black-box label-shift assumption of Lipton et al., ICML 2018)
    none                    the window does not alarm

A window that does not alarm is still `input_contract` when at least `contract_share` of its
samples violate the contract: such samples (non-finite values above all) may never reach the
detectors, so a window made of them cannot alarm, and "none" would hide it.

Comparison: every sample gets a *signature* (per-channel mean, std, quantiles, shares of
values at the extremes and in mid-range, sharpness, gradient anisotropy, and how well it
correlates with the golden per-class mean images in each orientation, and the differences of
those fits). A candidate fits when d is small, and no single feature is far off (z² below
FIT_MAX), and no other candidate fits about as well (AMBIGUITY): otherwise no transform is
named, and the kind stays generic (covariate_shift, input_contract). For a candidate c
the distance is d(c) = mean_j z_j², with z_j the Welch statistic of feature j between the
window and T_c(golden). Candidates applied to golden inputs in their raw form (when the golden
set has it) or in the network's unit space: multiply/divide by a factor and add an offset
(both estimated from the window's per-sample extremes), invert, the seven other symmetries of
the image (transpose, anti-transpose, horizontal and vertical flip, rotation by 90/180/270°;
the four that swap height and width only when they are equal), binarize, blur (σ fitted per window
between 0.3 and 4 pixels, from the fixed σ 0.5/1/2 by a golden-section search), resize (down to s×s
and back, bilinear, area or nearest; factor s/side), zoom (content scaled about the centre), channel order and grayscale (one luma channel repeated; C > 1), missing or doubled
normalisation, and any other normalisation
(`normalization_mismatch`: an affine map x -> a·x + b per channel, a and b fitted by
least squares on the window's median per-sample minimum, quantiles, maximum and mean against
golden's (mirrored for a decreasing map, a < 0: an inverted image normalised some other way), so
a client normalising with some other mean/std is named with the map it applied and
the mean/std that implies; it must fit as closely as an exact transform, the features' spreads
included, since a share of the window mapped has the means of a milder map over all of it; the
simpler special cases above are preferred when they fit about as well). Non-invertible transforms (blur, binarize) are why the search runs forwards.

Pure numpy (scipy.ndimage for blur): arrays in, a frozen `Diagnosis` out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Kind = Literal["none", "input_contract", "preprocessing_mismatch", "covariate_shift", "prior_shift", "output_shift"]
KINDS: tuple[str, ...] = ("none", "input_contract", "preprocessing_mismatch", "covariate_shift", "prior_shift",
                          "output_shift")
TRANSFORMS: tuple[str, ...] = ("multiply", "divide", "offset", "invert", "transpose", "flip_horizontal",
                               "flip_vertical", "binarize", "blur", "channel_order", "normalization_missing",
                               "normalization_doubled", "rotate_90", "rotate_180", "rotate_270", "antitranspose",
                               "normalization_mismatch", "grayscale", "resize", "zoom")
# Candidates with parameters estimated from the window (allowed FIT_MAX_FITTED), and the simpler
# candidates that are special cases of the affine `normalization_mismatch`: when one of those fits
# about as well (within AMBIGUITY), it is named instead.
FITTED: tuple[str, ...] = ("multiply", "divide", "offset", "normalization_mismatch")
AFFINE_SPECIAL: tuple[str, ...] = ("multiply", "divide", "offset", "normalization_missing", "normalization_doubled",
                                   "invert")
# Per-channel signature statistics an affine map x -> a·x + b carries over exactly (per-sample
# minimum, quantiles, maximum and mean; mirrored when a < 0): a and b are fitted on their window medians.
AFFINE_STATS: tuple[str, ...] = ("min", "q10", "q50", "q90", "max", "mean")
AFFINE_MARGIN = 2.0  # ... or within this much of its d (two fitted parameters per channel fit noise better)
AFFINE_FIT = 3.0     # the affine candidate fits only this closely (and with no z² above FIT_MAX): its fit is
                     # exact for an affine map, and a near-affine shift (brightness clipped at the top) must
                     # not take its name
MIN_AFFINE_MOVE = 0.01   # an affine map moving no channel's golden range ends by this share of it is no candidate

# Thresholds on d = mean squared Welch z over signature features (≈ 1 when nothing moved).
MOVED = 6.0          # inputs moved: d(identity, class-reweighted golden) above this
MOVED_LOW = 2.0      # ... or above this when the input-statistics test alarms too (≈ 1 when nothing moved)
OUTSIDE = 0.10       # ... or this share of the window is outside the golden support (support.outside_share)
FIT = 12.0           # a candidate explains the window: its d below this ...
FIT_RATIO = 8.0      # ... and at least this many times smaller than d(identity) ...
FIT_MAX = 40.0       # ... and no feature's z² above this (z ≈ 6.3) ...
FIT_MAX_FITTED = 120.0   # ... or above this for multiply/divide/offset, whose parameter is estimated
AMBIGUITY = 2.0      # a second fitting candidate within this factor of the best d: none is named
PARTIAL_FIT = 2.5    # a mixture (1 − s)·golden + s·T(golden) fits a window when its d is below this ...
PARTIAL_GAIN = 40.0  # ... and it lowers the summed z² over features by at least this much ...
MIN_PARTIAL = 0.05   # ... with a share s of at least this ...
PARTIAL_MARGIN = 10.0    # ... and by this much more than any other candidate's mixture
CONTRACT_SHARE = 0.02  # share of contract-violating samples that makes a window input_contract
ANSWER_SHIFT_P = 0.01  # confidence given the predicted class unlike golden's below this p-value ...
ANSWER_SHIFT_D = 0.6   # ... and by at least this KS distance: the answers changed. A label shift to one class
                       # compares the window with that class's ~30 golden rows, whose confidence differs from
                       # other writers' by D up to ~0.5 (digits holdout); a recalibrated or swapped model moves
                       # it by 0.77-1.0
MIN_FACTOR = 1.25    # a fitted scale factor nearer to 1 than this is not a candidate
MIN_OFFSET = 0.05    # a fitted offset smaller than this share of the golden range is not a candidate
BLUR_SIGMAS = (0.5, 1.0, 2.0)
# Image-pipeline mismatches with a parameter. `blur`: σ fitted per window by a golden-section search on
# log σ within BLUR_RANGE, bracketed by the BLUR_SIGMAS neighbours of the best fixed σ (BLUR_EVALS passes
# over the golden set, run only when the window is less sharp than golden and a fixed σ already fits
# at least BLUR_GATE times better than no transform). `resize` (down to s×s and back up: bilinear both
# ways, area down, or nearest both ways) and `zoom` (content scaled about the centre, background
# outside) are grids fitted once on golden; none of the three enters the mixtures or the per-sample check.
BLUR_RANGE = (0.3, 4.0)
BLUR_EVALS = 7
BLUR_GATE = 2.0
RESIZE_FACTORS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)   # intermediate side over the input's
RESIZE_MODES = ("bilinear", "area", "nearest")
ZOOM_FACTORS = (0.45, 0.5, 0.55, 0.61, 0.68, 0.75, 0.83, 1.2, 1.33, 1.47, 1.62, 1.8, 2.0, 2.2)
PARAMETRIC = ("blur", "resize", "zoom")
MAX_GRID_VALUES = 1 << 22    # golden input values each resize/zoom variant is fitted on (large images: fewer
MIN_GRID_SAMPLES = 32        # samples, never fewer than this): 32 of 3×224×224 instead of ~110; and for images
                             # over MAX_FIT_SIDE a side, every other zoom factor and no nearest resize (19 variants, not 32)
DEAD_BANDS = 8       # bands per axis a dead-band check (support.TransformLike) blanks, one at a time
REL_TOLERANCE = 0.005
MAX_GOLDEN = 500     # golden samples the candidate moments are computed from (fit cost bound)
# Bounds that keep large images (a 3×224×224 DenseNet input is 2,350 digits) cheap; none changes
# anything for images within them (8×8 digits). Before them a 256-image 224×224 golden set took
# 137 s and 6.4 GB to fit (16 dead-band copies held at once, 8 × classes full-size templates).
MAX_GOLDEN_VALUES = 1 << 24      # golden input values the fit uses: fewer samples for large images ...
MIN_GOLDEN_LARGE = 100           # ... but never fewer than this many (or all there are)
MAX_FIT_SIDE = 32                # orientation fits use grayscale images area-pooled to at most this side
MAX_STAT_PIXELS = 4096           # per-channel statistics read at most about this many pixels (fixed stride)
FEATURE_CHUNK_VALUES = 1 << 22   # signatures are computed this many input values at a time
# The eight symmetries of a square image (the dihedral group D4); rotations are counter-clockwise,
# as numpy.rot90 turns an image shown with row 0 at the top. Those that swap height and width
# exist only for square images (`SQUARE_ONLY`).
ORIENTATIONS = ("identity", "transpose", "flip_horizontal", "flip_vertical", "rotate_90", "rotate_180",
                "rotate_270", "antitranspose")
SQUARE_ONLY = ("transpose", "rotate_90", "rotate_270", "antitranspose")


def _orient(img: np.ndarray, o: str) -> np.ndarray:
    """Orientation `o` of images (...×H×W)."""
    if o == "transpose":
        return np.swapaxes(img, -1, -2)
    if o == "flip_horizontal":
        return img[..., ::-1]
    if o == "flip_vertical":
        return img[..., ::-1, :]
    if o == "rotate_90":
        return np.rot90(img, 1, axes=(-2, -1))
    if o == "rotate_180":
        return img[..., ::-1, ::-1]
    if o == "rotate_270":
        return np.rot90(img, 3, axes=(-2, -1))
    if o == "antitranspose":
        return np.swapaxes(img, -1, -2)[..., ::-1, ::-1]
    return img


def _pool(gray: np.ndarray) -> np.ndarray:
    """N×H×W images area-averaged by one integer factor until no side exceeds MAX_FIT_SIDE (the
    centre kept where a side does not divide, so flips and rotations commute with it)."""
    n, h, w = gray.shape
    f = -(-max(h, w) // MAX_FIT_SIDE)
    if f <= 1:
        return gray
    ph, pw = max(h // f, 1), max(w // f, 1)
    fh, fw = min(f, h), min(f, w)
    top, left = (h - ph * fh) // 2, (w - pw * fw) // 2
    g = gray[:, top:top + ph * fh, left:left + pw * fw]
    return np.asarray(g.reshape(n, ph, fh, pw, fw).mean(axis=(2, 4)))


def orientations(h: int, w: int) -> tuple[str, ...]:
    """The orientations of an H×W image that keep its shape."""
    return tuple(o for o in ORIENTATIONS if h == w or o not in SQUARE_ONLY)


@dataclass(frozen=True)
class Signature:
    """Per-sample signature features of network inputs, fitted on golden inputs and their classes."""

    low: np.ndarray                 # C, golden minimum per channel
    high: np.ndarray                # C
    templates: np.ndarray           # O×K×(H·W): centred, unit-norm class mean images per orientation
    names: tuple[str, ...]

    @classmethod
    def fit(cls, inputs: np.ndarray, classes: np.ndarray) -> Signature:
        x = np.asarray(inputs, dtype=np.float64)
        c, h, w = x.shape[1:]
        flat = x.reshape(len(x), c, -1)
        low, high = flat.min(axis=(0, 2)), flat.max(axis=(0, 2))
        gray = _pool(x.mean(axis=1))
        ks = np.unique(np.asarray(classes))
        means = np.stack([gray[np.asarray(classes) == k].mean(axis=0) for k in ks])
        orients = list(orientations(h, w))
        t = np.stack([_orient(means, o).reshape(len(ks), -1) for o in orients])
        t = t - t.mean(axis=2, keepdims=True)
        t /= np.maximum(np.linalg.norm(t, axis=2, keepdims=True), 1e-12)
        names = [f"{s}_c{i}" for i in range(c) for s in ("mean", "std", "q10", "q50", "q90", "low_share",
                                                           "high_share", "mid_share", "min", "max")]
        names += ["sharpness", "anisotropy"] + [f"fit_{o}" for o in orients]
        names += [f"fit_identity_minus_{o}" for o in orients[1:]]
        return cls(low, high, t, tuple(names))

    def features(self, inputs: np.ndarray) -> np.ndarray:
        """N×F signature features of N×C×H×W network inputs (non-finite values count as 0)."""
        arr = np.asarray(inputs)
        per = max(int(np.prod(arr.shape[1:])), 1)
        step = max(FEATURE_CHUNK_VALUES // per, 1)
        if len(arr) <= step:
            return self._features(arr)
        return np.concatenate([self._features(arr[i:i + step]) for i in range(0, len(arr), step)])

    def _features(self, inputs: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs, dtype=np.float64)
        if not np.isfinite(np.add.reduce(x, axis=None)):   # one pass: a NaN or ±inf makes the sum non-finite
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        stride = -(-flat.shape[2] // MAX_STAT_PIXELS)
        if stride > 1:
            flat = flat[:, :, ::stride]
        rng = np.maximum(self.high - self.low, 1e-12)[None, :, None]
        lo, hi = self.low[None, :, None], self.high[None, :, None]
        q = np.quantile(flat, (0.1, 0.5, 0.9), axis=2)                     # 3×N×C
        eps = 0.02 * rng
        low_share = (flat <= lo + eps).mean(axis=2)
        high_share = (flat >= hi - eps).mean(axis=2)
        mid_share = ((flat > lo + 0.1 * rng) & (flat < hi - 0.1 * rng)).mean(axis=2)
        per_c = np.stack([flat.mean(axis=2), flat.std(axis=2), q[0], q[1], q[2], low_share, high_share,
                          mid_share, flat.min(axis=2), flat.max(axis=2)], axis=2).reshape(n, -1)
        gx = np.abs(np.diff(x, axis=3)).mean(axis=(1, 2, 3)) if x.shape[3] > 1 else np.zeros(n)
        gy = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3)) if x.shape[2] > 1 else np.zeros(n)
        aniso = gx / np.maximum(gx + gy, 1e-12)
        g = _pool(x.mean(axis=1)).reshape(n, -1)
        g = g - g.mean(axis=1, keepdims=True)
        g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        o, k, d = self.templates.shape
        fits = (g @ self.templates.reshape(o * k, d).T).reshape(n, o, k).max(axis=2)   # best class fit per orientation
        # Paired differences: far less noisy than each fit, so orientation changes stand out.
        contrast = fits[:, :1] - fits[:, 1:]
        return np.concatenate([per_c, ((gx + gy) / 2)[:, None], aniso[:, None], fits, contrast], axis=1)


@dataclass(frozen=True)
class Moments:
    """Mean and variance per feature of a sample of signatures, and its size."""

    mean: np.ndarray
    var: np.ndarray
    n: int

    @classmethod
    def of(cls, f: np.ndarray) -> Moments:
        return cls(f.mean(axis=0), f.var(axis=0, ddof=1) if len(f) > 1 else np.zeros(f.shape[1]), len(f))


def z_squared(window: Moments, ref: Moments, scale: np.ndarray) -> np.ndarray:
    """Squared Welch z per feature (`scale` floors each feature's variance), capped at 1e6."""
    # plus a 0.5% relative tolerance: a fitted factor is not exact, and a feature with no spread
    # (a clipped maximum) must not turn that into an enormous z
    se2 = window.var / max(window.n, 1) + ref.var / max(ref.n, 1) + (scale ** 2) / max(window.n, 1) \
        + (REL_TOLERANCE * ref.mean) ** 2
    z2: np.ndarray = np.minimum((window.mean - ref.mean) ** 2 / se2, 1e6)
    return z2


def distance(window: Moments, ref: Moments, scale: np.ndarray) -> float:
    """Mean squared Welch z over features (`scale` floors each feature's variance)."""
    return float(np.mean(z_squared(window, ref, scale)))


@dataclass(frozen=True)
class Candidate:
    """A transform of golden inputs in their source space; `fitted` ones take a parameter from the window."""

    name: str
    apply: Callable[[np.ndarray, float], np.ndarray]
    network: bool = False            # acts on network inputs rather than on the source space


@dataclass(frozen=True)
class Source:
    """Golden inputs in the space transforms act on, and the way back to network inputs.

    `images` are N×C×H×W; `to_network` maps such an array to network inputs; network values v
    map back to source values as v·`unit_a` + `unit_b` per channel (exact for scale/offset,
    which are all that is estimated through it).
    """

    images: np.ndarray
    to_network: Callable[[np.ndarray], np.ndarray]
    unit_a: np.ndarray
    unit_b: np.ndarray
    norm_mean: np.ndarray            # network normalisation (for the missing/doubled candidates)
    norm_std: np.ndarray
    # the top of the raw range where the preprocessing names it (1/scale: 255 for 8-bit images, 16
    # for digits, golden within [0, 1/scale]); None otherwise, and golden's own range stands in for it
    full_scale: np.ndarray | None = None

    @property
    def low(self) -> np.ndarray:
        return np.asarray(self.images.min(axis=(0, 2, 3)))

    @property
    def high(self) -> np.ndarray:
        return np.asarray(self.images.max(axis=(0, 2, 3)))

    @property
    def invert_sum(self) -> np.ndarray:
        """L of the inversion x -> L − x per channel: the full scale when known, else golden's lo + hi."""
        return np.asarray(self.full_scale if self.full_scale is not None else self.low + self.high, np.float64)


def _ch(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).reshape(1, -1, 1, 1)


def _dead_bands(src: Source) -> Iterator[tuple[str, np.ndarray]]:
    """The source images with one horizontal or vertical band at the channel's golden low value:
    min(DEAD_BANDS, H) bands of rows and min(DEAD_BANDS, W) of columns, one copy at a time."""
    x = src.images
    lo = _ch(src.low)
    h, w = x.shape[2:]
    for axis, size in ((2, h), (3, w)):
        edges = np.linspace(0, size, min(DEAD_BANDS, size) + 1).round().astype(int)
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            t = x.copy()
            idx = [slice(None)] * 4
            idx[axis] = slice(int(a), int(b))
            t[tuple(idx)] = np.broadcast_to(lo, t[tuple(idx)].shape) if t[tuple(idx)].size else t[tuple(idx)]
            yield f"dead_{'row' if axis == 2 else 'col'}_{i}", t


def _candidates(src: Source) -> list[Candidate]:
    lo, hi = _ch(src.low), _ch(src.high)
    c, h, w = src.images.shape[1:]

    def blur(s: float) -> Callable[[np.ndarray, float], np.ndarray]:
        def f(x: np.ndarray, _: float) -> np.ndarray:
            from scipy.ndimage import gaussian_filter
            return np.asarray(gaussian_filter(x, sigma=(0, 0, s, s), mode="constant"))
        return f

    def orient(o: str) -> Callable[[np.ndarray, float], np.ndarray]:
        return lambda x, _: np.ascontiguousarray(_orient(x, o))

    inv = _ch(src.invert_sum)
    cands = [
        Candidate("invert", lambda x, _: inv - x),
        *[Candidate(o, orient(o)) for o in orientations(h, w) if o != "identity"],
        Candidate("binarize", lambda x, _: np.where(x > (lo + hi) / 2, hi, lo)),
        *[Candidate("blur", blur(s)) for s in BLUR_SIGMAS],
    ]
    if c > 1:
        cands.append(Candidate("channel_order", lambda x, _: x[:, ::-1]))
        # decoded as one grey channel and repeated (PIL's convert("L"), OpenCV's IMREAD_GRAYSCALE):
        # ITU-R 601 luma for 3 channels, as both compute it; the channel mean otherwise
        wts = np.array([0.299, 0.587, 0.114]) if c == 3 else np.full(c, 1.0 / c)
        cands.append(Candidate("grayscale", lambda x, _: np.repeat(
            np.tensordot(x, wts, axes=([1], [0]))[:, None], c, axis=1)))
    m, s = _ch(src.norm_mean), _ch(src.norm_std)
    if np.any(s != 1) or np.any(m != 0):
        cands.append(Candidate("normalization_missing", lambda x, _: x * s + m, network=True))
        cands.append(Candidate("normalization_doubled", lambda x, _: (x - m) / s, network=True))
    return cands


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of N×C×H×W images (σ in pixels, zero padding), as the `blur` candidates apply it."""
    from scipy.ndimage import gaussian_filter
    return np.asarray(gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="constant"))


def _resample_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """n_out×n_in weights of a 1-D resize: `bilinear` (half-pixel centres, edges clamped, no
    antialiasing: `sentinel.preprocess.resize_bilinear`, OpenCV's INTER_LINEAR), `area` (box overlap)
    or `nearest` (the pixel under each output centre)."""
    m = np.zeros((n_out, n_in))
    r = n_in / n_out
    for o in range(n_out):
        if mode == "nearest":
            m[o, min(int((o + 0.5) * r), n_in - 1)] = 1.0
        elif mode == "area" and r > 1:
            a, b = o * r, (o + 1) * r
            i = np.arange(n_in)
            m[o] = np.clip(np.minimum(b, i + 1) - np.maximum(a, i), 0, None) / r
        else:
            c = min(max((o + 0.5) * r - 0.5, 0.0), n_in - 1.0)
            i0 = int(np.floor(c))
            i1 = min(i0 + 1, n_in - 1)
            m[o, i0] += 1.0 - (c - i0)
            m[o, i1] += c - i0
    return m


def _zoom_matrix(n: int, z: float) -> np.ndarray:
    """n×n bilinear weights of content scaled by z about the centre (zero weight outside the image)."""
    c = (n - 1) / 2
    m = np.zeros((n, n))
    for o in range(n):
        src = c + (o - c) / z
        i0 = int(np.floor(src))
        for i, w in ((i0, 1.0 - (src - i0)), (i0 + 1, src - i0)):
            if 0 <= i < n:
                m[o, i] += w
    return m


def _separable(x: np.ndarray, mh: np.ndarray, mw: np.ndarray) -> np.ndarray:
    """mh·x·mwᵀ for every N×C image of x (sparse products: cheap for 224-pixel sides too)."""
    from scipy.sparse import csr_matrix

    n, c, h, w = x.shape
    y = np.asarray((csr_matrix(mw) @ x.reshape(-1, w).T).T).reshape(n, c, h, mw.shape[0])
    w2 = y.shape[3]
    y = np.asarray(csr_matrix(mh) @ y.transpose(2, 0, 1, 3).reshape(h, -1))
    return np.ascontiguousarray(y.reshape(mh.shape[0], n, c, w2).transpose(1, 2, 0, 3))


def _resize_grid(h: int, w: int) -> list[tuple[float, str, Callable[[np.ndarray], np.ndarray]]]:
    """(factor, description, transform) of each `resize` variant for H×W images: through
    round(f·H)×round(f·W) for f in RESIZE_FACTORS (distinct sizes of at least 2, below the input's)."""
    out: list[tuple[float, str, Callable[[np.ndarray], np.ndarray]]] = []
    seen = set()
    for f in RESIZE_FACTORS:
        sh, sw = max(int(round(f * h)), 2), max(int(round(f * w)), 2)
        if sh >= h or sw >= w or (sh, sw) in seen:
            continue
        seen.add((sh, sw))
        for mode in RESIZE_MODES if max(h, w) <= MAX_FIT_SIDE else RESIZE_MODES[:2]:
            up = "nearest" if mode == "nearest" else "bilinear"
            mh = _resample_matrix(sh, h, up) @ _resample_matrix(h, sh, mode)
            mw = _resample_matrix(sw, w, up) @ _resample_matrix(w, sw, mode)
            desc = f"{mode} down to {sh}×{sw} and {up} back up"

            def fn(x: np.ndarray, mh: np.ndarray = mh, mw: np.ndarray = mw) -> np.ndarray:
                return _separable(x, mh, mw)
            out.append((round(sh / h, 4), desc, fn))
    return out


def _zoom_grid(h: int, w: int, low: np.ndarray) -> list[tuple[float, str, Callable[[np.ndarray], np.ndarray]]]:
    """(factor, description, transform) of each `zoom` variant: content scaled by z about the centre
    (bilinear), the channel's golden low value where the scaled image does not reach."""
    out: list[tuple[float, str, Callable[[np.ndarray], np.ndarray]]] = []
    lo = _ch(low)
    for z in ZOOM_FACTORS if max(h, w) <= MAX_FIT_SIDE else ZOOM_FACTORS[::2]:
        mh, mw = _zoom_matrix(h, z), _zoom_matrix(w, z)

        def fn(x: np.ndarray, mh: np.ndarray = mh, mw: np.ndarray = mw) -> np.ndarray:
            return np.asarray(_separable(x - lo, mh, mw) + lo)
        out.append((z, f"content scaled ×{z:g} about the centre", fn))
    return out


@dataclass(frozen=True)
class Diagnosis:
    """The named cause of one window's alarm, with signed effect sizes."""

    kind: str                                    # one of KINDS
    transform: str | None = None                 # one of TRANSFORMS (preprocessing_mismatch, input_contract)
    parameter: float | None = None               # the fitted factor or offset of multiply/divide/offset, blur σ
                                                 # (pixels), resize factor (intermediate side / input side), zoom factor
    inputs_moved: float | None = None            # d(identity) against class-reweighted golden
    candidates: dict[str, float] = field(default_factory=dict)   # best few candidates' distances
    input_effects: dict[str, float] = field(default_factory=dict)  # window − golden median per input statistic
    class_shift: dict[str, float] = field(default_factory=dict)    # window − golden share, largest first
    detectors: dict[str, str] = field(default_factory=dict)        # alarming detector → its top feature
    contract_violating_share: float | None = None
    reason: str = ""
    # share of the window the named transform explains: the weight s of T(golden) in the mixture
    # (1 − s)·golden + s·T(golden) that best fits the window's mean signature (None: nothing named)
    transformed_share: float | None = None
    # normalization_mismatch: the fitted map x -> scale·x + offset per channel in source units, and
    # the mean/std (on the model's scaled 0..1 axis) a client would have normalised with to send it
    # (scale < 0: the image was inverted, L − x with L as in `Source.invert_sum`, and mean/std are
    # those applied after that)
    affine: dict[str, list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "transform": self.transform, "parameter": self.parameter, "affine": self.affine,
                "inputs_moved": self.inputs_moved, "candidates": dict(self.candidates),
                "input_effects": dict(self.input_effects), "class_shift": dict(self.class_shift),
                "detectors": dict(self.detectors), "contract_violating_share": self.contract_violating_share,
                "transformed_share": self.transformed_share, "reason": self.reason}


class Diagnoser:
    """Fitted on golden inputs: signature moments per candidate transform and per class."""

    def __init__(self, network_inputs: np.ndarray, classes: np.ndarray, source: Source | None = None,
                 max_samples: int = MAX_GOLDEN, seed: int = 0):
        x = np.asarray(network_inputs, dtype=np.float32)
        self.classes = np.asarray(classes, dtype=np.int64)
        per = max(int(np.prod(x.shape[1:])), 1)
        max_samples = min(max_samples, max(MAX_GOLDEN_VALUES // per, MIN_GOLDEN_LARGE))
        if len(x) > max_samples:       # bounded fit cost: candidate moments from a seeded subsample
            keep = np.sort(np.random.default_rng(seed).choice(len(x), max_samples, replace=False))
            x, self.classes = x[keep], self.classes[keep]
            if source is not None:
                source = Source(source.images[keep], source.to_network, source.unit_a, source.unit_b,
                                source.norm_mean, source.norm_std, source.full_scale)
        self.signature = Signature.fit(x, self.classes)
        f = self.signature.features(x)
        self.golden_features = f
        self.golden = Moments.of(f)
        # A floor per feature (1% of its golden spread plus 0.1% of the input range) keeps constant
        # features (a background quantile) from turning rounding differences into huge z.
        span = float(np.max(self.signature.high - self.signature.low))
        self.scale = 0.01 * np.sqrt(self.golden.var) + 1e-3 * max(span, 1e-6)
        self.num_classes = int(self.classes.max()) + 1 if len(self.classes) else 0
        self.per_class = {int(k): (f[self.classes == k].mean(axis=0), f[self.classes == k].var(axis=0), int(n))
                          for k, n in zip(*np.unique(self.classes, return_counts=True), strict=True)}
        self.units = "network input units" if source is None else "raw input units"
        raw_source = source is not None
        if source is None:
            source = Source(x.astype(np.float64), lambda a: np.asarray(a, np.float32), np.ones(x.shape[1]),
                            np.zeros(x.shape[1]), np.zeros(x.shape[1]), np.ones(x.shape[1]))
        self.source = source
        self.src_low, self.src_high = source.low, source.high
        self.invert_sum = source.invert_sum
        src_flat = source.images.reshape(len(source.images), source.images.shape[1], -1)
        self.src_max_med = np.median(src_flat.max(axis=2), axis=0)
        self.src_min_med = np.median(src_flat.min(axis=2), axis=0)
        # the point a fitted multiply/divide scales about: in raw units, zero (black), since a scale
        # mismatch (0–1 floats sent for 0–255, x·255 twice) multiplies the raw values themselves,
        # and an RGB image's darkest pixel is seldom 0; in network units (no raw golden inputs) zero
        # means nothing, and golden's typical minimum stands in (digits: both are 0)
        self.pivot = np.zeros_like(self.src_min_med) if raw_source else self.src_min_med
        self.fixed: dict[str, Moments] = {}
        self.fixed_features: dict[str, np.ndarray] = {}   # signatures of T(golden), row for row
        self.fixed_param: dict[str, float] = {}           # the σ of each fixed blur variant
        blur_sigmas = iter(BLUR_SIGMAS)
        for cand in _candidates(source):
            key = cand.name
            n = 1
            while key in self.fixed:                      # blur σ variants
                n += 1
                key = f"{cand.name}#{n}"
            if cand.name == "blur":
                self.fixed_param[key] = next(blur_sigmas)
            t = cand.apply(x.astype(np.float64), 0.0) if cand.network else \
                source.to_network(cand.apply(source.images, 0.0))
            tf = self.signature.features(t)
            self.fixed[key] = Moments.of(tf)
            self.fixed_features[key] = tf
        from sentinel.drift.support import TransformLike

        # Per-sample evidence only (never a diagnosis name): dead bands of the image, a faulty sensor
        # line or a decoder zeroing a stripe, which leave a digit in the support but make it misread.
        dead = {name: self.signature.features(source.to_network(t)) for name, t in _dead_bands(source)}
        self.transform_like = TransformLike.fit(f, {**self.fixed_features, **dead})
        # the parametric image-pipeline candidates fitted once (PARAMETRIC): (parameter, description, moments)
        h, w = source.images.shape[2:]
        k = min(len(source.images), max(MAX_GRID_VALUES // max(int(np.prod(source.images.shape[1:])), 1),
                                        MIN_GRID_SAMPLES))
        imgs = source.images[np.linspace(0, len(source.images) - 1, k).round().astype(int)]
        self.grid: dict[str, list[tuple[float, str, Moments]]] = {
            name: [(p, desc, Moments.of(self.signature.features(source.to_network(fn(imgs))))) for p, desc, fn in grid]
            for name, grid in (("resize", _resize_grid(h, w)), ("zoom", _zoom_grid(h, w, source.low)))}
        self._fitted_last: tuple[Any, dict[str, tuple[Moments, float]]] | None = None

    def features(self, network_inputs: np.ndarray) -> np.ndarray:
        return self.signature.features(network_inputs)

    def affine_fit(self, window_features: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel (a, b) of the affine map x -> a·x + b (source units) that best takes golden's
        median per-sample statistics (AFFINE_STATS) to the window's; None when there is no such map
        (a window of fewer than 2 samples, a channel without spread, or no monotone fit).

        Increasing (a > 0) and decreasing (a < 0: an inverted image, then normalised some other
        way) maps are both fitted; a decreasing map takes golden's per-sample maximum to the
        window's minimum, q90 to q10 and so on, so its statistics are matched mirrored. The one
        with the smaller weighted residual over all channels is returned; one direction holds for
        every channel."""
        if len(window_features) < 2:
            return None
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for decreasing in (False, True):
            fit = self._affine_fit_one(window_features, decreasing)
            if fit is not None and (best is None or fit[0] < best[0]):
                best = fit
        return None if best is None else (best[1], best[2])

    def _affine_fit_one(self, window_features: np.ndarray,
                        decreasing: bool) -> tuple[float, np.ndarray, np.ndarray] | None:
        """(weighted residual, a, b) of the increasing or decreasing affine fit, or None."""
        names = self.signature.names
        c = len(self.signature.low)
        ua, ub = self.source.unit_a, self.source.unit_b
        a, b = np.ones(c), np.zeros(c)
        nw, ng = len(window_features), len(self.golden_features)
        # golden's statistic that a map of this direction takes to each of the window's AFFINE_STATS
        mirror = {"min": "max", "q10": "q90", "q90": "q10", "max": "min"} if decreasing else {}
        residual = 0.0
        for i in range(c):
            idx = [names.index(f"{s}_c{i}") for s in AFFINE_STATS]
            gidx = [names.index(f"{mirror.get(s, s)}_c{i}") for s in AFFINE_STATS]
            g = np.median(self.golden_features[:, gidx], axis=0) * ua[i] + ub[i]
            w = np.median(window_features[:, idx], axis=0) * ua[i] + ub[i]
            vg = self.golden_features[:, gidx].var(axis=0) * ua[i] ** 2
            vw = window_features[:, idx].var(axis=0) * ua[i] ** 2
            floor = (self.scale[idx] * ua[i]) ** 2
            wt = np.ones(len(idx))
            # least squares, then again weighted by each statistic's inverse squared standard error
            # under the first fit (as the z statistics weigh it): a statistic with no spread (a
            # background quantile) is matched exactly, not traded against the noisier ones
            for _ in range(2):
                gm, wm = (wt @ g) / wt.sum(), (wt @ w) / wt.sum()
                gc = g - gm
                den = float(wt @ (gc * gc))
                if not np.isfinite(den) or den <= 1e-12 * max(float(np.max(np.abs(g))), 1e-12) ** 2:
                    return None
                a[i] = float(wt @ (gc * (w - wm))) / den
                b[i] = float(wm - a[i] * gm)
                wt = 1.0 / (vw / nw + a[i] ** 2 * vg / ng + floor + 1e-300)
            residual += float(wt @ (w - a[i] * g - b[i]) ** 2)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.isfinite(residual)):
            return None
        if not (np.all(a < 0) if decreasing else np.all(a > 0)):
            return None
        return residual, a, b

    def affine_report(self, window_features: np.ndarray) -> tuple[dict[str, list[float]] | None, str]:
        """The fitted affine map as `Diagnosis.affine` and a sentence for on-call."""
        fit = self.affine_fit(window_features)
        if fit is None:
            return None, ""
        a, b = fit
        out: dict[str, list[float]] = {"scale": [round(float(v), 4) for v in a],
                                       "offset": [round(float(v), 4) for v in b]}
        maps = _fmt_maps(a, b)
        text = f"inputs look like {maps} of what the model expects ({self.units}{', per channel' if len(a) > 1 else ''})"
        m, sd = self.source.norm_mean, self.source.norm_std
        # network = (x·k − m)/s with k = 1/scale, so unit_a = s/k: a client sending a·x + b makes the
        # network see (x·k − m')/s' with s' = s/a and m' = (m − b·k)/a
        k = self.source.norm_std / np.maximum(self.source.unit_a, 1e-300)
        inverted = bool(np.all(a < 0))
        if inverted:
            # a·x + b = (−a)·(L − x) + (b + a·L): the image inverted, then the increasing map read as
            # a normalisation below; L as in the `invert` candidate (Source.invert_sum)
            big_l = self.invert_sum
            a, b = -a, b + a * big_l
            text += (f"; that is the image inverted ({_fmt_list(big_l)} − x), then "
                     + _fmt_maps(a, b))
        if np.any(sd != 1) or np.any(m != 0):
            s2 = sd / a
            m2 = (m - b * k) / a
            out["mean"] = [round(float(v), 4) for v in m2]
            out["std"] = [round(float(v), 4) for v in s2]
            text += (f"; as a normalisation{' of the inverted image' if inverted else ''}: mean {_fmt_list(m2)} "
                     f"std {_fmt_list(s2)} where the model expects mean {_fmt_list(m)} std {_fmt_list(sd)}")
        return out, text

    def _fitted(self, window_features: np.ndarray) -> dict[str, tuple[Moments, float]]:
        """Scale and offset candidates with parameters estimated from the window's per-sample extremes.

        Each candidate costs a signature pass over the golden set, and one diagnosis asks for the
        same window's more than once (`search`, then `transformed_share` of what it named), so the
        last window's answer is kept, keyed by its contents."""
        wf = np.asarray(window_features)
        key = (wf.shape, wf.dtype.str, wf.tobytes())
        last = self._fitted_last   # one read: another thread may replace it
        if last is not None and last[0] == key:
            return last[1]
        out = self._fit_candidates(window_features)
        self._fitted_last = (key, out)
        return out

    def _fit_candidates(self, window_features: np.ndarray) -> dict[str, tuple[Moments, float]]:
        out: dict[str, tuple[Moments, float]] = {}
        if len(window_features) == 0:
            return out
        names = self.signature.names
        c = len(self.signature.low)
        mins = window_features[:, [names.index(f"min_c{i}") for i in range(c)]]
        maxs = window_features[:, [names.index(f"max_c{i}") for i in range(c)]]
        a, b = self.source.unit_a[None, :], self.source.unit_b[None, :]
        wmax = np.median(maxs * a + b, axis=0)
        wmin = np.median(mins * a + b, axis=0)
        rng = np.maximum(self.src_high - self.src_low, 1e-12)
        base = self.src_max_med - self.src_min_med
        span = wmax - wmin
        factor = float(np.median(span / np.maximum(base, 1e-12)))
        offset = float(np.median(wmin - self.src_min_med))
        src = self.source.images
        if np.isfinite(factor) and factor > 0 and abs(np.log(factor)) > np.log(MIN_FACTOR):
            t = self.source.to_network((src - _ch(self.pivot)) * factor + _ch(self.pivot))
            out["multiply" if factor > 1 else "divide"] = (Moments.of(self.signature.features(t)), factor)
        if np.isfinite(offset) and abs(offset) > MIN_OFFSET * float(np.median(rng)):
            t = self.source.to_network(src + offset)
            out["offset"] = (Moments.of(self.signature.features(t)), offset)
        fit = self.affine_fit(window_features)
        if fit is not None:
            aa, bb = fit
            ends = np.stack([self.src_min_med, self.src_max_med])
            mapped = aa * ends + bb
            tol = MIN_AFFINE_MOVE * rng * np.maximum(np.abs(aa), 1.0)
            # the map is a special case (within tol of the mapped range at both ends of every channel's
            # golden range) when
            # it moves nothing, or is one factor about the pivot (multiply/divide; see `pivot`), or one
            # offset, or the inversion L − x (Source.invert_sum): those candidates name it (with their
            # own parameter)
            f = float(np.median(aa))
            as_factor = (ends - self.pivot) * f + self.pivot
            as_offset = ends + float(np.median(mapped[0] - ends[0]))
            as_invert = self.invert_sum - ends
            # A window whose per-sample maxima still sit on golden's (within tol) while its minima rose is
            # the shape a saturating shift leaves: an offset clipped at the range's top (a brighter camera,
            # `np.clip(x + k, 0, top)`), which x·a + top·(1 − a) fits about as well as the clip with few
            # samples (x + 1 clipped at 16: x·0.95 + 1.0, d < AFFINE_FIT in 16 of 20 windows of 50). A
            # normalisation would have to land the top on the very same value: not a candidate, and the
            # window reads covariate_shift. (Minima pinned and maxima moved is a factor, named as one.)
            pinned_top = bool(np.all(aa > 0) and np.all(np.abs(wmax - self.src_max_med) <= tol)
                              and np.all(mapped[0] - ends[0] > tol))
            if not pinned_top and not any(np.all(np.abs(mapped - m) <= tol)
                                          for m in (ends, as_factor, as_offset, as_invert)):
                out["normalization_mismatch"] = (self.affine_moments(aa, bb), float(np.median(aa)))
        blur = self._fit_blur(window_features)
        if blur is not None:
            out["blur"] = blur
        return out

    def blur_moments(self, sigma: float) -> Moments:
        """Signature moments of golden blurred by σ (source units, as the `blur` candidates)."""
        return Moments.of(self.signature.features(self.source.to_network(_gaussian_blur(self.source.images, sigma))))

    def _fit_blur(self, window_features: np.ndarray) -> tuple[Moments, float] | None:
        """The blur σ that best reproduces the window (golden-section on log σ, BLUR_EVALS evaluations),
        or None when the window is no blur: not less sharp than golden, or no fixed σ (BLUR_SIGMAS) fits
        at least BLUR_GATE times better than the golden set itself."""
        if len(window_features) < 2 or not self.fixed_param:
            return None
        wm = Moments.of(window_features)
        j = self.signature.names.index("sharpness")
        if not wm.mean[j] < self.golden.mean[j]:
            return None
        d0 = distance(wm, self.golden, self.scale)
        fixed = sorted((p, distance(wm, self.fixed[k], self.scale)) for k, p in self.fixed_param.items())
        i = min(range(len(fixed)), key=lambda k: fixed[k][1])
        if not fixed[i][1] * BLUR_GATE < d0:
            return None
        lo = np.log(fixed[i - 1][0] if i > 0 else BLUR_RANGE[0])
        hi = np.log(fixed[i + 1][0] if i + 1 < len(fixed) else BLUR_RANGE[1])
        seen: dict[float, tuple[float, Moments]] = {}

        def f(u: float) -> float:
            m = self.blur_moments(float(np.exp(u)))
            seen[u] = (distance(wm, m, self.scale), m)
            return seen[u][0]

        g = (np.sqrt(5.0) - 1) / 2
        a, b = lo, hi
        c, d = b - g * (b - a), a + g * (b - a)
        fc, fd = f(c), f(d)
        for _ in range(BLUR_EVALS - 2):
            if fc <= fd:
                b, d, fd = d, c, fc
                c = b - g * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + g * (b - a)
                fd = f(d)
        u = min(seen, key=lambda k: seen[k][0])
        return seen[u][1], round(float(np.exp(u)), 3)

    def parametric(self, name: str, window_features: np.ndarray) -> tuple[float, str, Moments] | None:
        """The best-fitting variant of a grid candidate (`resize`, `zoom`) for the window."""
        grid = self.grid.get(name)
        if not grid or len(window_features) == 0:
            return None
        wm = Moments.of(window_features)
        return min(grid, key=lambda v: distance(wm, v[2], self.scale))

    def describe(self, name: str, window_features: np.ndarray, parameter: float | None = None) -> str:
        """A sentence for on-call on the fitted parameter of a PARAMETRIC candidate ("" for others)."""
        if name == "blur":
            return "" if parameter is None else f"inputs look blurred (Gaussian, σ≈{parameter:.3g} pixels) before " \
                                                "they reached the model"
        if name in self.grid:
            v = self.parametric(name, window_features)
            if v is not None:
                what = "resized" if name == "resize" else "zoomed"
                return f"inputs look {what} ({v[1]}) before they reached the model"
        return ""

    def reweighted(self, predicted: np.ndarray | None) -> Moments:
        """Golden signature moments reweighted to the window's predicted-class shares (n: effective size)."""
        if predicted is None or len(predicted) == 0 or not self.per_class:
            return self.golden
        q = np.bincount(np.asarray(predicted, np.int64), minlength=self.num_classes).astype(np.float64)
        q = q[:self.num_classes] if len(q) >= self.num_classes else np.pad(q, (0, self.num_classes - len(q)))
        keys = [k for k in self.per_class if q[k] > 0]
        if not keys or q[keys].sum() < 0.5 * q.sum():
            return self.golden
        wts = q[keys] / q[keys].sum()
        mu = np.stack([self.per_class[k][0] for k in keys])
        var = np.stack([self.per_class[k][1] for k in keys])
        mean = wts @ mu
        v = wts @ (var + mu ** 2) - mean ** 2
        # Kish's effective sample size of the reweighted golden set: with the window's traffic on
        # two classes only, ~2/10 of the golden samples carry the weight, and the standard error of
        # its means is that of those few (with the full n, a pure prior shift read as moved inputs)
        counts = np.array([self.per_class[k][2] for k in keys], np.float64)
        n_eff = 1.0 / float(np.sum(wts ** 2 / counts))
        return Moments(mean, np.maximum(v, 0.0), max(2, int(n_eff)))

    def affine_moments(self, a: np.ndarray, b: np.ndarray) -> Moments:
        """Signature moments of golden mapped by x -> a·x + b per channel (source units)."""
        t = self.source.to_network(self.source.images * _ch(a) + _ch(b))
        return Moments.of(self.signature.features(t))

    def candidate_moments(self, name: str, window_features: np.ndarray,
                          affine: dict[str, list[float]] | None = None) -> Moments | None:
        """Signature moments of T(golden) for the candidate `name` (its best-fitting variant, and its
        parameter fitted, on `window_features`; for normalization_mismatch the map `affine` when
        given, as in `Diagnosis.affine`)."""
        wm = Moments.of(window_features)
        if name == "normalization_mismatch" and affine is not None:
            return self.affine_moments(np.asarray(affine["scale"], np.float64), np.asarray(affine["offset"], np.float64))
        fitted = self._fitted(window_features)
        ms = [m for k, m in self.fixed.items() if k.split("#")[0] == name]
        if name in fitted:
            ms.append(fitted[name][0])
        if name in self.grid:
            v = self.parametric(name, window_features)
            ms += [] if v is None else [v[2]]
        return min(ms, key=lambda m: distance(wm, m, self.scale)) if ms else None

    def transformed_share(self, name: str, window_features: np.ndarray,
                          affine: dict[str, list[float]] | None = None,
                          fit_features: np.ndarray | None = None) -> float | None:
        """`mixture_share` of the candidate `name` in the window (None for an unknown name).

        `fit_features`: the samples T's variant and parameter are chosen on (default: the window).
        Where only a share of the window is transformed (the contract-violating samples), the
        window's own extremes give a milder factor than the transformed samples': x/255 on a
        quarter of a window read a share of 0.8, or none."""
        m = self.candidate_moments(name, window_features if fit_features is None else fit_features, affine)
        return None if m is None else round(mixture_share(Moments.of(window_features), self.golden, m, self.scale), 4)

    def mixtures(self, window_features: np.ndarray) -> dict[str, tuple[float, float, float, float]]:
        """Per parameter-free candidate T, the best mixture (1 − s)·golden + s·T(golden): (d of the
        means, s, largest z², mean squared z of the log variances).

        A window of which a share is transformed has the mixture's spread as well as its means; a
        window in which every sample moved a little (a finer quantisation than binarize) may match
        some mixture's means, but not its variances. The variance z uses log(var_w/var_mix) with
        standard error sqrt(2/(n_w − 1) + 2/(n_golden − 1)) (normal approximation).
        """
        wm = Moments.of(window_features)
        g = self.golden
        floor = self.scale ** 2
        se_v = np.sqrt(2.0 / max(wm.n - 1, 1) + 2.0 / max(g.n - 1, 1))
        out: dict[str, tuple[float, float, float, float]] = {}
        for key, m in self.fixed.items():
            name = key.split("#")[0]
            sh = mixture_share(wm, g, m, self.scale)
            diff = m.mean - g.mean
            mix = Moments((1 - sh) * g.mean + sh * m.mean,
                          (1 - sh) * g.var + sh * m.var + sh * (1 - sh) * diff ** 2, g.n)
            z2 = z_squared(wm, mix, self.scale)
            d = float(np.mean(z2))
            dv = float(np.mean((np.log((wm.var + floor) / (mix.var + floor)) / se_v) ** 2))
            if name not in out or d < out[name][0]:
                out[name] = (d, sh, float(np.max(z2)), dv)
        return out

    def search(self, window_features: np.ndarray) -> dict[str, tuple[float, float | None, float]]:
        """(d, fitted parameter or None, largest per-feature z²) of the identity and every candidate."""
        wm = Moments.of(window_features)

        def score(m: Moments) -> tuple[float, float]:
            z2 = z_squared(wm, m, self.scale)
            return float(np.mean(z2)), float(np.max(z2)) if len(z2) else 0.0

        d0, m0 = score(self.golden)
        out: dict[str, tuple[float, float | None, float]] = {"identity": (d0, None, m0)}
        for key, m in self.fixed.items():
            name = key.split("#")[0]
            d, zmax = score(m)
            if name not in out or d < out[name][0]:
                out[name] = (d, self.fixed_param.get(key), zmax)
        for name in self.grid:
            v = self.parametric(name, window_features)
            if v is not None:
                d, zmax = score(v[2])
                out[name] = (d, v[0], zmax)
        for name, (m, p) in self._fitted(window_features).items():
            d, zmax = score(m)
            if name == "blur" and name in out and out[name][0] <= d:
                continue
            if name == "normalization_mismatch":
                # its means match any mixture of golden and a stronger map of the same kind (the mean
                # of a linear statistic over a mixture is that of the averaged map): the spread tells a
                # window that is all mapped from a share of it, so d is the mean squared z over the
                # means and the log variances together (`log_variance_distance`; a window from a few
                # writers has somewhat other spreads too, hence together rather than each below AFFINE_FIT)
                d = (d + log_variance_distance(wm, m, self.scale)) / 2
            out[name] = (d, None if name == "normalization_mismatch" else p, zmax)
        return out


def _fmt_maps(a: np.ndarray, b: np.ndarray) -> str:
    """Per-channel affine maps as on-call reads them: "x*0.44+5, x*1.2-0.3"."""
    return ", ".join(f"x*{ai:.3g}{bi:+.3g}" for ai, bi in zip(a, b, strict=True))


def _fmt_list(v: np.ndarray) -> str:
    v = np.asarray(v, np.float64).ravel()
    return f"{v[0]:.3g}" if len(v) == 1 else "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


def log_variance_distance(window: Moments, ref: Moments, scale: np.ndarray) -> float:
    """Mean squared z of log(var_window / var_ref) per feature (standard error sqrt(2/(n_w − 1) +
    2/(n_ref − 1)), the normal approximation; `scale` floors each variance)."""
    floor = scale ** 2
    se = np.sqrt(2.0 / max(window.n - 1, 1) + 2.0 / max(ref.n - 1, 1))
    return float(np.mean((np.log((window.var + floor) / (ref.var + floor)) / se) ** 2))


def mixture_share(window: Moments, golden: Moments, transformed: Moments, scale: np.ndarray) -> float:
    """Least-squares weight s in [0, 1] of `transformed` in (1 − s)·golden + s·transformed ≈ window means.

    Features are weighted by their inverse squared standard error (as in `z_squared`), so the
    precisely measured ones decide. 1 when the whole window is transformed, near 0 when none is.
    """
    a = transformed.mean - golden.mean
    b = window.mean - golden.mean
    se2 = window.var / max(window.n, 1) + transformed.var / max(transformed.n, 1) + (scale ** 2) / max(window.n, 1) \
        + (REL_TOLERANCE * transformed.mean) ** 2
    w = 1.0 / np.maximum(se2, 1e-300)
    den = float(np.sum(w * a * a))
    if not np.isfinite(den) or den <= 0:
        return 1.0
    return float(np.clip(np.sum(w * a * b) / den, 0.0, 1.0))


def partly_explaining(mixes: dict[str, tuple[float, float, float, float]], baseline: float,
                      n_features: int) -> tuple[str | None, float, str]:
    """The one transform that explains a share of the window (one client of several sending it).

    Named when its mixture fits (d of the means and of the log variances below PARTIAL_FIT, no z²
    above FIT_MAX), it explains at least
    MIN_PARTIAL of the window, the summed z² drops by at least PARTIAL_GAIN from `baseline` (the
    window against golden, d·features: a likelihood-ratio-like margin for one fitted share), and
    it drops by at least PARTIAL_MARGIN more than with any other candidate (a flip explains part
    of a rotation by 180°: the better one must be clearly better).
    """
    gains = sorted(((baseline - d) * n_features, k) for k, (d, sh, zmax, dv) in mixes.items()
                   if d < PARTIAL_FIT and dv < PARTIAL_FIT and zmax < FIT_MAX and sh >= MIN_PARTIAL)
    if not gains or gains[-1][0] < PARTIAL_GAIN:
        return None, 0.0, "no candidate transform explains a share of the window"
    gain, best = gains[-1]
    if len(gains) > 1 and gains[-2][0] + PARTIAL_MARGIN > gain:
        return None, 0.0, f"{best} and {gains[-2][1]} explain a share of the window about equally: not named"
    d, sh, _, _ = mixes[best]
    return best, sh, (f"{best} of the golden inputs explains about {sh:.0%} of the window (mixture d={d:.3g} vs "
                      f"{baseline:.3g} without it)")


def explaining(cands: dict[str, tuple[float, float | None, float]]) -> tuple[str | None, str]:
    """The one candidate transform that explains a window, or None, with the reason.

    A candidate fits when its d is below FIT, FIT_RATIO times below the untransformed d, and no
    single feature is off by more than FIT_MAX in z² (a mean over many features can hide a few
    grossly wrong ones: a rotation by 90° looks like a transpose in every orientation-free
    feature); FIT_MAX_FITTED for a candidate whose factor or offset is estimated from the
    window's extremes, which is not exact and moves every feature a little. When a second candidate also fits within AMBIGUITY times the best d, the window
    does not tell them apart, and no transform is named. The affine `normalization_mismatch` is
    named only when it fits as closely as an exact transform (d below AFFINE_FIT, no z² above
    FIT_MAX), and dropped when one of its special cases (AFFINE_SPECIAL) fits within AMBIGUITY of
    its d (or within AFFINE_MARGIN of it): the
    simpler name is the more useful one (x·255 is `multiply`, not "some normalisation").
    """
    d_id = cands["identity"][0]
    if len(cands) < 2:
        return None, "no candidate transforms"
    fit = sorted((v[0], k) for k, v in cands.items()
                 if k != "identity" and v[0] < FIT and v[0] * FIT_RATIO < d_id
                 and v[2] < (FIT_MAX if k not in FITTED else FIT_MAX_FITTED)
                 and (k != "normalization_mismatch" or (v[0] < AFFINE_FIT and v[2] < FIT_MAX)))
    aff = [d for d, k in fit if k == "normalization_mismatch"]
    if aff and any(k in AFFINE_SPECIAL and d < max(AMBIGUITY * aff[0], aff[0] + AFFINE_MARGIN) for d, k in fit):
        fit = [(d, k) for d, k in fit if k != "normalization_mismatch"]
    if not fit:
        best = min((k for k in cands if k != "identity"), key=lambda k: cands[k][0])
        return None, f"no candidate transform fits (best {best}: d={cands[best][0]:.3g}, largest z²=" \
                     f"{cands[best][2]:.3g}; untransformed d={d_id:.3g})"
    (d_best, best), rest = fit[0], fit[1:]
    if rest and rest[0][0] < AMBIGUITY * d_best:
        return None, f"{best} and {rest[0][1]} fit about equally (d={d_best:.3g} vs {rest[0][0]:.3g}): not named"
    return best, f"{best} of the golden inputs reproduces the window (d={d_best:.3g} vs {d_id:.3g} untransformed)"


def _violating_transform(diagnoser: Diagnoser, window_features: np.ndarray, violating: np.ndarray | None,
                         feature_violating: np.ndarray | None
                         ) -> tuple[str | None, float | None, dict[str, list[float]] | None, str, float | None]:
    """The transform of the window's contract-violating samples alone, when one fits (at least 5 of
    them): (name, fitted parameter, affine map, its sentence, share of the window it explains)."""
    transform, p, affine, text = None, None, None, ""
    bad = np.asarray(violating if feature_violating is None else feature_violating, bool)
    if len(bad) == len(window_features) and bad.sum() >= 5:
        sub = diagnoser.search(window_features[bad])
        transform, _ = explaining(sub)
        p = None if transform is None else sub[transform][1]
        if transform == "normalization_mismatch":
            affine, text = diagnoser.affine_report(window_features[bad])
        elif transform is not None:
            text = diagnoser.describe(transform, window_features[bad], p)
    # the share of the window the violating samples' transform explains, with T fitted on them (an
    # affine map, a factor, an offset, a blur σ), not on the whole window, whose extremes and means
    # are a mixture's
    ts = None if transform is None else diagnoser.transformed_share(transform, window_features, affine,
                                                                    fit_features=window_features[bad])
    return transform, p, affine, text, ts


def diagnose(alarm: bool, detectors: list[Any] | tuple[Any, ...], *, diagnoser: Diagnoser | None = None,
             window_features: np.ndarray | None = None,
             violating: np.ndarray | None = None, predicted: np.ndarray | None = None,
             golden_predicted_shares: np.ndarray | None = None, input_effects: dict[str, float] | None = None,
             contract_share: float = CONTRACT_SHARE, outside_share: float | None = None,
             feature_violating: np.ndarray | None = None, answers: Any = None,
             score_shift_p: Any = None) -> Diagnosis:
    """The diagnosis of one window (see the module docstring for the rules).

    `violating` flags every row of the window (its share is the contract share); `feature_violating`
    flags the rows of `window_features` (rows without usable features dropped), when that differs.
    `answers` (a `support.AnswerCheck`) and `score_shift_p` ((KS D, p) of the confidence given the
    predicted class against golden's) tell an output shift from a prior shift; either may be a
    function returning it, called only when the window gets that far.
    """
    alarming = {r.name: r.feature for r in detectors if r.alarm}
    shift: dict[str, float] = {}
    if predicted is not None and golden_predicted_shares is not None and len(predicted):
        k = len(golden_predicted_shares)
        q = np.bincount(np.asarray(predicted, np.int64), minlength=k)[:k] / len(predicted)
        delta = q - np.asarray(golden_predicted_shares)
        for i in np.argsort(-np.abs(delta))[:3]:
            shift[str(int(i))] = round(float(delta[i]), 4)
    share = None if violating is None or len(violating) == 0 else float(np.mean(violating))
    common: dict[str, Any] = {"input_effects": dict(input_effects or {}), "class_shift": shift, "detectors": alarming,
              "contract_violating_share": share}
    if not alarm:
        if share is not None and share >= contract_share:
            # Samples the contract refuses (non-finite values, wrong range, ...) may never reach the
            # detectors (non-finite outputs are dropped), so a window of them cannot alarm: say so,
            # with the transform of the violating samples when one fits (a few clients of many
            # normalising some other way: too few to move the detectors, enough to name)
            transform, p, affine, text, ts = (None, None, None, "", None) if diagnoser is None \
                or window_features is None else _violating_transform(diagnoser, window_features, violating,
                                                                      feature_violating)
            return Diagnosis("input_contract", transform, p, affine=affine, transformed_share=ts,
                             reason=f"{share:.1%} of the window's samples violate the input contract (the drift "
                                    "detectors did not alarm)" + (f": {text}" if text else ""), **common)
        return Diagnosis("none", reason="the combined verdict did not alarm", **common)
    have_inputs = diagnoser is not None and window_features is not None and len(window_features) >= 2
    if not have_inputs:
        kind = "prior_shift" if set(alarming) <= {"label"} and alarming else "covariate_shift"
        if share is not None and share >= contract_share:
            kind = "input_contract"
        return Diagnosis(kind, reason="no input signatures in the window; decided from the detectors", **common)
    assert diagnoser is not None and window_features is not None
    moved = distance(Moments.of(window_features), diagnoser.reweighted(predicted), diagnoser.scale)
    cands = diagnoser.search(window_features)
    best, why = explaining(cands)
    top = dict(sorted(((k, round(v[0], 3)) for k, v in cands.items()), key=lambda kv: kv[1])[:4])
    # A transform that fits far better than golden reweighted to the window's predicted classes is
    # named even when that reweighting leaves the inputs only a little moved: the predicted classes
    # are the transformed inputs' (a BGR client's), so the reweighting partly absorbs the transform.
    if best is not None and (moved > MOVED or cands[best][0] * FIT_RATIO < moved):
        affine, text = diagnoser.affine_report(window_features) if best == "normalization_mismatch" else (
            None, diagnoser.describe(best, window_features, cands[best][1]))
        return Diagnosis("preprocessing_mismatch", best, cands[best][1], round(moved, 3), top, affine=affine,
                         reason=why + (f": {text}" if text else ""),
                         transformed_share=diagnoser.transformed_share(best, window_features, affine), **common)
    if share is not None and share >= contract_share:
        transform, p, affine, text, ts = _violating_transform(diagnoser, window_features, violating,
                                                              feature_violating)
        return Diagnosis("input_contract", transform, p, round(moved, 3), top, affine=affine,
                         reason=f"{share:.1%} of the window's samples violate the input contract"
                                + (f": {text}" if text else ""),
                         transformed_share=ts, **common)
    mixes = diagnoser.mixtures(window_features)
    part, sh, why_part = partly_explaining(mixes, min(cands["identity"][0], moved), len(diagnoser.golden.mean))
    tl = diagnoser.transform_like
    if part is not None and tl is not None:
        # the mixture fits the window's mean signature; the rows one by one must bear it out (a share
        # of the window translated by a pixel has the means of a smaller share flipped, and no row
        # looks flipped)
        ok, flagged, expected = tl.corroborates(part, sh, window_features)
        if not ok:
            why = (f"{part} would explain about {sh:.0%} of the window by its means, but only {flagged} of its "
                   f"samples look like {part} of a golden sample (about {expected:.0f} expected): not named; {why}")
            part = None
    if part is not None:
        return Diagnosis("preprocessing_mismatch", part, None, round(moved, 3), top, reason=why_part,
                         transformed_share=round(sh, 4), **common)
    outside = outside_share is not None and outside_share > OUTSIDE
    if moved > MOVED or outside or ("input_stats" in alarming and ("label" not in alarming or moved > MOVED_LOW)):
        # inputs moved beyond what the class shares explain, or a share of them left the golden support
        # (support.outside_share, class-reweighted); or the input statistics moved and either the class
        # mix did not (the label test would see it) or it does not explain them either
        if outside and moved <= MOVED:
            why = f"{outside_share:.0%} or more of the window lies outside the golden support; {why}"
        return Diagnosis("covariate_shift", None, None, round(moved, 3), top,
                         reason=f"inputs moved (d={moved:.3g} against golden reweighted to the window's classes) "
                                f"and no one candidate transform explains them: {why}", **common)
    # A prior shift leaves what the model answers for an input as it was: its classes for inputs like
    # golden's (support.AnswerCheck), and its confidence given its class (score_shift_p). When either moved
    # for inputs that match golden, the answers changed, not the class mix: another model, a label map,
    # a calibration. With input statistics that moved as well, it is not called that: the inputs moved.
    unexplained = []
    answers = answers() if callable(answers) else answers
    if answers is not None and answers.inconsistent:
        unexplained.append(f"{answers.observed:.0%} of the answers differ from the class the golden neighbours "
                           f"of their inputs have ({answers.expected:.0%} expected; {answers.space} space)")
    if alarming.keys() - {"label"} and callable(score_shift_p):
        score_shift_p = score_shift_p()
    if score_shift_p is not None and not callable(score_shift_p) and score_shift_p[1] < ANSWER_SHIFT_P \
            and score_shift_p[0] >= ANSWER_SHIFT_D and alarming.keys() - {"label"}:
        unexplained.append(f"the confidence given the predicted class is not golden's (KS D={score_shift_p[0]:.2f}, "
                           f"p={score_shift_p[1]:.2g})")
    if unexplained:
        what = " and ".join(unexplained)
        if "input_stats" in alarming and moved > MOVED_LOW:
            return Diagnosis("covariate_shift", None, None, round(moved, 3), top,
                             reason=f"the input statistics moved (d={moved:.3g}) and {what}: not only the class "
                                    f"mix; {why}", **common)
        return Diagnosis("output_shift", None, None, round(moved, 3), top,
                         reason=f"inputs match golden reweighted to the window's predicted classes (d={moved:.3g}), "
                                f"but {what}: the answers no longer follow the inputs as they do on golden (another "
                                "model version, calibration or label map; or inputs changed in a way the input "
                                "checks do not see)", **common)
    return Diagnosis("prior_shift", None, None, round(moved, 3), top,
                     reason=f"inputs match golden reweighted to the window's predicted classes (d={moved:.3g}); "
                            "the class shares moved", **common)
