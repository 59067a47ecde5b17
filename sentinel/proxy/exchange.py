"""One proxied request/response: streams the body both ways and records what the client received.

An Exchange knows its request and its response; it does not time itself (the owning
`ClientConnection.check_deadlines` does) and it does not copy samples (a `Capture` does).

Recorded codes (`sentinel_requests_total{code}`): the upstream's status when the whole
response reached the client; the proxy's own status when it answered (400, 408, 413, 414,
431, 501, 502, 503, 504); `499` when the client left before its response was complete;
`incomplete` when the response head went out but its body was cut (see context.INCOMPLETE);
`502` for a pipelined request never tried because the proxy had to cut its connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from sentinel.proxy import http
from sentinel.proxy.context import CLIENT_CLOSED, INCOMPLETE

if TYPE_CHECKING:
    from sentinel.proxy.context import ClientSide, ProxyContext, UpstreamSide
    from sentinel.proxy.sampling import Capture

# Body framing, both directions.
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3
PENDING_HIGH_WATER = 256 * 1024   # body bytes buffered while the upstream connection opens
REPLAY_MAX_BYTES = 1 << 20        # idempotent requests up to this size may be resent once
_NO_BODY_STATUS = frozenset({204, 304})
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}   # (status, upstream reason) → response status line
_RESPONSE_SPECIAL = http.HOP_BY_HOP | {b"content-length"}   # response fields not forwarded as they are

_ERROR_STATUS = {
    "upstream_refused": 502, "upstream_reset": 502, "upstream_bad_response": 502,
    "upstream_connect_timeout": 504, "upstream_timeout": 504, "upstream_idle_timeout": 504,
}


class Exchange:
    """State of one request from its headers to the last byte of its response."""

    # Defaults live on the class (immutable values only): a new exchange sets just what differs
    # per request, as one allocation of ~40 attributes was the largest single step of the hot path.
    method = b""
    url = b""
    keep_alive = True
    http10 = False
    req_mode = NONE
    content_length: int | None = None
    received = 0
    pending: list[bytes] | tuple[()] = ()   # body bytes that arrived before the upstream connection
    pending_bytes = 0
    request_done = False
    expect_continue = False
    upstream: UpstreamSide | None = None
    connect_task: asyncio.Task | None = None
    response_started = False
    resp_mode = NONE
    status = 0
    finished = False
    started = False
    recorded = False
    model = "none"
    protocol = "other"
    canary = False
    trace_id: str | None = None
    span_id: str | None = None
    incoming_tp: bytes | None = None
    tracestate: list[bytes] | None = None   # the caller's tracestate lines, forwarded with a valid traceparent
    span: Any = None
    capture: Capture | None = None
    replay: list[bytes] | None = None   # what was sent, when it may be sent again
    reused = False
    replay_bytes = 0
    req_done_at = 0.0     # loop time the request was complete and the exchange started
    last_up = 0.0         # loop time of the last read from the upstream (0: nothing read)
    refusal: tuple[int, str, str] | None = None   # answer locally instead of forwarding
    head_line = b""       # the response's status line as written (to take it back, see upstream_failed)
    done_at = 0.0         # perf_counter when the answer was complete, for a count made later (0: now)
    fwd_headers: list[bytes] | tuple[()] = ()   # request header lines forwarded as they are
    # The response bytes of the upstream read being parsed: written in one piece when the response
    # ends (response_done) or the read is parsed (UpstreamConnection.data_received), whichever is first.
    out: list[bytes] | None = None

    def __init__(self, conn: ClientSide, ctx: ProxyContext):
        self.conn = conn
        self.ctx = ctx
        self.t0 = time.perf_counter()
        self.req_headers: list[tuple[bytes, bytes]] = []

    # --- start ----------------------------------------------------------------------
    def start(self) -> None:
        """Begin forwarding: this exchange is now at the head of its connection's queue."""
        self.started = True
        ctx = self.ctx
        ctx.metrics.inflight_count += 1
        if self.refusal is not None:
            self.fail_local(*self.refusal)
            return
        if self.content_length is not None and self.content_length > ctx.max_body:
            self.fail_local(413, "body_too_large",
                            f"request body of {self.content_length} bytes exceeds the limit of {ctx.max_body}")
            return
        if self.expect_continue and not self.request_done:
            self.conn.write(http.CONTINUE)
        if self.request_done:
            self.req_done_at = ctx.loop.time()
        up = ctx.pool.get_idle(check_stale=self.method not in http.IDEMPOTENT)
        if up is not None:
            self.reused = True
            self.attach(up)
        else:
            self.connect_task = ctx.loop.create_task(self._connect())

    async def _connect(self, replay: list[bytes] | None = None) -> None:
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
        if replay is None:
            self.attach(up)
        else:
            self.upstream = up
            up.exchange = self
            if self.conn.write_blocked_at:   # see attach
                up.pause_reading()
            up.writelines(replay)

    def attach(self, up: UpstreamSide) -> None:
        """Send the request head and whatever body has arrived over `up`."""
        self.upstream = up
        up.exchange = self
        head = [self.method + b" " + self.url + b" HTTP/1.1\r\n", *self.fwd_headers,
                b"traceparent: " + self.ctx.traceparent(self) + b"\r\n"]
        if self.tracestate:   # after traceparent: it is dropped when that started a new trace
            head.extend(self.tracestate)
        if self.req_mode == LENGTH:
            head.append(b"content-length: %d\r\n" % self.content_length)
        elif self.req_mode == CHUNKED:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        chunks = self.pending
        self.pending = ()
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
        if self.reused and self.method in http.IDEMPOTENT:
            self.replay = head   # kept (by reference) so the request can be resent, see upstream_failed
            self.replay_bytes = self.received
        if self.conn.write_blocked_at:
            # The client is not taking what it was sent (its pause_writing came while this exchange
            # had no upstream connection yet, and comes once per crossing): the response waits in
            # the upstream's socket until it drains (resume_writing). Before, a pipelined request
            # behind a response that filled the client's buffer had its whole response read into
            # memory (100 MB for a 100 MB answer to a client that never reads).
            up.pause_reading()
        up.writelines(head)

    # --- request body ---------------------------------------------------------------
    def request_body(self, chunk: bytes) -> None:
        if self.finished:
            return
        self.received += len(chunk)
        if self.received > self.ctx.max_body:
            message = f"request body exceeds the limit of {self.ctx.max_body} bytes"
            if not self.started:
                # Pipelined behind answers still owed: refused in its turn (start). Answered now, the
                # 413 went out ahead of them, the connection closed, and the answer before it, which
                # never reached the client, counted as its own status.
                if self.refusal is None:
                    self.refusal = (413, "body_too_large", message)
                    self.capture = None
                    if self.pending_bytes > PENDING_HIGH_WATER:   # its body is dropped: nothing to wait for
                        self.conn.resume_reading("connecting")
                    self.pending, self.pending_bytes = (), 0
                return
            self.fail_local(413, "body_too_large", message)
            return
        cap = self.capture
        if cap is not None and not cap.request_body(chunk):
            self.capture = None
            self.ctx.count_sample(cap.model, "oversize")
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
            if self.pending:
                self.pending.append(chunk)  # type: ignore[union-attr]
            else:
                self.pending = [chunk]
            self.pending_bytes += len(chunk)
            if self.pending_bytes > PENDING_HIGH_WATER and self.pending_bytes - len(chunk) <= PENDING_HIGH_WATER:
                self.conn.pause_reading("connecting")

    def request_complete(self) -> None:
        self.request_done = True
        if self.finished:
            return
        if self.started:
            self.req_done_at = self.ctx.loop.time()
        if self.upstream is not None and self.req_mode == CHUNKED:
            self.upstream.write(b"0\r\n\r\n")
            if self.replay is not None:
                self.replay.append(b"0\r\n\r\n")

    # --- response -------------------------------------------------------------------
    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      up: UpstreamSide) -> None:
        if self.finished:
            return
        if status == 408 and self.replay is not None and self.request_done and not self.response_started:
            # A pooled connection the server was closing as idle: its 408 raced our request
            # (RFC 9110 §15.5.9). Sent once more on a fresh connection, as for a reset.
            self._retry_fresh()
            return
        self.status = status
        has_length = False
        chunked_up = False
        line = _STATUS_LINES.get((status, reason))
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason or http.REASONS.get(status, b""))
            if len(_STATUS_LINES) < 256 and len(reason) <= 64:   # the upstream picks the reason: bounded
                _STATUS_LINES[(status, reason)] = line
        self.head_line = line
        lines = [line]   # the status line, then each field as four pieces (joined when written)
        named = False   # a Connection header names more than keep-alive/close
        for name, value in headers:
            lname = name.lower()
            if lname in _RESPONSE_SPECIAL:
                if lname == b"content-length":
                    has_length = True
                    if status == 204:   # a 204 has no body and must not say it has (RFC 9110 §8.6)
                        continue
                    lines += (name, b": ", value, b"\r\n")
                elif lname == b"transfer-encoding":
                    if value.strip().lower() != b"chunked":
                        # gzip, identity...: the proxy re-frames bodies and would drop the coding
                        self.upstream_failed("upstream_bad_response",
                                             f"upstream used transfer coding {value.decode('latin-1')!r}; "
                                             "the proxy relays only chunked")
                        return
                    chunked_up = True
                elif lname == b"connection" and value.lower() not in http.PLAIN_CONNECTION:
                    named = True
                continue   # hop-by-hop (RFC 9110 §7.6.1)
            lines += (name, b": ", value, b"\r\n")
        if named:   # rare: drop the headers the Connection header names (RFC 9110 §7.6.1)
            skip = http.connection_tokens(headers)
            hop = http.HOP_BY_HOP
            del lines[1:]
            for name, value in headers:
                lname = name.lower()
                if lname not in hop and lname not in skip and not (lname == b"content-length" and status == 204):
                    lines += (name, b": ", value, b"\r\n")
                elif lname == b"content-length":   # named in Connection: still the framing
                    has_length = True
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
        if self.ctx.draining or self.conn.eof:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        elif self.http10:
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.response_started = True
        self.out = lines
        if self.capture is not None:
            self.capture.response_head(status, headers)
        if self.method == b"HEAD":
            # httptools cannot be told the response has no body, so this connection is spent.
            self.response_done(reusable=False)

    def response_body(self, chunk: bytes) -> None:
        if self.finished:
            return
        cap = self.capture
        if cap is not None and not cap.response_body(chunk):
            self.capture = None
            self.ctx.count_sample(cap.model, "oversize")
        out = self.out
        if out is None:
            out = self.out = []
        if self.resp_mode == CHUNKED:
            out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
        else:
            out.append(chunk)

    def send_out(self) -> None:
        """Write the response bytes gathered from the upstream read (see `out`)."""
        out = self.out
        if out is not None:
            self.out = None
            self.conn.send(out)

    def response_done(self, reusable: bool) -> None:
        if self.finished:
            return
        if not self.request_done:
            if self.req_mode == CHUNKED:
                # Answered before the client finished a body of unknown length: reading the rest
                # would have no bound, so the connection closes (after a linger) instead.
                self.keep_alive = False
            # The rest of the body is read and dropped (ClientConnection.check_deadlines times
            # it): reading must not stay paused for an upstream connection that is now gone.
            self.conn.resume_reading("upstream")
        out, self.out = self.out, None
        if self.resp_mode == CHUNKED:
            if out is None:
                out = [b"0\r\n\r\n"]
            else:
                out.append(b"0\r\n\r\n")
        up, self.upstream = self.upstream, None
        if up is not None:
            if reusable and self.request_done and self.method != b"HEAD":
                self.ctx.pool.release(up)  # type: ignore[arg-type]
            else:
                up.abort()
        # Counted (and the sample queued) before the last bytes are handed to the client: a client
        # that reads its answer and then scrapes /metrics finds it counted. Whether the client may
        # not get it is judged by what was still unwritten before it (_finish).
        self._finish(str(self.status))
        cap, self.capture = self.capture, None
        if cap is not None and self.request_done:
            sample = cap.sample(self.trace_id)
            if sample is not None:
                self.ctx.submit_sample(sample)
        if out is not None:
            self.conn.send(out)
        self.conn.exchange_finished(self)

    # --- failures -------------------------------------------------------------------
    def upstream_failed(self, reason: str, message: str) -> None:
        """The upstream refused, reset, timed out or sent garbage."""
        if self.finished:
            return
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        if (reason == "upstream_reset" and self.replay is not None and self.request_done
                and not self.response_started and self.last_up == 0.0):
            # An idempotent request on a pooled connection that closed before answering a
            # byte: sending it once more on a fresh connection cannot change the outcome.
            # Non-idempotent requests are never resent once written (see UpstreamPool.get_idle).
            self._retry_fresh()
            return
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self.ctx.fail(reason, message)
        if self.response_started and not self._take_back():
            # Status and part of the body are out; cutting the connection is the only honest signal.
            self._finish(INCOMPLETE)
            self.conn.abort()
            return
        # Nothing of the response has left (a head and a malformed body in one read): a 502 can.
        status = _ERROR_STATUS.get(reason, 502)
        self._respond_error(status, reason, message)

    def _take_back(self) -> bool:
        """Drop the response bytes not yet written; whether none of the response has left."""
        out, self.out = self.out, None
        if out is not None and out[0] is self.head_line:
            return True   # the head is still here: nothing was written
        return self.conn.take_back(self.head_line)

    def _retry_fresh(self) -> None:
        """Send the request again on a new connection (an idempotent one a stale pooled connection lost)."""
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        self.ctx.errors.inc("stale_connection_retried")
        replay, self.replay = self.replay, None
        self.reused = False
        self.last_up = 0.0
        self.connect_task = self.ctx.loop.create_task(self._connect(replay))

    def _drop_upstream(self) -> None:
        """Abort the upstream connection and any connect still in progress."""
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None

    def fail_local(self, status: int, reason: str, message: str) -> None:
        """The proxy refuses the request itself (408, 413, 501) or cuts it (slow reader)."""
        if self.finished:
            return
        self._drop_upstream()
        self.ctx.fail(reason, message)
        if self.response_started:
            self._finish(INCOMPLETE)
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
        self.capture = None
        self.conn.exchange_finished(self)

    def client_gone(self) -> None:
        """The client closed its connection before the response was complete."""
        if self.finished:
            if not self.recorded:   # complete, but still in the client's buffer: never read
                self.record(CLIENT_CLOSED)
            return
        self._drop_upstream()
        self.ctx.errors.inc("client_disconnect")
        self._finish(CLIENT_CLOSED)

    def dropped_unstarted(self) -> None:
        """A pipelined request the proxy dropped unanswered when it cut the connection.

        The client did not leave (not 499): the cut was the proxy's, forced by a failure of a
        request ahead of this one (an upstream cut mid-response, a slow reader), so it counts 502.
        """
        self.finished = True
        self.capture = None
        self.ctx.errors.inc("pipelined_request_dropped")
        self.record("502")

    def _finish(self, code: str) -> None:
        self.finished = True
        self.out = None   # a response cut or refused: what it had not written is not written
        ctx = self.ctx
        if self.started:
            ctx.metrics.inflight_count -= 1
        conn = self.conn
        if code[0] in "12345" and (conn.write_blocked_at or conn.paused or conn.fin_early
                                   or conn.transport.get_write_buffer_size()):
            self._finish_unsure(code)   # the rare case: whether the client gets this answer is not known yet
            return
        self.record(code)

    def _finish_unsure(self, code: str) -> None:
        """Count an answer the client may not get: now, or deferred until its fate is known."""
        conn = self.conn
        if conn.write_blocked_at or conn.paused:
            if conn.reset_by_peer():   # gone before it could be given this answer
                self.ctx.errors.inc("client_disconnect")
                self.record(CLIENT_CLOSED)
                return
            if conn.write_blocked_at:
                # The last bytes are out of our hands but the client is not reading: the
                # response counts when the client drains it (or as cut when it never does).
                conn.defer_record(self)
                return
        if conn.fin_early or (conn.paused and conn.peer_shut()):
            # the client sent FIN before this answer: counted once its fate is known (server._confirm),
            # with the duration it has now, not the confirmation's wait
            self.done_at = time.perf_counter()
            conn.defer_record(self)
            return
        if conn.transport.get_write_buffer_size():
            # Earlier bytes to this client are still in our own buffer (the kernel took none of them
            # yet), so this answer has not reached it either: counted once the buffer empties, or as
            # cut when the client never drains it (ClientConnection.check_deadlines). Before, an
            # answer whose end filled the buffer counted 200 and the reader was then cut with it unread.
            self.done_at = time.perf_counter()
            conn.defer_record(self)
            return
        self.record(code)

    def record(self, code: str) -> None:
        """Count the exchange once under `code`."""
        if self.recorded:
            return
        self.recorded = True
        if not self.canary:
            tid = self.trace_id
            if tid is not None and self.span_id[-1] != "1":  # type: ignore[index]
                tid = None   # a trace nobody records (not sampled): no exemplar points at it, as OTel's trace-based filter
            self.ctx.metrics.observe_request(self.model, self.protocol, code,
                                             (self.done_at or time.perf_counter()) - self.t0, tid)
        if self.span is not None:
            self.ctx.end_span(self, code)
