"""Preprocessing from the raw form a server receives to the tensor the network sees.

Pure numpy, so the sidecar's analysis worker, the reference server, golden-set
building and drift evaluation all apply exactly the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """raw → scale → resize → center crop → normalize → layout NCHW float32."""

    scale: float = 1.0                     # multiply raw values first (e.g. 1/255, 1/16)
    resize: tuple[int, ...] | None = None  # (H, W) bilinear, align_corners=False
    crop: tuple[int, ...] | None = None    # (H, W) center crop after resize
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Literal["NCHW", "NHWC", "NHW"] = "NCHW"  # layout of the raw input

    def validate(self):
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            yield "resize", f"must be [height, width] of positive integers, got {list(self.resize)}"
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 1):
            yield "crop", f"must be [height, width] of positive integers, got {list(self.crop)}"
        if len(self.mean) != len(self.std):
            yield "std", f"has {len(self.std)} values but mean has {len(self.mean)}"
        if any(s <= 0 for s in self.std):
            yield "std", "every value must be positive"

    def apply(self, raw: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """Batch of raw inputs → N×C×H×W float32. `normalize=False` simulates a missing step."""
        x = np.asarray(raw, dtype=np.float32)
        if self.layout == "NHW":
            if x.ndim == 2:
                x = x[None]
            if x.ndim != 3:
                raise ValueError(f"expected raw input N×H×W, got shape {x.shape}")
            x = x[:, None]
        elif self.layout == "NHWC":
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4:
                raise ValueError(f"expected raw input N×H×W×C, got shape {x.shape}")
            x = x.transpose(0, 3, 1, 2)
        else:
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4:
                raise ValueError(f"expected raw input N×C×H×W, got shape {x.shape}")
        x = x * np.float32(self.scale)
        if self.resize is not None:
            x = resize_bilinear(x, int(self.resize[0]), int(self.resize[1]))
        if self.crop is not None:
            x = center_crop(x, int(self.crop[0]), int(self.crop[1]))
        if normalize:
            c = x.shape[1]
            mean = np.asarray(self.mean, np.float32)
            std = np.asarray(self.std, np.float32)
            if mean.size not in (1, c) or std.size not in (1, c):
                raise ValueError(self._channel_problem(raw, c, max(mean.size, std.size)))
            x = (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
        return np.ascontiguousarray(x, dtype=np.float32)


    def _channel_problem(self, raw: np.ndarray, c: int, want: int) -> str:
        """Why raw inputs cannot be normalised: channel count, naming the layout they were read in."""
        shape = tuple(np.shape(raw))
        axes = {"NHW": "N×H×W", "NHWC": "N×H×W×C", "NCHW": "N×C×H×W"}[self.layout]
        text = (f"raw inputs of shape {shape} read as {axes} ({self.layout}) have {c} channels, but the "
                f"preprocessing's mean/std have {want}")
        other = {"NHWC": (1, "N×C×H×W (NCHW)"), "NCHW": (-1, "N×H×W×C (NHWC)")}.get(self.layout)
        if other is not None and len(shape) == 4 and shape[other[0]] == want:
            text += f"; these look like {other[1]} images: send them in the model's layout, {axes}"
        return text


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).astype(np.float32)
    return lo, hi, w


def resize_bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of N×C×H×W (half-pixel centres, like torch align_corners=False)."""
    if x.shape[2] == h and x.shape[3] == w:
        return x
    y0, y1, wy = _axis_weights(x.shape[2], h)
    x0, x1, wx = _axis_weights(x.shape[3], w)
    top = x[:, :, y0, :] * (1 - wy)[None, None, :, None] + x[:, :, y1, :] * wy[None, None, :, None]
    return top[:, :, :, x0] * (1 - wx) + top[:, :, :, x1] * wx


def center_crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W = x.shape[2], x.shape[3]
    if h > H or w > W:
        raise ValueError(f"crop {h}×{w} is larger than the image {H}×{W}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[:, :, top:top + h, left:left + w]
