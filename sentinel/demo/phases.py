"""The demo's traffic phases and the input shifts they apply."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Shift = Literal["none", "noise", "rotation"]
Incident = Literal["drift", "latency", "errors"]


@dataclass(frozen=True)
class Phase:
    """A stretch of traffic with one condition."""

    name: str
    seconds: float
    shift: Shift = "none"
    delay_ms: float = 0.0        # added by the model server
    error_ratio: float = 0.0     # 5xx from the model server
    incident: Incident | None = None


def default_phases(scale: float = 1.0) -> tuple[Phase, ...]:
    """Normal, noise drift, rotation drift, latency incident, error incident, recovery (150 s at scale 1)."""
    s = scale
    return (
        Phase("normal", 35 * s),
        Phase("drift: noise", 25 * s, shift="noise", incident="drift"),
        Phase("drift: rotation", 20 * s, shift="rotation", incident="drift"),
        Phase("latency incident", 25 * s, delay_ms=250, incident="latency"),
        Phase("error incident", 20 * s, error_ratio=0.3, incident="errors"),
        Phase("recovery", 25 * s),
    )


PHASE_KEYS = ("normal", "noise", "rotation", "latency", "errors", "recovery")


def phases_from_options(scale: float = 1.0, durations: str | None = None) -> tuple[Phase, ...]:
    """The demo's phases from `--scale` and `--durations normal=35,noise=25,...` (UsageError when malformed).

    `--scale` multiplies the default durations; `--durations` sets phases by key (its values are
    seconds, not scaled). Every duration must be a finite positive number.
    """
    from sentinel.errors import UsageError

    if not math.isfinite(scale) or scale <= 0:
        raise UsageError(f"--scale must be a positive factor (0.2 for a quick run), got {scale:g}")
    phases = default_phases(scale)
    if durations is None:
        return phases
    given: dict[str, float] = {}
    for part in durations.split(","):
        key, sep, val = (x.strip() for x in part.partition("="))
        if not sep or not key or not val:
            raise UsageError(f"--durations: {part.strip()!r} is not phase=seconds "
                             f"(e.g. normal=35,noise=25); phases: {', '.join(PHASE_KEYS)}")
        if key not in PHASE_KEYS:
            raise UsageError(f"--durations: unknown phase {key!r}; phases: {', '.join(PHASE_KEYS)}")
        if key in given:
            raise UsageError(f"--durations: phase {key!r} given twice")
        try:
            seconds = float(val)
        except ValueError:
            raise UsageError(f"--durations: {key}={val!r} is not a number of seconds") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise UsageError(f"--durations: {key}={val} must be a positive number of seconds")
        given[key] = seconds
    return tuple(replace(p, seconds=given.get(k, p.seconds)) for k, p in zip(PHASE_KEYS, phases, strict=True))


def apply_shift(raw: np.ndarray, shift: Shift, rng: np.random.Generator) -> np.ndarray:
    """Shifted copies of 8×8 digit images on their 0–16 scale."""
    if shift == "none":
        return raw
    if shift == "noise":
        # Gaussian noise of std 5 on the 0–16 scale: a dirty sensor.
        return np.clip(raw + rng.normal(0.0, 5.0, raw.shape), 0, 16).astype(np.float32)
    if shift == "rotation":
        from scipy.ndimage import rotate

        out = np.empty_like(raw)
        for i, img in enumerate(raw):
            angle = float(rng.uniform(35, 60)) * (1 if rng.random() < 0.5 else -1)
            out[i] = np.clip(rotate(img, angle, reshape=False, order=1, mode="constant"), 0, 16)
        return out
    raise ValueError(f"unknown shift {shift!r}")
