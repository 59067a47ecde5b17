"""Prometheus durations: parse `30d`/`4m40s`, format seconds back the way Prometheus writes them."""

from __future__ import annotations

import re

_UNITS: tuple[tuple[str, int], ...] = (
    ("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1),
)
_UNIT_SECONDS = dict(_UNITS)
_PART = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")


def parse_duration(text: str) -> int:
    """Whole seconds in a Prometheus duration such as `30d`, `1h30m` or `90s`.

    Raises ValueError with a sentence naming the problem. Milliseconds are refused:
    every window sentinel writes is a whole number of seconds.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a duration such as 30d, 6h or 90s, got {text!r}")
    pos = 0
    total = 0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        if match.group(2) == "ms":
            raise ValueError(f"durations are whole seconds, got {text!r}")
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"expected a duration such as 30d, 6h or 90s, got {text!r}")
    if total <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return total


def format_duration(seconds: int) -> str:
    """Prometheus spelling of a whole number of seconds, largest units first (`4m40s`).

    Years and weeks are not used, so `30d` stays `30d` rather than becoming `4w2d`.
    """
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {seconds}")
    parts: list[str] = []
    rest = int(seconds)
    for unit, size in _UNITS[2:]:
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)
