"""One proxied request/response: streams the body both ways, measures it, copies samples."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from sentinel.proxy import http
from sentinel.proxy.sampling import DECODER_HEADERS, Sample

if TYPE_CHECKING:
    from sentinel.proxy.server import ClientConnection, ProxyContext
    from sentinel.proxy.upstream import UpstreamConnection

# Body framing, both directions.
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3
PENDING_HIGH_WATER = 256 * 1024   # body bytes buffered while the upstream connection opens
REPLAY_MAX_BYTES = 1 << 20        # requests up to this size are resent once if a pooled connection was stale
_NO_BODY_STATUS = frozenset({204, 304})

_ERROR_STATUS = {
    "upstream_refused": 502, "upstream_reset": 502, "upstream_bad_response": 502,
    "upstream_connect_timeout": 504, "upstream_timeout": 504,
}


class Exchange:
    """State of one request from its headers to the last byte of its response."""

    __slots__ = (
        "conn", "ctx", "t0", "method", "url", "req_headers", "fwd_headers", "keep_alive", "http10",
        "req_mode", "content_length", "received", "pending", "pending_bytes", "request_done",
        "expect_continue", "upstream", "connect_task", "timer", "response_started", "resp_mode",
        "status", "finished", "model", "protocol", "model_name", "canary", "trace_id", "span_id",
        "incoming_tp", "span", "capture", "capture_bytes", "resp_capture", "resp_headers",
        "sample_cap", "started", "resp_bytes", "replay", "reused", "replay_bytes",
    )

    def __init__(self, conn: ClientConnection, ctx: ProxyContext):
        self.conn = conn
        self.ctx = ctx
        self.t0 = time.perf_counter()
        self.method = b""
        self.url = b""
        self.req_headers: list[tuple[bytes, bytes]] = []
        self.fwd_headers: list[bytes] = []
        self.keep_alive = True
        self.http10 = False
        self.req_mode = NONE
        self.content_length: int | None = None
        self.received = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.request_done = False
        self.expect_continue = False
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.response_started = False
        self.resp_mode = NONE
        self.status = 0
        self.finished = False
        self.started = False
        self.model = "none"
        self.protocol = "other"
        self.model_name: str | None = None   # configured model, when sampling applies
        self.canary = False
        self.trace_id: str | None = None
        self.span_id: str | None = None
        self.incoming_tp: bytes | None = None
        self.span: Any = None
        self.capture: list[bytes] | None = None
        self.capture_bytes = 0
        self.resp_capture: list[bytes] | None = None
        self.resp_headers: dict[str, str] = {}
        self.sample_cap = 0
        self.resp_bytes = 0
        self.replay: list[bytes] | None = None   # what was sent, when it can be sent again
        self.reused = False
        self.replay_bytes = 0

    # --- start ----------------------------------------------------------------------
    def start(self) -> None:
        """Begin forwarding: this exchange is now at the head of its connection's queue."""
        self.started = True
        ctx = self.ctx
        ctx.metrics.inflight_count += 1
        ctx.active.add(self)
        if self.content_length is not None and self.content_length > ctx.max_body:
            self.fail_local(413, "body_too_large",
                            f"request body of {self.content_length} bytes exceeds the limit of {ctx.max_body}")
            return
        if self.expect_continue and not self.request_done:
            self.conn.write(http.CONTINUE)
        if self.request_done:
            self._arm_timer()
        up = ctx.pool.get_idle()
        if up is not None:
            self.reused = True
            self.attach(up)
        else:
            self.connect_task = ctx.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            up = await self.ctx.pool.connect()
        except TimeoutError:
            self.connect_task = None   # this task; upstream_failed must not cancel it
            self.upstream_failed("upstream_connect_timeout",
                                 f"no connection to the upstream within {self.ctx.pool.connect_timeout} s")
            return
        except OSError as exc:
            self.connect_task = None
            self.upstream_failed("upstream_refused", f"cannot connect to the upstream: {exc.strerror or exc}")
            return
        self.connect_task = None
        if self.finished:
            self.ctx.pool.release(up)
            return
        self.attach(up)

    async def _reconnect(self) -> None:
        replay, self.replay = self.replay, None
        try:
            up = await self.ctx.pool.connect()
        except (TimeoutError, OSError) as exc:
            self.connect_task = None
            self.upstream_failed("upstream_refused", f"cannot reconnect to the upstream: {exc}")
            return
        self.connect_task = None
        if self.finished:
            self.ctx.pool.release(up)
            return
        self.upstream = up
        up.exchange = self
        up.writelines(replay)  # type: ignore[arg-type]

    def attach(self, up: UpstreamConnection) -> None:
        """Send the request head and whatever body has arrived over `up`."""
        self.upstream = up
        up.exchange = self
        head = [self.method, b" ", self.url, b" HTTP/1.1\r\n"]
        for line in self.fwd_headers:
            head.append(line)
        head.append(b"traceparent: " + self.ctx.traceparent(self) + b"\r\n")
        if self.req_mode == LENGTH:
            head.append(b"content-length: %d\r\n" % self.content_length)
        elif self.req_mode == CHUNKED:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        chunks = self.pending
        self.pending = []
        if self.req_mode == CHUNKED:
            for c in chunks:
                head.append(b"%x\r\n" % len(c))
                head.append(c)
                head.append(b"\r\n")
            if self.request_done:
                head.append(b"0\r\n\r\n")
        else:
            head.extend(chunks)
        if self.pending_bytes > PENDING_HIGH_WATER:
            self.conn.resume_reading("connecting")
        self.pending_bytes = 0
        if self.reused:
            self.replay = head   # kept (by reference) so the request can be resent, see upstream_failed
            self.replay_bytes = self.received
        up.writelines(head)

    # --- request body ---------------------------------------------------------------
    def request_body(self, chunk: bytes) -> None:
        if self.finished:
            return
        self.received += len(chunk)
        if self.received > self.ctx.max_body:
            self.fail_local(413, "body_too_large",
                            f"request body exceeds the limit of {self.ctx.max_body} bytes")
            return
        if self.capture is not None:
            self.capture_bytes += len(chunk)
            if self.capture_bytes > self.sample_cap:
                self.capture = None
                self.ctx.count_sample(self.model_name, "oversize")
            else:
                self.capture.append(chunk)
        up = self.upstream
        if up is not None:
            pieces = (b"%x\r\n" % len(chunk), chunk, b"\r\n") if self.req_mode == CHUNKED else (chunk,)
            up.writelines(pieces)
            if self.replay is not None:
                self.replay_bytes += len(chunk)
                if self.replay_bytes > REPLAY_MAX_BYTES:
                    self.replay = None
                else:
                    self.replay.extend(pieces)
        else:
            self.pending.append(chunk)
            self.pending_bytes += len(chunk)
            if self.pending_bytes > PENDING_HIGH_WATER and self.pending_bytes - len(chunk) <= PENDING_HIGH_WATER:
                self.conn.pause_reading("connecting")

    def request_complete(self) -> None:
        self.request_done = True
        if self.finished:
            return
        if self.started:
            self._arm_timer()
        if self.upstream is not None and self.req_mode == CHUNKED:
            self.upstream.write(b"0\r\n\r\n")
            if self.replay is not None:
                self.replay.append(b"0\r\n\r\n")

    # --- response -------------------------------------------------------------------
    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      up: UpstreamConnection) -> None:
        if self.finished:
            return
        self.status = status
        skip = http.connection_tokens(headers) | http.HOP_BY_HOP
        has_length = False
        chunked_up = False
        lines = [b"HTTP/1.1 %d " % status, reason or http.REASONS.get(status, b""), b"\r\n"]
        want_ct = self.capture is not None
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                has_length = True
            elif lname == b"transfer-encoding":
                chunked_up = b"chunked" in value.lower()
            if lname in skip:
                continue
            if want_ct and lname in DECODER_HEADERS:
                self.resp_headers[lname.decode()] = value.decode("latin-1")
            lines.append(name)
            lines.append(b": ")
            lines.append(value)
            lines.append(b"\r\n")
        if self.method == b"HEAD" or status in _NO_BODY_STATUS:
            self.resp_mode = NONE
        elif has_length:
            self.resp_mode = LENGTH
        elif self.http10:
            self.resp_mode = UNTIL_CLOSE
            self.keep_alive = False
        else:
            self.resp_mode = CHUNKED
            lines.append(b"transfer-encoding: chunked\r\n")
        up.until_close = not has_length and not chunked_up and self.resp_mode != NONE
        if self.ctx.draining:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        elif self.http10:
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.response_started = True
        self.conn.writelines(lines)
        if self.capture is not None and status == 200:
            self.resp_capture = []
        if self.method == b"HEAD":
            # httptools cannot be told the response has no body, so this connection is spent.
            self.response_done(reusable=False)

    def response_body(self, chunk: bytes) -> None:
        if self.finished:
            return
        rc = self.resp_capture
        if rc is not None:
            self.resp_bytes += len(chunk)
            if self.resp_bytes > self.sample_cap:
                self.resp_capture = None
                self.ctx.count_sample(self.model_name, "oversize")
            else:
                rc.append(chunk)
        if self.resp_mode == CHUNKED:
            self.conn.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            self.conn.write(chunk)

    def response_done(self, reusable: bool) -> None:
        if self.finished:
            return
        if self.resp_mode == CHUNKED:
            self.conn.write(b"0\r\n\r\n")
        up, self.upstream = self.upstream, None
        if up is not None:
            if reusable and self.request_done and self.method != b"HEAD":
                self.ctx.pool.release(up)
            else:
                up.abort()
        self._finish(str(self.status))
        if (self.capture is not None and self.resp_capture is not None and self.request_done
                and self.model_name is not None):
            self.ctx.submit_sample(Sample(
                self.model_name, self.protocol, self._decoder_request_headers(), b"".join(self.capture),
                self.resp_headers, b"".join(self.resp_capture), "proxy", self.trace_id, time.time()))
        self.capture = self.resp_capture = None
        self.conn.exchange_finished(self)

    def _decoder_request_headers(self) -> dict[str, str]:
        return {n.lower().decode(): v.decode("latin-1") for n, v in self.req_headers
                if n.lower() in DECODER_HEADERS}

    # --- failures -------------------------------------------------------------------
    def upstream_failed(self, reason: str, message: str) -> None:
        """The upstream refused, reset, timed out or sent garbage."""
        if self.finished:
            return
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        if (reason == "upstream_reset" and self.replay is not None and self.request_done
                and not self.response_started):
            # A pooled connection the server had just closed: nothing was processed, so send
            # the same bytes once more on a fresh connection.
            self.ctx.metrics.proxy_errors.labels("stale_connection_retried").inc()
            self.reused = False
            self.connect_task = self.ctx.loop.create_task(self._reconnect())
            return
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self.ctx.metrics.proxy_errors.labels(reason).inc()
        self.ctx.log_once(reason, message)
        if self.response_started:
            # Status and part of the body are out; cutting the connection is the only honest signal.
            self._finish(str(self.status))
            self.conn.abort()
            return
        status = _ERROR_STATUS.get(reason, 502)
        self._respond_error(status, reason, message)

    def _drop_upstream(self) -> None:
        """Abort the upstream connection and any connect still in progress."""
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None

    def fail_local(self, status: int, reason: str, message: str) -> None:
        """The proxy refuses the request itself (413)."""
        if self.finished:
            return
        self._drop_upstream()
        self.ctx.metrics.proxy_errors.labels(reason).inc()
        if self.response_started:
            self._finish(str(self.status))
            self.conn.abort()
            return
        self._respond_error(status, reason, message)

    def _respond_error(self, status: int, reason: str, message: str) -> None:
        if not self.request_done:
            self.keep_alive = False   # the rest of the body is not read; close after answering
        if self.ctx.draining:
            self.keep_alive = False
        tp = [(b"traceparent", self.ctx.traceparent(self))]
        self.status = status
        self.response_started = True
        self.conn.write(http.error_response(status, reason, message, self.keep_alive, tp))
        self._finish(str(status))
        self.capture = self.resp_capture = None
        self.conn.exchange_finished(self)

    def _arm_timer(self) -> None:
        # The upstream's time runs from the end of the request: a slow client is not a slow upstream.
        if self.timer is None:
            self.timer = self.ctx.loop.call_later(self.ctx.upstream_timeout, self.on_timeout)

    def on_timeout(self) -> None:
        self.timer = None
        if not self.finished:
            self.upstream_failed("upstream_timeout",
                                 f"the upstream did not answer within {self.ctx.upstream_timeout} s")

    def client_gone(self) -> None:
        """The client closed its connection before the response was complete."""
        if self.finished:
            return
        self._drop_upstream()
        self.ctx.metrics.proxy_errors.labels("client_disconnect").inc()
        self._finish("499")  # nginx's code for "client closed request"

    def _finish(self, code: str) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ctx = self.ctx
        if self.started:
            ctx.metrics.inflight_count -= 1
            ctx.active.discard(self)
        elapsed = time.perf_counter() - self.t0
        if not self.canary:
            ctx.metrics.observe_request(self.model, self.protocol, code, elapsed, self.trace_id)
        if self.span is not None:
            ctx.end_span(self, code)
