"""Cheap per-sample features drift is tested on: confidence scores and input statistics."""

from __future__ import annotations

import numpy as np

from sentinel import scores

CONFIDENCE_FEATURES = ("max_softmax", "entropy")


softmax = scores.softmax   # row-wise softmax of logits / temperature, float64 (the one in sentinel.scores)
softmax_entropy = scores.softmax_entropy


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Logits equivalent to given probabilities (log p; softmax(log p / T) = softmax(logits / T))."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-30, None))


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) per row."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-30, 1.0)
    h: np.ndarray = -(p * np.log(p)).sum(axis=1)
    return h


def confidence_features(probabilities: np.ndarray) -> np.ndarray:
    """N×2: max softmax probability and entropy of each prediction."""
    p = np.asarray(probabilities, dtype=np.float64)
    return np.stack([p.max(axis=1), entropy(p)], axis=1)


def input_feature_names(channels: int) -> tuple[str, ...]:
    """Names of `input_statistics` columns for images with `channels` channels."""
    names = [f"mean_c{c}" for c in range(channels)] + [f"std_c{c}" for c in range(channels)]
    if channels > 1:
        names += ["brightness", "contrast"]
    return tuple(names + ["sharpness"])


def input_statistics(x: np.ndarray) -> np.ndarray:
    """Per-sample statistics of N×C×H×W network inputs.

    Per channel: mean and standard deviation. With several channels also brightness (mean of
    all pixels) and contrast (RMS contrast: standard deviation of all pixels); with one channel
    those equal the channel's mean and std and are left out. Sharpness is the mean absolute
    difference between neighbouring pixels, which noise raises and blur lowers.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 4:
        raise ValueError(f"expected N×C×H×W inputs, got shape {a.shape}")
    n, c = a.shape[:2]
    flat = a.reshape(n, c, -1)
    # a row with NaN or ±inf (a contract violation, counted and dropped downstream) gets non-finite
    # statistics; inf − inf is expected there, not worth a RuntimeWarning in the daemon's log
    with np.errstate(invalid="ignore", over="ignore"):
        cols = [flat.mean(axis=2), flat.std(axis=2)]
        if c > 1:
            allpix = a.reshape(n, -1)
            cols += [allpix.mean(axis=1, keepdims=True), allpix.std(axis=1, keepdims=True)]
        gy = np.abs(np.diff(a, axis=2)).mean(axis=(1, 2, 3)) if a.shape[2] > 1 else np.zeros(n)
        gx = np.abs(np.diff(a, axis=3)).mean(axis=(1, 2, 3)) if a.shape[3] > 1 else np.zeros(n)
        cols.append(((gx + gy) / 2)[:, None])
    return np.concatenate(cols, axis=1)
