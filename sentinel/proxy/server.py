"""The client side of the reverse proxy: an asyncio Protocol per connection, parsed by httptools."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

from sentinel.protocols import names
from sentinel.protocols.routes import match
from sentinel.proxy import http, tracing
from sentinel.proxy.exchange import CHUNKED, LENGTH, Exchange
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.sampling import Sample, Sampler
from sentinel.proxy.upstream import UpstreamPool

log = logging.getLogger("sentinel.proxy")

CANARY_HEADER = names.CANARY_HEADER.lower().encode()
CLIENT_WRITE_HIGH_WATER = 256 * 1024
SPLIT_HEADERS_ABOVE = 16 * 1024   # reads bigger than this have their head parsed apart from the body
LINGER_S = 2.0   # after refusing a body, read and discard for this long so the client sees our answer


class ProxyContext:
    """What every connection shares: pool, metrics, samplers, limits, tracer."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, pool: UpstreamPool, metrics: ProxyMetrics,
                 max_body: int, upstream_timeout: float, samplers: dict[str, tuple[str, Sampler]],
                 submit: Callable[[Sample], None], tracer: tracing.SpanExporter | None = None):
        self.loop = loop
        self.pool = pool
        self.metrics = metrics
        self.max_body = max_body
        self.upstream_timeout = upstream_timeout
        self.samplers = samplers              # path model name → (configured name, sampler)
        self.submit_sample = submit
        self.tracer = tracer
        self.draining = False
        self.outbox = pool.outbox   # one outbox: a read on either side batches writes to both
        self.connections: set[ClientConnection] = set()
        self.active: set[Exchange] = set()
        self._logged: set[str] = set()

    def count_sample(self, model: str | None, outcome: str) -> None:
        self.metrics.samples.labels(model or "none", outcome).inc()

    def log_once(self, kind: str, message: str) -> None:
        """Log the first occurrence of each kind of failure; counters carry the rest."""
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("%s: %s (further occurrences are only counted)", kind, message)

    def traceparent(self, ex: Exchange) -> bytes:
        if ex.trace_id is None:
            parsed = tracing.parse_traceparent(ex.incoming_tp) if ex.incoming_tp else None
            if self.tracer is not None:
                ex.span, ex.trace_id, ex.span_id = self.tracer.start(
                    f"{ex.method.decode()} {ex.protocol}", ex.incoming_tp if parsed else None)
            else:
                ex.trace_id = parsed[0] if parsed else tracing.new_trace_id()
                ex.span_id = tracing.new_span_id()
        return tracing.traceparent(ex.trace_id, ex.span_id)  # type: ignore[arg-type]

    def end_span(self, ex: Exchange, code: str) -> None:
        assert self.tracer is not None
        self.tracer.end(ex.span, {"http.request.method": ex.method.decode(), "http.response.status_code": int(code),
                                  "url.path": ex.url.decode("latin-1").split("?", 1)[0],
                                  "sentinel.model": ex.model, "sentinel.protocol": ex.protocol})
        ex.span = None


class ClientConnection(asyncio.Protocol):
    """One client connection; requests are answered in order (pipelining is queued)."""

    def __init__(self, ctx: ProxyContext):
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self._paused: set[str] = set()
        self.writing_paused = False
        self.closed = False
        self.discarding = False
        self.outbox = ctx.outbox
        self._out: list[bytes] = []
        self.raw_left = 0   # Content-Length body bytes still to come outside the parser
        self.last_active = ctx.loop.time()

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH_WATER)
        self.ctx.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.last_active = self.ctx.loop.time()
        self.outbox.active = True
        try:
            while data:
                if self.raw_left:
                    data = self._raw_body(data)
                    if not data or self.discarding or self.closed:
                        return
                    data = bytes(data)   # a pipelined request after the body (rare)
                rest = b""
                if len(data) > SPLIT_HEADERS_ABOVE and self.parsing is None:
                    # Hand httptools only the head, so a large body is never copied by the parser.
                    end = data.find(b"\r\n\r\n", 0, SPLIT_HEADERS_ABOVE)
                    if end > 0:
                        data, rest = data[:end + 4], memoryview(data)[end + 4:]
                self._feed(data)
                if self.discarding or self.closed:
                    return
                ex = self.parsing
                if (ex is not None and ex.req_mode == LENGTH and ex.method and not self.discarding
                        and not ex.finished and ex.content_length > ex.received):  # type: ignore[operator]
                    # The rest of this body bypasses httptools: no per-chunk copy, no callback.
                    self.raw_left = ex.content_length - ex.received  # type: ignore[operator]
                    self.parser = httptools.HttpRequestParser(self)   # fresh for the next request
                elif rest:
                    rest = bytes(rest)
                data = rest  # type: ignore[assignment]
        finally:
            self.outbox.flush()

    def _raw_body(self, data: bytes) -> bytes:
        """Pass up to `raw_left` bytes to the exchange as body; return what follows it."""
        n = self.raw_left
        body, rest = (data, b"") if len(data) <= n else (data[:n], data[n:])
        self.raw_left = n - len(body)
        ex = self.parsing
        if ex is not None:
            ex.request_body(body)
            if self.raw_left == 0:
                self.on_message_complete()
        return rest

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            log.exception("internal error while relaying a request")
            self._bad_request("internal_error", "internal error in the proxy")
        except httptools.HttpParserUpgrade:
            self._bad_request("upgrade_unsupported", "protocol upgrades are not proxied")
        except httptools.HttpParserError as exc:
            msg = str(exc)
            if "Content-Length" in msg and "Transfer-Encoding" in msg:
                self._bad_request("content_length_and_transfer_encoding",
                                  "a request must not carry both Content-Length and Transfer-Encoding")
            else:
                self._bad_request("bad_request", f"malformed HTTP request: {msg}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out = []
        self.ctx.connections.discard(self)
        for ex in list(self.queue):
            ex.client_gone()
        if self.parsing is not None and self.parsing not in self.queue:
            self.parsing.finished = True
        self.queue.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.resume_reading()

    # --- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.parsing = Exchange(self, self.ctx)

    def on_url(self, url: bytes) -> None:
        self.parsing.url += url  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parsing.req_headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        p = self.parser
        ex.method = p.get_method()
        ex.http10 = p.get_http_version() == "1.0"
        ex.keep_alive = p.should_keep_alive() and not self.ctx.draining
        skip = http.connection_tokens(ex.req_headers)
        fwd = ex.fwd_headers
        for name, value in ex.req_headers:
            lname = name.lower()
            if lname == b"content-length":
                ex.content_length = int(value)   # httptools has validated it
                ex.req_mode = LENGTH
                continue
            if lname == b"transfer-encoding":
                ex.req_mode = CHUNKED
                continue
            if lname == b"expect":
                ex.expect_continue = value.strip().lower() == b"100-continue"
                continue
            if lname == b"traceparent":
                ex.incoming_tp = value
                continue
            if lname == CANARY_HEADER and value.strip() == b"1":
                ex.canary = True
            if lname in http.HOP_BY_HOP or lname in skip:
                continue
            fwd.append(name + b": " + value + b"\r\n")
        route = match(ex.url.decode("latin-1"))
        if route is not None:
            ex.protocol = route.protocol
            ex.model = self.ctx.metrics.model_label(route.model)
            sampled = self.ctx.samplers.get(route.model)
            if sampled is not None and not ex.canary:
                model_name, sampler = sampled
                ex.model_name = model_name
                decision = sampler.decide(ex.content_length)
                if decision == "sample":
                    ex.capture = []
                    ex.sample_cap = sampler.max_bytes
                elif decision is not None:
                    self.ctx.count_sample(model_name, decision)
        self.queue.append(ex)
        if len(self.queue) == 1:
            ex.start()
        else:
            self.pause_reading("pipeline")

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.request_body(body)

    def on_message_complete(self) -> None:
        ex, self.parsing = self.parsing, None
        if ex is not None:
            ex.request_complete()

    # --- used by exchanges ------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.outbox.active:
            if not self._out:
                self.outbox.pending.append(self)
            self._out.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, data: Any) -> None:
        if self.closed:
            return
        if self.outbox.active:
            if not self._out:
                self.outbox.pending.append(self)
            self._out.extend(data)
        else:
            self.transport.writelines(data)  # type: ignore[union-attr]

    def flush(self) -> None:
        out, self._out = self._out, []
        t = self.transport
        if out and t is not None and not self.closed and not t.is_closing():
            t.writelines(out)

    def exchange_finished(self, ex: Exchange) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if self.closed:
            return
        if not ex.keep_alive or self.ctx.draining:
            self.close_gracefully(ex.request_done)
            return
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) == 1:
                self.resume_reading("pipeline")
            nxt.start()

    def close_gracefully(self, request_read: bool) -> None:
        """Close after the response is flushed; if the client may still be sending, linger first."""
        t = self.transport
        if t is None or self.closed:
            return
        self.flush()
        if request_read and self.parsing is None:
            t.close()
            return
        # Half-close and discard what the client is still sending, so it can read our answer.
        self.discarding = True
        self._paused.clear()
        t.resume_reading()
        try:
            if t.can_write_eof():
                t.write_eof()
        except OSError:
            pass
        self.ctx.loop.call_later(LINGER_S, t.close)

    def abort(self) -> None:
        self._out = []
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def pause_reading(self, reason: str) -> None:
        if not self._paused and not self.closed and not self.discarding:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def idle(self) -> bool:
        return not self.queue and self.parsing is None

    def _bad_request(self, reason: str, message: str) -> None:
        self.ctx.metrics.proxy_errors.labels(reason).inc()
        if self.queue:   # mid-exchange: the stream is unusable, and answers must stay in order
            self.abort()
            return
        self.ctx.metrics.observe_request("none", "other", "400", 0.0, None)
        self.write(http.error_response(400, reason, message, keep_alive=False))
        self.parsing = None
        self.close_gracefully(False)


def close_idle(ctx: ProxyContext, idle_s: float) -> int:
    """Close keep-alive client connections with no request for `idle_s` seconds; returns how many."""
    cutoff = ctx.loop.time() - idle_s
    stale = [c for c in ctx.connections if c.idle() and c.last_active < cutoff and c.transport is not None]
    for c in stale:
        c.transport.close()  # type: ignore[union-attr]
    return len(stale)
