"""What every proxy connection shares: limits, timeouts, pool, metrics, sampling, one deadline sweep.

The proxy's connection state machine has one owner: `ClientConnection` (server.py) holds
the state of a client connection and its exchanges, and `ClientConnection.check_deadlines`
is the one place every timeout is decided. No connection arms a timer of its own: each
records when it last made progress, and `ProxyContext.sweep` (run every `Limits.tick`
seconds) asks every connection whether a deadline has passed. That keeps the hot path
free of timer allocations and puts each timeout in one function.

Timeouts (all from `ProxyConfig`, defaults after nginx and Envoy's edge settings):

    request head   first byte of a head → its end                 408, close
    body idle      between two reads of a request body             408, close (upstream dropped)
    upstream TTFB  end of the request → the response head          504
    upstream idle  between two reads of the response body          cut, code "incomplete"
    send           a client leaving response bytes unread          cut, code "incomplete"
    keep-alive     an idle connection between requests             close
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sentinel import metricnames as mn
from sentinel.config import ProxyConfig
from sentinel.fdlimit import raise_open_files
from sentinel.proxy import http, tracing
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.sampling import Sample, Sampler
from sentinel.proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from sentinel.proxy.exchange import Exchange
    from sentinel.proxy.server import ClientConnection

log = logging.getLogger("sentinel.proxy")

# The code label of a response whose head reached the client but whose body did not reach
# it complete (upstream reset, timeout or bad framing mid-body, slow reader cut off). The
# availability SLI counts it as bad, like a 5xx; see README "Honest status codes".
INCOMPLETE = mn.CODE_INCOMPLETE
CLIENT_CLOSED = mn.CODE_CLIENT_CLOSED   # nginx's code: the client closed before its response was complete
BURST_WINDOW_S = 60.0   # a kind of failure is logged at most once per window


class ClientSide(Protocol):
    """What an Exchange may do to its client connection (server.ClientConnection; fakes in tests)."""

    transport: Any            # the client's asyncio transport
    eof: bool                 # the client half-closed
    write_blocked_at: float   # non-zero while the client is not draining our writes
    paused: set[str]          # why reading from the client is paused (empty: reading)
    fin_early: bool           # the client sent FIN before its answer (counted after server._confirm)

    def write(self, data: bytes) -> None: ...
    def writelines(self, data: Iterable[bytes]) -> None: ...
    def send(self, out: list) -> None: ...
    def pause_reading(self, reason: str) -> None: ...
    def resume_reading(self, reason: str) -> None: ...
    def exchange_finished(self, ex: Exchange) -> None: ...
    def defer_record(self, ex: Exchange) -> None: ...
    def reset_by_peer(self) -> bool: ...
    def peer_shut(self) -> bool: ...
    def take_back(self, first: bytes) -> bool: ...
    def abort(self) -> None: ...


class UpstreamSide(Protocol):
    """What an Exchange may do to its upstream connection (upstream.UpstreamConnection; fakes in tests)."""

    exchange: Exchange | None
    until_close: bool

    def write(self, data: bytes) -> None: ...
    def writelines(self, data: Iterable[bytes]) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Timeouts and size limits of one listener, in seconds and bytes."""

    head_timeout: float = 10.0
    body_idle: float = 60.0
    ttfb: float = 30.0
    upstream_idle: float = 60.0
    send_timeout: float = 60.0
    keepalive_idle: float = 75.0
    max_line: int = 8192
    max_head: int = 65536
    max_headers: int = 100
    max_connections: int = 4096
    retry_after: int = 1

    @classmethod
    def from_config(cls, p: ProxyConfig, *, admin: bool = False) -> Limits:
        return cls(head_timeout=p.request_head_timeout_s, body_idle=p.body_idle_timeout_s,
                   ttfb=p.upstream_timeout_s, upstream_idle=p.upstream_idle_timeout_s,
                   send_timeout=p.send_timeout_s, keepalive_idle=p.client_idle_timeout_s,
                   max_line=p.max_request_line_bytes, max_head=p.max_header_bytes, max_headers=p.max_headers,
                   max_connections=p.admin_max_connections if admin else p.max_connections,
                   retry_after=p.shed_retry_after_s)

    @property
    def tick(self) -> float:
        """How often deadlines are checked: a quarter of the shortest timeout, within [0.05, 1] s."""
        shortest = min(self.head_timeout, self.body_idle, self.ttfb, self.upstream_idle,
                       self.send_timeout, self.keepalive_idle)
        return min(1.0, max(0.05, shortest / 4))

    def shed_response(self) -> bytes:
        """The 503 a connection over the budget gets before it is closed."""
        return http.error_response(503, "connection_limit",
                                   f"over the limit of {self.max_connections} connections; retry later",
                                   keep_alive=False, extra=[(b"retry-after", b"%d" % self.retry_after)])


class BurstLog:
    """Logs a kind of failure at most once per window, with the count seen in between."""

    def __init__(self, logger: logging.Logger, window_s: float = BURST_WINDOW_S, clock=time.monotonic):
        self._log = logger
        self._window = window_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, kind: str, message: str) -> bool:
        """Log unless `kind` was logged within the window; returns whether it logged."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self._window:
            self._last[kind] = (last[0], last[1] + 1)
            return False
        more = f" ({last[1]} more since the last report)" if last and last[1] else ""
        self._log.warning("%s: %s%s; counted in sentinel_proxy_errors_total{reason=%r}, logged at most "
                          "once per %.0f s", kind, message, more, kind, self._window)
        self._last[kind] = (now, 0)
        return True


class ErrorCounter:
    """`sentinel_proxy_errors_total{reason}` with its children bound once per reason."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: Any):
        self._metric = metric
        self._children: dict[str, Any] = {}

    def inc(self, reason: str) -> None:
        c = self._children.get(reason)
        if c is None:
            c = self._children[reason] = self._metric.labels(reason)
        c.inc()


class ProxyContext:
    """What every connection shares: pool, metrics, samplers, limits, tracer, the deadline sweep."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, pool: UpstreamPool, metrics: ProxyMetrics,
                 max_body: int, upstream_timeout: float | None = None,
                 samplers: dict[str, tuple[str, Sampler]], submit: Callable[[Sample], None],
                 tracer: tracing.SpanExporter | None = None, limits: Limits | None = None):
        self.loop = loop
        self.pool = pool
        self.metrics = metrics
        self.max_body = max_body
        if limits is None:
            limits = Limits() if upstream_timeout is None else Limits(ttfb=upstream_timeout)
        self.limits = limits
        pool.max_head = limits.max_line + limits.max_head   # response heads: the same bound as requests'
        self.upstream_timeout = limits.ttfb
        self.samplers = samplers              # path model name → (configured name, sampler)
        self.submit_sample = submit
        self.tracer = tracer
        self.draining = False
        self.outbox = pool.outbox   # one outbox: a read on either side batches writes to both
        self.connections: set[ClientConnection] = set()
        self.errors = ErrorCounter(metrics.proxy_errors)
        self.burst = BurstLog(log)
        self.shed_bytes = limits.shed_response()
        self.shedding = 0   # connections refused and lingering until closed
        self.routes: dict[bytes, tuple] = {}   # request target → (protocol, model label, sampler) (server._target)

    def count_sample(self, model: str | None, outcome: str) -> None:
        self.metrics.samples.labels(model or "none", outcome).inc()

    def fail(self, reason: str, message: str) -> None:
        """Count a failure by reason and log it once per burst."""
        self.errors.inc(reason)
        self.burst.warn(reason, message)

    def log_once(self, kind: str, message: str) -> None:
        """Log a kind of failure at most once per burst; counters carry the rest."""
        self.burst.warn(kind, message)

    def sweep(self, now: float | None = None) -> None:
        """Apply every deadline that has passed (see the module docstring)."""
        if now is None:
            now = self.loop.time()
        lim = self.limits
        for c in list(self.connections):
            c.check_deadlines(now, lim)

    async def run_sweeper(self) -> None:
        tick = self.limits.tick
        while True:
            await asyncio.sleep(tick)
            try:
                self.sweep()
            except Exception:  # a bug here must not stop every timeout for good
                log.exception("deadline sweep failed")

    def traceparent(self, ex: Exchange) -> bytes:
        # ex.span_id holds the forwarded tail, "<span id>-<flags>": the caller's sampled flag
        # is passed on (a 00 must not become 01 at the model server)
        if ex.trace_id is None:
            parsed = tracing.parse_traceparent(ex.incoming_tp) if ex.incoming_tp else None
            if parsed is None:
                # a new trace: a tracestate without a valid traceparent is discarded (W3C trace context, processing model)
                ex.tracestate = None
            if self.tracer is not None:
                # the span starts when the request arrived, not when the upstream was reached
                ex.span, ex.trace_id, span_id = self.tracer.start(
                    f"{ex.method.decode()} {ex.protocol}", ex.incoming_tp if parsed else None,
                    tracing.epoch_ns(ex.t0))
                ex.span_id = f"{span_id}-{self.tracer.span_flags(ex.span)}"
            elif parsed:
                ex.trace_id = parsed[0]
                ex.span_id = f"{tracing.new_span_id()}-{tracing.sampled_flags(parsed[2])}"
            else:
                ex.trace_id = tracing.new_trace_id()
                ex.span_id = tracing.new_span_id() + "-01"
        return f"00-{ex.trace_id}-{ex.span_id}".encode()

    def end_span(self, ex: Exchange, code: str) -> None:
        assert self.tracer is not None
        status = int(code) if code.isdigit() else 0
        # ends when the histogram's observation did (done_at: a record deferred until the client's fate is known)
        end_ns = tracing.epoch_ns(ex.done_at) if ex.done_at else None
        self.tracer.end(ex.span, {"http.request.method": ex.method.decode(), "http.response.status_code": status,
                                  "url.path": ex.url.decode("latin-1").split("?", 1)[0],
                                  "sentinel.model": ex.model, "sentinel.protocol": ex.protocol,
                                  "sentinel.code": code}, end_ns)
        ex.span = None


def fd_budget(wanted: int, reserve: int) -> int:
    """Client connections the file-descriptor limit allows, raising the soft limit to the hard one.

    `reserve` descriptors stay free for the admin listener, upstream connections and files,
    so a flood of client connections cannot starve `/healthz` of descriptors.
    """
    soft = raise_open_files(wanted + reserve)
    if soft is None:
        return wanted
    return max(16, min(wanted, soft - reserve))
