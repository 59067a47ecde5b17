"""Which requests are copied for analysis: a rate, a per-second cap and a byte cap per model."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from sentinel.config import SamplingConfig


class Sampler:
    """Bernoulli sampling at `rate`, then a token bucket of `max_per_second` (burst of one second)."""

    __slots__ = ("rate", "max_per_second", "max_bytes", "_tokens", "_last", "_random", "_clock")

    def __init__(self, cfg: SamplingConfig, rng: random.Random | None = None, clock=time.monotonic):
        self.rate = cfg.rate
        self.max_per_second = cfg.max_per_second
        self.max_bytes = cfg.max_bytes
        self._tokens = float(cfg.max_per_second)
        self._clock = clock
        self._last = clock()
        self._random = (rng or random.Random()).random

    def decide(self, content_length: int | None) -> str | None:
        """None to skip silently, "sample" to capture, or "oversize"/"rate_limited" to count a skip."""
        if self.rate <= 0.0 or (self.rate < 1.0 and self._random() >= self.rate):
            return None
        now = self._clock()
        self._tokens = min(self.max_per_second, self._tokens + (now - self._last) * self.max_per_second)
        self._last = now
        if self._tokens < 1.0:
            return "rate_limited"
        if content_length is not None and content_length > self.max_bytes:
            return "oversize"
        self._tokens -= 1.0
        return "sample"

    def state(self) -> dict:
        return {"rate": self.rate, "max_per_second": self.max_per_second, "max_bytes": self.max_bytes,
                "tokens": round(self._tokens, 2)}


@dataclass(frozen=True, slots=True)
class Sample:
    """A copied request/response pair on its way to the analysis worker (picklable)."""

    model: str
    protocol: str
    request_headers: dict[str, str]   # only the headers decoders read, never auth or cookies
    request_body: bytes
    response_headers: dict[str, str]
    response_body: bytes
    source: str = "proxy"
    request_id: str | None = None
    timestamp: float = 0.0


# Headers a decoder may need; everything else (authorization, cookies...) stays in the proxy.
DECODER_HEADERS = (b"content-type", b"inference-header-content-length")
