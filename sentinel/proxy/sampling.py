"""Which requests are copied for analysis: a rate, a per-second cap and a byte cap per model."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

from sentinel.config import SamplingConfig


class Sampler:
    """Bernoulli sampling at `rate`, then a token bucket of `max_per_second` (burst of one second)."""

    __slots__ = ("rate", "max_per_second", "max_bytes", "_tokens", "_burst", "_last", "_random", "_clock")

    def __init__(self, cfg: SamplingConfig, rng: random.Random | None = None, clock=time.monotonic):
        self.rate = cfg.rate
        self.max_per_second = cfg.max_per_second
        self.max_bytes = cfg.max_bytes
        # the bucket holds at least one sample: a cap below 1/s (0.5: one every 2 s) never reached 1 token
        self._burst = max(1.0, float(cfg.max_per_second))
        self._tokens = self._burst
        self._clock = clock
        self._last = clock()
        self._random = (rng or random.Random()).random

    def decide(self, content_length: int | None) -> str | None:
        """None to skip silently, "sample" to capture, or "oversize"/"rate_limited" to count a skip."""
        if self.rate <= 0.0 or (self.rate < 1.0 and self._random() >= self.rate):
            return None
        if not self._has_budget():
            return "rate_limited"
        if content_length is not None and content_length > self.max_bytes:
            return "oversize"
        self._spend()
        return "sample"

    def _has_budget(self) -> bool:
        """Refill the bucket to now; whether it holds a whole sample (`_spend` takes it)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self.max_per_second)
        self._last = now
        return self._tokens >= 1.0

    def _spend(self) -> None:
        self._tokens -= 1.0

    def state(self) -> dict:
        return {"rate": self.rate, "max_per_second": self.max_per_second, "max_bytes": self.max_bytes,
                "tokens": round(self._tokens, 2)}


@dataclass(frozen=True, slots=True)
class Sample:
    """A copied request/response pair on its way to the analysis worker (picklable).

    A body captured in several reads may be the tuple of its pieces: they are joined in the
    worker (`joined`), not on the proxy's event loop (8 MB: ~10 ms of copying), and pickled to
    the worker's pipe without a copy (analysis._Frame).
    """

    model: str
    protocol: str
    request_headers: dict[str, str]   # only the headers decoders read, never auth or cookies
    request_body: bytes   # or a tuple of pieces, see above
    response_headers: dict[str, str]
    response_body: bytes   # or a tuple of pieces
    source: str = "proxy"
    request_id: str | None = None
    timestamp: float = 0.0

    def size(self) -> int:
        """Bytes of both bodies."""
        return _length(self.request_body) + _length(self.response_body)

    def joined(self) -> Sample:
        """This sample with each body in one bytes object (itself when they already are)."""
        if type(self.request_body) is bytes and type(self.response_body) is bytes:
            return self
        return replace(self, request_body=_join(self.request_body), response_body=_join(self.response_body))


def _length(body: bytes | tuple[bytes, ...]) -> int:
    return len(body) if type(body) is bytes else sum(map(len, body))


def _join(body: bytes | tuple[bytes, ...]) -> bytes:
    return body if type(body) is bytes else b"".join(body)   # type: ignore[return-value,arg-type]


def _pieces(chunks: list[bytes]) -> bytes:
    """A captured body: its one piece, or the tuple of its pieces (joined by the worker)."""
    if len(chunks) == 1:
        return chunks[0] if type(chunks[0]) is bytes else bytes(chunks[0])   # a view of a read: copied
    return tuple(c if type(c) is bytes else bytes(c) for c in chunks) if chunks else b""   # type: ignore[return-value]


# Headers a decoder may need; everything else (authorization, cookies...) stays in the proxy.
DECODER_HEADERS = (b"content-type", b"inference-header-content-length", b"content-encoding")


class Capture:
    """The copy of one sampled exchange: request and response bodies up to the sampler's byte cap."""

    __slots__ = ("model", "protocol", "cap", "req", "req_bytes", "resp", "resp_bytes", "req_headers",
                 "resp_headers")

    def __init__(self, model: str, protocol: str, cap: int):
        self.model = model           # the configured model name
        self.protocol = protocol
        self.cap = cap
        self.req: list[bytes] = []
        self.req_bytes = 0
        self.resp: list[bytes] | None = None   # set once a 200 response head arrives
        self.resp_bytes = 0
        self.req_headers: dict[str, str] = {}
        self.resp_headers: dict[str, str] = {}

    def request_body(self, chunk: bytes) -> bool:
        """Keep a request body chunk; False when the cap is passed (the capture is then useless)."""
        self.req_bytes += len(chunk)
        if self.req_bytes > self.cap:
            return False
        self.req.append(chunk)
        return True

    def request_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        for n, v in headers:
            ln = n.lower()
            if ln in DECODER_HEADERS:
                self.req_headers[ln.decode()] = v.decode("latin-1")

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status != 200:
            return
        self.resp = []
        for n, v in headers:
            ln = n.lower()
            if ln in DECODER_HEADERS:
                self.resp_headers[ln.decode()] = v.decode("latin-1")

    def response_body(self, chunk: bytes) -> bool:
        """Keep a response body chunk; False when the cap is passed."""
        if self.resp is None:
            return True
        self.resp_bytes += len(chunk)
        if self.resp_bytes > self.cap:
            return False
        self.resp.append(chunk)
        return True

    def sample(self, request_id: str | None) -> Sample | None:
        """The finished sample, or None when the response was not a 200."""
        if self.resp is None:
            return None
        return Sample(self.model, self.protocol, self.req_headers, _pieces(self.req), self.resp_headers,
                      _pieces(self.resp), "proxy", request_id, time.time())
