"""Synthetic dataset shifts on raw images (N×H×W, values in [lo, hi]) for evaluating detectors.

After Failing Loudly (Rabanser et al. 2019): Gaussian noise, affine image transforms, intensity
changes and class knock-out (the last acts on which samples are drawn, see `knockout_weights`).
Pure numpy/scipy; every random draw comes from the `rng` passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

Family = Literal["noise", "image", "intensity", "label", "confidently_wrong", "mismatch"]


def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator, lo: float = 0.0,
                   hi: float = 16.0) -> np.ndarray:
    """Add N(0, std²) per pixel, clipped back to the raw range."""
    return np.clip(x + rng.normal(0.0, std, size=x.shape), lo, hi).astype(np.float32)


def affine(x: np.ndarray, rng: np.random.Generator, *, rotation: float = 0.0, zoom: tuple[float, float] = (1.0, 1.0),
           shear: float = 0.0) -> np.ndarray:
    """Per image: rotate by U(−rotation, rotation) degrees, scale by U(zoom), shear by ±shear, about the centre."""
    from scipy.ndimage import affine_transform

    out = np.empty_like(x, dtype=np.float32)
    c = (np.array(x.shape[1:], dtype=np.float64) - 1) / 2
    for i, img in enumerate(x):
        a = np.deg2rad(rng.uniform(-rotation, rotation))
        s = rng.uniform(*zoom)
        sh = shear * rng.choice([-1.0, 1.0])
        fwd = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1.0, sh], [0.0, 1.0]]) * s
        inv = np.linalg.inv(fwd)                       # affine_transform maps output coords to input coords
        out[i] = affine_transform(img.astype(np.float64), inv, offset=c - inv @ c, order=1, mode="constant")
    return out


def intensity(x: np.ndarray, scale: float, offset: float, lo: float = 0.0, hi: float = 16.0) -> np.ndarray:
    """x·scale + offset, clipped to the raw range (brightness: scale 1; contrast: scale < 1)."""
    return np.clip(x * scale + offset, lo, hi).astype(np.float32)


@dataclass(frozen=True)
class Shift:
    """A named shift of raw images; `apply` is None for knock-out, which changes sampling instead."""

    name: str
    family: Family
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None
    expected: str | None = None      # the transform a diagnosis should name (mismatch family)


# Intensities on the digits' 0–16 scale. The contrast shift x·0.5+6 leaves the model confidently
# wrong (it is reported apart: no confidence-based estimator can see it).
DIGITS_SHIFTS: tuple[Shift, ...] = (
    Shift("noise_small", "noise", lambda x, r: gaussian_noise(x, 2.0, r)),
    Shift("noise_medium", "noise", lambda x, r: gaussian_noise(x, 4.0, r)),
    Shift("noise_large", "noise", lambda x, r: gaussian_noise(x, 6.0, r)),
    Shift("rotation_40", "image", lambda x, r: affine(x, r, rotation=40.0)),
    Shift("zoom_0.7", "image", lambda x, r: affine(x, r, zoom=(0.65, 0.8))),
    Shift("shear_0.4", "image", lambda x, r: affine(x, r, shear=0.4)),
    Shift("brightness_+3", "intensity", lambda x, r: intensity(x, 1.0, 3.0)),
    Shift("contrast_x0.7", "intensity", lambda x, r: intensity(x, 0.7, 0.0)),
    Shift("contrast_x0.5+6", "confidently_wrong", lambda x, r: intensity(x, 0.5, 6.0)),
    Shift("knockout", "label", None),
)


def knockout_weights(labels: np.ndarray, cls: int, fraction: float) -> np.ndarray:
    """Sampling weights that remove `fraction` of class `cls` (Failing Loudly's knock-out shift)."""
    w = np.ones(len(labels), dtype=np.float64)
    w[np.asarray(labels) == cls] = 1.0 - fraction
    weights: np.ndarray = w / w.sum()
    return weights


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each N×H×W image (σ in pixels, zero padding)."""
    from scipy.ndimage import gaussian_filter

    out: np.ndarray = gaussian_filter(np.asarray(x, np.float32), sigma=(0, sigma, sigma), mode="constant")
    return out


# Client-side preprocessing mistakes (the top real-world failure of a served classifier), on the
# digits' raw 0–16 scale; `expected` is the transform `sentinel.drift.diagnosis` should name.
MISMATCH_SHIFTS: tuple[Shift, ...] = (
    Shift("scale_0-255", "mismatch", lambda x, r: (x * (255.0 / 16.0)).astype(np.float32), "multiply"),
    Shift("divided_by_16", "mismatch", lambda x, r: (x / 16.0).astype(np.float32), "divide"),
    Shift("inverted", "mismatch", lambda x, r: (16.0 - x).astype(np.float32), "invert"),
    Shift("transposed", "mismatch", lambda x, r: np.ascontiguousarray(np.swapaxes(x, 1, 2)), "transpose"),
    Shift("flip_horizontal", "mismatch", lambda x, r: np.ascontiguousarray(x[:, :, ::-1]), "flip_horizontal"),
    Shift("flip_vertical", "mismatch", lambda x, r: np.ascontiguousarray(x[:, ::-1, :]), "flip_vertical"),
    Shift("offset_+2", "mismatch", lambda x, r: (x + 2.0).astype(np.float32), "offset"),
    Shift("binarized", "mismatch", lambda x, r: np.where(x > 8.0, 16.0, 0.0).astype(np.float32), "binarize"),
    Shift("blur_1", "mismatch", lambda x, r: blur(x, 1.0), "blur"),
)
