"""The client side of the reverse proxy: an asyncio Protocol per connection, parsed by httptools.

`ClientConnection` owns a client connection's state machine:

    idle ──first byte──► head ──headers complete──► body ──message complete──► waiting
      ▲                   │ 408 / 414 / 431 / 400                 │ 408, 413        │ 504
      │                   ▼                                       ▼                 ▼
      └──── keep-alive ◄── response streaming (upstream idle, send timeout → cut) ◄─┘

Its limits are checked in the parser callbacks (sizes) and in `check_deadlines` (time);
both come from `context.Limits`. Nothing of a refused head is forwarded.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import select
import socket
import struct
import sys
import termios
from collections import deque

import httptools

from sentinel.protocols import names
from sentinel.protocols.routes import match
from sentinel.proxy import http
from sentinel.proxy.context import CLIENT_CLOSED, INCOMPLETE, Limits, ProxyContext
from sentinel.proxy.exchange import CHUNKED, LENGTH, NONE, Exchange
from sentinel.proxy.metrics import NO_MODEL, OVERFLOW_MODEL, ProxyMetrics
from sentinel.proxy.sampling import Capture

__all__ = ["ClientConnection", "ProxyContext", "close_idle"]

log = logging.getLogger("sentinel.proxy")

CANARY_HEADER = names.CANARY_HEADER.lower().encode()
_PARSE_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)
# Request headers the proxy reads itself (everything in http.HOP_BY_HOP is handled apart).
_SPECIAL = frozenset({b"content-length", b"expect", b"traceparent", b"tracestate", b"host", CANARY_HEADER})
ROUTE_CACHE_SIZE = 1024   # request targets whose route is remembered (cleared when full)
_NO_ROUTE = ("other", NO_MODEL, None)   # a request target no protocol's route matches
CLIENT_WRITE_HIGH_WATER = 256 * 1024
SPLIT_HEADERS_ABOVE = 16 * 1024   # reads bigger than this have their head parsed apart from the body
LINGER_S = 2.0   # after refusing a body, read and discard for this long so the client sees our answer
LINGER_MAX_BYTES = 1 << 20   # ... or until this much was discarded (a refused head: cut a flood early)
BODY_LINGER_MAX_BYTES = 64 << 20   # a body cut short: more than the socket buffers hold in flight
# (tcp_rmem's max is 6-32 MiB), so a client mid-upload when refused reads its answer, not a reset
START_AFTER_READ_BELOW = 64 * 1024   # request bodies up to this size start after the read (on_headers_complete)
MAX_PIPELINED = 64   # requests queued on one connection (pipelining); the next is refused 429 and the connection closed
SHED_LINGER_S = 0.5   # a connection over the budget: how long its 503 may take to leave
RDHUP = getattr(select, "POLLRDHUP", 0x2000)   # the peer shut its sending side (Linux)
CONFIRM_S = 0.5   # a client that sent FIN before its answer: how long after the answer to look for its reset
_LINGER_RESET = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() resets the connection (server.cut)


class _Refuse(Exception):
    """Raised in a parser callback to stop parsing a request the proxy refuses."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class _Closing(Exception):
    """Raised in a parser callback: the connection is closing, nothing more of this read is parsed."""


class _Trailers(http.Trailers):
    """Where `on_header` puts a chunked request's trailer fields: counted with its head's, never kept.

    The fields of the head and the trailers together are held to `max_headers` and `max_head`
    (431), as when every field was checked (http.Trailers).
    """

    __slots__ = ("lim", "body_seen", "framing")

    def __init__(self, headers: list[tuple[bytes, bytes]], lim: Limits, read_len: int):
        super().__init__(headers, lim.max_headers, lim.max_head)
        self.lim = lim
        self.body_seen = 0         # body bytes received when a read last brought some
        self.framing = -read_len   # bytes read since then (the head's read not counted): see _chunked_read

    def over(self, count: bool) -> None:
        lim = self.lim
        if count:
            raise _Refuse(431, "too_many_headers", f"more than {lim.max_headers} header fields")
        raise _Refuse(431, "headers_too_large", f"request head longer than {lim.max_head} bytes")


def resolve_target(metrics: ProxyMetrics, cache: dict[bytes, tuple], key: bytes, target: str, limit: int,
                   samplers: dict | None = None) -> tuple:
    """(protocol, model label, (model name, sampler) or None) of a request target.

    Remembered in `cache` under `key` (cleared when it holds `limit`), except a model folded
    into the overflow label, which is counted per request (ProxyMetrics.model_label). The
    proxy's connections and the nginx engine's access log (nginx.AccessLog) both resolve here.
    """
    route = match(target)
    if route is None:
        resolved: tuple = _NO_ROUTE
    else:
        label = metrics.model_label(route.model)
        resolved = (route.protocol, label, samplers.get(route.model) if samplers is not None else None)
        if label == OVERFLOW_MODEL:
            return resolved
    if len(cache) >= limit:
        cache.clear()
    cache[key] = resolved
    return resolved


class ClientConnection(http.BufferedWriter, asyncio.Protocol):
    """One client connection; requests are answered in order (pipelining is queued)."""

    def __init__(self, ctx: ProxyContext):
        self.ctx = ctx
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.paused: set[str] = set()   # why reading is paused ("pipeline", "upstream", "connecting")
        self.closed = False
        self.discarding = False
        self.h2c_offered = False    # the request being parsed offers an h2c upgrade, which is declined
        self.shed = False
        self.discarded = 0
        self.drain_limit = LINGER_MAX_BYTES   # bytes discarded after a refusal before giving up
        self.eof = False            # the client half-closed: answer what was asked, then close
        self.outbox = ctx.outbox
        self._out: list[bytes] = []
        self.raw_left = 0   # Content-Length body bytes still to come outside the parser
        now = ctx.loop.time()
        self.last_active = now      # last read from the client
        self.in_head = False        # a request head has begun and is not complete
        self.head_started = now
        self.head_bytes = 0
        # the fields of the head being parsed (then, for a chunked body, its trailers' count: _Trailers)
        self.req_headers: list[tuple[bytes, bytes]] | _Trailers = []
        self.read_len = 0           # bytes of the read being parsed
        self.paused_at = 0.0        # when reading was paused for the upstream (0: not paused)
        self.write_blocked_at = 0.0  # when the client last drained any of our writes while blocked
        self.blocked_size = 0        # bytes it had left unread then
        self.held_at = 0.0           # answers done with bytes still in our buffer, unpaused: last progress
        self.held_size = 0           # ... and what was unread then
        self.unrecorded: list[Exchange] | None = None   # complete, counted once the client drains
        self.starting: Exchange | None = None   # parsed in this read, started once the read is parsed
        # requests with a body up to this size start after the read (never one over the body limit,
        # which start() refuses with its size)
        self.start_after_read_below = min(START_AFTER_READ_BELOW, ctx.max_body)
        self.used = False           # a request has begun on this connection
        self.fin_early = False      # the client sent FIN before the answer at the head of the queue began
        self.confirming = False     # answers written after such a FIN wait to learn whether the client took them
        self.closing = False        # the proxy decided to close (queued requests it drops are its own doing)
        self.graceful = False       # closed with close(): what was left in our buffer leaves first (not abort)
        self.lingering = False      # a shed connection counted in ctx.shedding

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        ctx = self.ctx
        if len(ctx.connections) >= ctx.limits.max_connections or ctx.shedding > ctx.limits.max_connections:
            self._shed(transport)
            return
        transport.set_write_buffer_limits(high=CLIENT_WRITE_HIGH_WATER)
        ctx.connections.add(self)

    def _shed(self, transport) -> None:  # type: ignore[no-untyped-def]
        """Over the connection budget: answer 503 + Retry-After without reading, then close."""
        ctx = self.ctx
        self.shed = self.discarding = True
        ctx.fail("connection_limit", f"more than {ctx.limits.max_connections} client connections; "
                                     "new ones are answered 503 with Retry-After")
        if ctx.shedding > ctx.limits.max_connections:   # a flood of floods: do not even linger
            transport.abort()   # no answer: not counted as a 503 the client never got
            return
        ctx.metrics.observe_request("none", "other", "503", 0.0, None)
        ctx.shedding += 1
        self.lingering = True
        transport.write(ctx.shed_bytes)
        http.send_fin(transport)
        ctx.loop.call_later(SHED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            self.discarded += len(data)
            if self.discarded > self.drain_limit and self.transport is not None:
                self.graceful = False
                self.transport.abort()   # refused, and still sending: stop listening
            return
        self.last_active = self.ctx.loop.time()
        self.outbox.active = True
        try:
            while data:
                if self.raw_left:
                    data = self._raw_body(data)
                    if not data or self.discarding or self.closed or "closing" in self.paused:
                        return
                    data = bytes(data)   # a pipelined request after the body (rare)
                rest = b""
                if len(data) > SPLIT_HEADERS_ABOVE and self.parsing is None:
                    # Hand httptools only the head, so a large body is never copied by the parser.
                    end = data.find(b"\r\n\r\n", 0, SPLIT_HEADERS_ABOVE)
                    if end > 0:
                        data, rest = data[:end + 4], memoryview(data)[end + 4:]
                self.read_len = len(data)
                try:
                    self.parser.feed_data(data)
                except _PARSE_ERRORS as exc:
                    if self.h2c_offered and isinstance(exc, httptools.HttpParserUpgrade):
                        # A declined h2c offer (_h2c_offer): what follows its head is HTTP/1.1,
                        # its body first (raw, below), then requests for a fresh parser.
                        self.h2c_offered = False
                        self.parser = httptools.HttpRequestParser(self)
                        after = data[exc.args[0]:]
                        if after:
                            rest = after + bytes(rest)   # type: ignore[assignment]
                    else:
                        self.h2c_offered = False
                        self._feed_failed(exc, data)
                if self.discarding or self.closed or "closing" in self.paused:
                    return
                if self.in_head:
                    if (not self.req_headers and data.endswith(b"\n") and self.parsing is not None
                            and self.parsing.url and self.parser.get_http_version() == "0.0"):
                        # `GET /path` and a line end: an HTTP/0.9 request, which has no blank line
                        # to wait for (it waited for the head timeout and got 408)
                        self._refuse_head(_Refuse(505, "http_version_unsupported",
                                                  "HTTP/0.9 requests are not supported"))
                        return
                    self.head_bytes += len(data)
                    lim = self.ctx.limits
                    if self.head_bytes > lim.max_line + lim.max_head:
                        self._refuse_head(self._head_too_large())
                        return
                    if len(self.req_headers) > lim.max_headers:   # counted per read (see on_header)
                        self._refuse_head(_Refuse(431, "too_many_headers", f"more than {lim.max_headers} header fields"))
                        return
                ex = self.parsing
                if ex is not None:
                    if (ex.req_mode == LENGTH and ex.method and not self.discarding
                            and not ex.finished and ex.content_length > ex.received):  # type: ignore[operator]
                        # The rest of this body bypasses httptools: no per-chunk copy, no callback.
                        self.raw_left = ex.content_length - ex.received  # type: ignore[operator]
                        self.parser = httptools.HttpRequestParser(self)   # fresh for the next request
                    else:
                        if ex.req_mode == CHUNKED and not self.in_head and self._chunked_read(ex, len(data)):
                            return
                        if rest:
                            rest = bytes(rest)
                elif rest:
                    rest = bytes(rest)
                data = rest  # type: ignore[assignment]
        finally:
            self.outbox.flush()
            ex = self.starting
            if ex is not None:
                self.starting = None
                if not ex.finished and not self.closed:   # not refused or cut within the read
                    ex.start()

    def _chunked_read(self, ex: Exchange, n: int) -> bool:
        """Bound what a chunked body's reads may bring without body data; whether it was refused.

        A trailer field is kept by httptools until it ends (and chunk lines, extensions included,
        may go on without end): `0`, `X: ` and then megabytes held all of them, for as long as the
        client sent them. After `max_line + max_head` bytes with no body data: 431, as for a head.
        """
        t = self.req_headers
        if not isinstance(t, _Trailers) or ex.finished:   # finished: its body's rest is dropped (not counted)
            return False
        if ex.received != t.body_seen:
            t.body_seen, t.framing = ex.received, 0
            return False
        t.framing += n
        lim = self.ctx.limits
        if t.framing <= lim.max_line + lim.max_head:
            return False
        self._refuse_head(_Refuse(431, "headers_too_large",
                                  f"chunked request trailers (or chunk lines) longer than "
                                  f"{lim.max_line + lim.max_head} bytes without body data"))
        return True

    def _head_too_large(self) -> _Refuse:
        lim = self.ctx.limits
        url = self.parsing.url if self.parsing is not None else b""
        if not self.req_headers and len(url) >= lim.max_line:
            return _Refuse(414, "uri_too_long", f"request target longer than {lim.max_line} bytes")
        return _Refuse(431, "headers_too_large", f"request head longer than {lim.max_head} bytes")

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
                if not ex.keep_alive:
                    # The parser was replaced for this body and does not know the connection
                    # ends here: nothing after this request is read (RFC 9112 §9.6).
                    self.pause_reading("closing")
        return rest

    def _feed_failed(self, exc: Exception, data: bytes) -> None:
        """httptools stopped parsing `data` (a refusal raised in a callback, an upgrade, bad bytes)."""
        if self.discarding or self.closing or self.closed:
            # A request was refused within this read and the connection is closing (a 501 for
            # `Transfer-Encoding: gzip`, which httptools then calls invalid; _Closing): no second
            # answer, which was counted (a phantom 400) and written after our FIN (RuntimeError).
            return
        if isinstance(exc, httptools.HttpParserCallbackError):
            refused = exc.__context__
            if isinstance(refused, _Refuse):
                self._refuse_head(refused)
                return
            log.exception("internal error while relaying a request")   # called from data_received's except
            self._bad_request("internal_error", "internal error in the proxy")
        elif isinstance(exc, httptools.HttpParserUpgrade):
            # CONNECT or Upgrade: its exchange was queued with a 501 refusal (on_headers_complete);
            # whatever the client sends next is not HTTP we parse.
            self.discarding = True
        else:
            if self.parsing is None and self.queue and not self.queue[-1].keep_alive:
                # Bytes after a request that ends the connection (Connection: close, HTTP/1.0):
                # not processed (RFC 9112 §9.6), and no reason to cut the answers still owed.
                self.pause_reading("closing")
                return
            msg = str(exc)
            if not self.queue and data.startswith(b"PRI * HTTP/2"):
                # An HTTP/2 client with prior knowledge (gRPC, curl --http2-prior-knowledge): was
                # "malformed HTTP request: Pause on PRI/Upgrade" (400), which names no cause.
                self._answer_and_close(505, "http2_on_http1_listener",
                                       "HTTP/2 connection preface on the HTTP/1.1 listener; point gRPC "
                                       "and HTTP/2 clients at the gRPC listener (grpc_listen)")
            elif "Content-Length" in msg and "Transfer-Encoding" in msg:
                self._bad_request("content_length_and_transfer_encoding",
                                  "a request must not carry both Content-Length and Transfer-Encoding")
            else:
                self._bad_request("bad_request", f"malformed HTTP request: {msg}")

    def eof_received(self) -> bool | None:
        """A half-close after a complete request still wants its answer; anything else ends here."""
        self.eof = True
        if self.unrecorded and not self.fin_early and not self._unread():
            # Answers that waited on our buffer (Exchange._finish_unsure), all acknowledged before this
            # FIN (a client closing with bytes unread resets instead): it has them. They counted 499
            # when the client read them and closed before the sweep saw the buffer empty.
            self._record_unrecorded()
        if self.parsing is None and not self.in_head:
            if self.queue and (self.fin_early or not self.queue[0].response_started):
                # A half-close (shutdown(SHUT_WR)) still wants its answer, and a client that closed for
                # good (a timeout) sent the same FIN. Which it was shows only when the answer reaches
                # it: a closed socket answers with a reset. The answer is counted after that (_confirm).
                self.fin_early = True
                return True   # keep writing; exchange_finished closes when the queue is empty
            if self.fin_early and self.unrecorded:
                # answers written after a FIN that paused reading hid (peer_shut): counted by _confirm
                self.close_gracefully(True)
                return True
        # EOF mid-request, or once the answer has begun (a client going away, not a half-close).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.shed:
            if self.lingering:   # aborted floods were never counted in ctx.shedding
                self.ctx.shedding -= 1
            self.closed = True
            return
        self.closed = True
        self._out = []
        self.ctx.connections.discard(self)
        for ex in list(self.queue):
            if self.closing and exc is None and not ex.started and not ex.finished:
                ex.dropped_unstarted()   # pipelined behind the close the proxy chose: not the client's leaving
            else:
                ex.client_gone()
        if self.parsing is not None and self.parsing not in self.queue:
            self.parsing.finished = True
        self.queue.clear()
        # After our close() the transport ends (exc None) only once our buffer is written: the
        # answers waiting on it reached the client's kernel and count as their own status.
        self._record_unrecorded(None if exc is None and self.graceful else CLIENT_CLOSED)

    def pause_writing(self) -> None:
        self.write_blocked_at = self.ctx.loop.time()
        self.blocked_size = self._unread()
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_blocked_at = 0.0
        if not self.transport.get_write_buffer_size():  # type: ignore[union-attr]
            self._record_unrecorded()
        # else: under the low-water mark, not empty. The answers count once it empties, or as cut
        # when the client takes nothing more for send_timeout (check_deadlines). They were counted
        # here, and a client that stopped reading then was never cut.
        if self.queue and self.queue[0].upstream is not None:
            ex = self.queue[0]
            ex.last_up = self.ctx.loop.time()   # the upstream was paused for us, not idle
            ex.upstream.resume_reading()  # type: ignore[union-attr]

    # --- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.closing:
            # A request behind one answered with a close within this read (a refusal mid-body):
            # not processed (RFC 9112 §9.6), as bytes after `Connection: close` are not. It was
            # forwarded, and counted as its answer's status, written after our FIN (RuntimeError).
            raise _Closing
        ex = self.parsing = Exchange(self, self.ctx)
        self.req_headers = ex.req_headers
        self.used = self.in_head = True
        self.head_started = self.last_active
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        ex.url += url  # type: ignore[union-attr]
        if len(ex.url) > self.ctx.limits.max_line:  # type: ignore[union-attr]
            raise _Refuse(414, "uri_too_long", f"request target longer than {self.ctx.limits.max_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The limits on the fields' count and size are checked once the head is complete
        # (on_headers_complete) and after every read that leaves it incomplete (data_received):
        # what one read can hold is bounded by the read, and a check per field was a tenth of
        # the request's path.
        self.req_headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.in_head = False
        headers = ex.req_headers
        lim = self.ctx.limits
        if len(headers) > lim.max_headers:
            raise _Refuse(431, "too_many_headers", f"more than {lim.max_headers} header fields")
        # The fields are no longer than the head's bytes (and one per field: `a:b` counts 6 of 5);
        # summed only when that bound is over the limit.
        if (self.head_bytes + self.read_len + len(headers) > lim.max_head
                and http.field_bytes(headers) > lim.max_head):
            raise _Refuse(431, "headers_too_large", f"request head longer than {lim.max_head} bytes")
        p = self.parser
        ex.method = p.get_method()
        version = p.get_http_version()
        ex.http10 = version == "1.0"
        if version == "0.9":   # no headers, no status line back: nothing a model client speaks
            ex.refusal = (505, "http_version_unsupported", "HTTP/0.9 requests are not supported")
        ex.keep_alive = p.should_keep_alive() and not self.ctx.draining
        fwd: list[bytes] = []
        ex.fwd_headers = fwd
        upgrade = h2c = False
        hosts = 0
        skip: frozenset[bytes] = frozenset()
        hop = http.HOP_BY_HOP
        for name, value in ex.req_headers:
            lname = name.lower()
            if lname not in hop:   # the common case: an end-to-end header, forwarded as is
                if lname in _SPECIAL:
                    if lname == b"host":
                        hosts += 1 + value.count(b",")   # `Host: a, b` names two hosts as two fields do
                    elif lname == b"content-length":
                        ex.content_length = int(value)   # httptools has validated it
                        ex.req_mode = LENGTH
                        continue
                    elif lname == b"traceparent":
                        # two traceparent fields name two parents: invalid (W3C), so a new trace
                        ex.incoming_tp = value if ex.incoming_tp is None else b"-"
                        continue
                    elif lname == b"tracestate":   # forwarded only beside a valid traceparent (ProxyContext.traceparent)
                        if ex.tracestate is None:
                            ex.tracestate = []
                        ex.tracestate.append(name + b": " + value + b"\r\n")
                        continue
                    elif lname == b"expect":
                        if value.strip().lower() == b"100-continue":
                            # answered by the proxy (start); an HTTP/1.0 client's is ignored (RFC 9110 §10.1.1)
                            ex.expect_continue = not ex.http10
                            continue
                        # any other expectation is the model server's to meet or refuse (417): forwarded
                    elif value.strip() == b"1":   # CANARY_HEADER, the last of _SPECIAL
                        ex.canary = True
                fwd += (name, b": ", value, b"\r\n")   # four pieces per field, joined when written
                continue
            if lname == b"transfer-encoding":
                ex.req_mode = CHUNKED
                self.req_headers = _Trailers(ex.req_headers, lim, self.read_len)   # the head's fields are all here
                if value.strip().lower() != b"chunked" and ex.refusal is None:
                    # gzip, deflate...: re-framed as chunked, the coding would be silently dropped
                    ex.keep_alive = False
                    ex.refusal = (501, "transfer_coding_unsupported",
                                  f"request transfer coding {value.decode('latin-1')[:64]!r} is not "
                                  "supported; the proxy relays only chunked")
            elif lname == b"upgrade":
                upgrade = upgrade or value.strip().lower() != b"h2c"   # h2c alone is declined, not refused
                h2c = True
            elif lname == b"connection" and value.lower() not in http.PLAIN_CONNECTION:
                skip = http.connection_tokens(ex.req_headers)
        if skip:   # headers named in Connection are hop-by-hop too (rare: a second pass)
            fwd[:] = [piece for i in range(0, len(fwd), 4) if fwd[i].lower() not in skip for piece in fwd[i:i + 4]]
        if (hosts != 1 and (hosts or not ex.http10)) and ex.refusal is None:
            # RFC 9112 §3.2: an HTTP/1.1 request without Host, or any with two, gets 400. Two could
            # name two different hosts, and the model server might route on the other one.
            ex.refusal = (400, "invalid_host_header",
                          "the request names more than one host (two Host fields, or a list in one)" if hosts else
                          "an HTTP/1.1 request must carry a Host header field")
        if ex.method == b"CONNECT" or (upgrade and b"upgrade" in skip):
            ex.keep_alive = False
            ex.refusal = (501, "upgrade_refused", "the proxy does not tunnel CONNECT or protocol upgrades")
        elif h2c and b"upgrade" in skip:
            self._h2c_offer(ex)
        pipelined = bool(self.queue)
        if pipelined and len(self.queue) >= MAX_PIPELINED:
            # One read can hold thousands of tiny pipelined requests, each an Exchange held until
            # its turn: the answers owed go out, this one is refused, then the connection closes.
            raise _Refuse(429, "pipeline_too_deep",
                          f"more than {MAX_PIPELINED} pipelined requests waiting on one connection; "
                          "send the rest on a new connection")
        ex.protocol, ex.model, sampled = self.ctx.routes.get(ex.url) or self._target(ex.url)
        if sampled is not None and not ex.canary and ex.refusal is None:
            model_name, sampler = sampled
            decision = sampler.decide(ex.content_length)
            if decision == "sample":
                ex.capture = Capture(model_name, ex.protocol, sampler.max_bytes)
                ex.capture.request_headers(ex.req_headers)
            elif decision is not None:
                self.ctx.count_sample(model_name, decision)
        self.queue.append(ex)
        if pipelined:
            self.pause_reading("pipeline")
        elif (ex.req_mode == NONE or (ex.req_mode == LENGTH and ex.content_length <= self.start_after_read_below)) \
                and ex.refusal is None and not ex.expect_continue:
            # A small request is most likely whole in this read: it starts once the read is parsed
            # (data_received), so its head and body leave in one write without the outbox.
            self.starting = ex
        else:
            ex.start()

    def _h2c_offer(self, ex: Exchange) -> None:
        """`Upgrade: h2c` alone (curl --http2, Java's HttpClient on http://): declined, not refused.

        A server may answer in HTTP/1.1 as if the offer were absent (RFC 9110 §7.8, RFC 7540
        §3.2), as Envoy does; the Upgrade, Connection and HTTP2-Settings fields are hop-by-hop
        and not forwarded. httptools (llhttp) ends the message at its head and stops as at an
        upgrade: on_message_complete leaves a Content-Length body to be read raw, and
        data_received goes on in HTTP/1.1 with a fresh parser. A chunked body cannot be read
        that way, and a request already refused ends the connection: both as before (501 / its
        refusal, then close).
        """
        if ex.refusal is None and ex.req_mode != CHUNKED:
            self.h2c_offered = True
            return
        ex.keep_alive = False
        if ex.refusal is None:
            ex.refusal = (501, "upgrade_refused", "the proxy declines h2c upgrades in HTTP/1.1 but cannot "
                          "read a chunked body after one; send it with Content-Length or without the offer")

    def _target(self, url: bytes) -> tuple:
        """(protocol, model label, (model name, sampler) or None) of a request target (resolve_target)."""
        ctx = self.ctx
        return resolve_target(ctx.metrics, ctx.routes, url, url.decode("latin-1"), ROUTE_CACHE_SIZE, ctx.samplers)

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.request_body(body)

    def on_message_complete(self) -> None:
        ex, self.parsing = self.parsing, None
        if ex is not None:
            if self.h2c_offered and ex.content_length and ex.content_length > ex.received:   # type: ignore[operator]
                self.parsing = ex   # ended at its head by llhttp (_h2c_offer): the body is read raw
                return
            ex.request_complete()

    # --- used by exchanges (write, writelines, flush: BufferedWriter) ------------------
    def defer_record(self, ex: Exchange) -> None:
        if self.unrecorded is None:
            self.unrecorded = []
            # a new wait for the client: the held-answer clock of check_deadlines starts afresh (a list
            # emptied by resume_writing or _confirm left the old one, and the next wait was cut at once)
            self.held_at = 0.0
        self.unrecorded.append(ex)

    def _record_unrecorded(self, code: str | None = None) -> None:
        """Count the answers that waited on the client's fate: as `code`, or (None) as their own status."""
        for ex in self.unrecorded or ():
            ex.record(code or str(ex.status))
        self.unrecorded = None
        # The wait they were held in is over: a later close must not time the client from its start
        # (_check_closing). When resume_writing counted them, the next close cut at once a client
        # that had been reading.
        self.held_at = 0.0

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
        elif self.eof:
            self.close_gracefully(True)

    def close_gracefully(self, request_read: bool) -> None:
        """Close after the response is flushed; if the client may still be sending, linger first."""
        t = self.transport
        if t is None or self.closed:
            return
        self.closing = True
        self.flush()
        if self.fin_early and self.unrecorded and not self.confirming:
            self.confirming = True
            self.held_at = 0.0   # _confirm times the client from here
            # Our FIN goes out now, after the answer: a half-closed client reading to EOF (an HTTP/1.0
            # close-delimited body, `nc -N`) has its end at once, not CONFIRM_S later. The socket
            # stays open, so a reset from a client that closed for good still shows in _confirm.
            http.send_fin(t)
            self.ctx.loop.call_later(CONFIRM_S, self._confirm)
            return
        if (request_read and self.parsing is None) or self.eof:
            self._close_transport()
            return
        # Half-close and discard what the client is still sending, so it can read our answer.
        self.discarding = True
        if request_read is False and self.parsing is not None and not self.in_head:
            self.drain_limit = BODY_LINGER_MAX_BYTES   # the rest of a body it had begun sending
        self.paused.clear()
        t.resume_reading()
        http.send_fin(t)
        self.ctx.loop.call_later(LINGER_S, self._close_transport)

    def _confirm(self) -> None:
        """Count the answers written after the client's early FIN, then close (see eof_received).

        A client that closed for good resets the connection when the answer reaches it: those
        count 499 (`client_disconnect`), like any client that left before its answer. A half-closed
        client takes the answer: its status counts once its kernel has acknowledged all of it.
        Before, every client timeout counted as the upstream's status (a 200 nobody received)
        when the answer was small.

        A half-closed client that does not read is given `send_timeout` without progress, as any
        slow reader: then its answers count `incomplete` and the connection is aborted
        (`downstream_send_timeout`). It was looked at again every CONFIRM_S for good (the sweep
        leaves a confirming connection to this), holding its socket and our buffer, or, once our
        buffer was in the kernel, counted the status of an answer the client never took.
        """
        self.confirming = False
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return   # connection_lost counted them (or the cut that closed it did)
        gone = self._peer_reset()   # read once: getsockopt(SO_ERROR) clears the error it reports
        if not gone:
            unread = self._unread()   # our buffer and the kernel's unacknowledged bytes
            if unread and not t.get_write_buffer_size():
                unread -= 1   # our FIN (sent once our buffer emptied): a client with all of it unread holds it back
            if unread:
                now = self.ctx.loop.time()
                if not self.held_at or unread < self.held_size:   # progress restarts the clock
                    self.held_at, self.held_size = now, unread
                elif now - self.held_at > self.ctx.limits.send_timeout:
                    self._cut_slow_reader(self.ctx.limits)
                    return
                self.confirming = True
                self.ctx.loop.call_later(CONFIRM_S, self._confirm)
                return
        for ex in self.unrecorded or ():
            if gone:
                self.ctx.errors.inc("client_disconnect")
                ex.record(CLIENT_CLOSED)
            else:
                ex.record(str(ex.status))
        self.unrecorded = None
        for ex in list(self.queue):   # pipelined behind the answer: never started on this connection
            if not ex.started and not ex.finished:
                if gone:
                    ex.client_gone()
                else:
                    ex.dropped_unstarted()
        self.queue.clear()
        if gone:
            t.abort()
        else:
            self._close_transport()

    def _unread(self) -> int:
        """Bytes of ours the client has not taken: our write buffer plus what the kernel holds unacknowledged.

        The write buffer alone shrinks only when the kernel takes more, which needs about half
        its send queue drained: a client reading steadily but slowly (32 KiB/s into a 4 KiB
        receive buffer) looked stalled and was cut as a slow reader.
        """
        t = self.transport
        n = t.get_write_buffer_size() if t is not None else 0
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is not None:
            try:
                buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")   # SIOCOUTQ: unacked bytes
                n += int.from_bytes(buf, sys.byteorder, signed=True)
            except (OSError, ValueError):
                pass
        return n

    def _peer_reset(self) -> bool:
        """Whether the socket holds an error (the client reset the connection); one getsockopt."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except OSError:
            return True

    def _close_transport(self) -> None:
        """close(): our buffer is written first (check_deadlines bounds how long that may take)."""
        if self.transport is not None and not self.closed:
            self.graceful = True
            self.transport.close()

    def abort(self) -> None:
        self._out = []
        self.graceful = False
        if self.transport is not None and not self.closed:
            for ex in self.queue:   # pipelined behind the exchange that forced the cut: never tried
                if not ex.started and not ex.finished:
                    ex.dropped_unstarted()
            self.transport.abort()

    def pause_reading(self, reason: str) -> None:
        if not self.paused and not self.closed and not self.discarding:
            self.transport.pause_reading()
            if reason != "pipeline":
                self.paused_at = self.ctx.loop.time()
        self.paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused and not self.closed:
                self.paused_at = 0.0
                self.last_active = self.ctx.loop.time()   # a paused body was not the client's delay
                self.transport.resume_reading()

    def idle(self) -> bool:
        return not self.queue and self.parsing is None

    def take_back(self, first: bytes) -> bool:
        """Drop buffered output from the last `first` (identity) on, if none of it was written yet."""
        out = self._out
        for i in range(len(out) - 1, -1, -1):
            if out[i] is first:
                del out[i:]
                return True
        return False

    def peer_shut(self) -> bool:
        """Whether the client sent a FIN that paused reading has not seen (one poll, nothing read).

        While pipelined requests wait, reading is paused, so a client that gave up (a timeout)
        is not noticed before the answer at the head of the queue is written. POLLRDHUP tells
        without consuming the pipelined bytes still unread. Once seen, it is the early FIN of
        eof_received: the answers count after _confirm.
        """
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            p = select.poll()
            p.register(sock.fileno(), RDHUP)
            shut = bool(p.poll(0))
        except (OSError, ValueError):
            return False
        if shut:
            self.fin_early = True
        return shut

    def reset_by_peer(self) -> bool:
        """Whether the client reset the connection while reading was paused (one getsockopt).

        A reset is noticed by reading; while reading is paused (pipelined requests queued,
        a body waiting for the upstream) only the socket's pending error tells.
        """
        if not self.paused or self.transport is None:
            return False
        return self._peer_reset()

    # --- refusals ---------------------------------------------------------------------
    def _refuse_head(self, r: _Refuse) -> None:
        """Answer a head the proxy will not forward (408, 414, 431), then close."""
        self.in_head = False
        if self.queue:   # a pipelined head behind a running exchange: answers must stay in order
            self._refuse_in_order(r.status, r.reason, r.message)
            return
        self._answer_and_close(r.status, r.reason, r.message)

    def _bad_request(self, reason: str, message: str) -> None:
        if self.queue:   # mid-exchange: the stream is unusable, and answers must stay in order
            self._refuse_in_order(400, reason, message)
            return
        self._answer_and_close(400, reason, message)

    def _refuse_in_order(self, status: int, reason: str, message: str) -> None:
        """The request being parsed is refused while earlier ones are still owed answers.

        Nothing more is read; the answers owed go out in order, this request's refusal last
        (or, when it is the one in flight, now: its upstream exchange is dropped), then the
        connection closes. Before, the connection was cut: a malformed chunk in a body already
        being forwarded left its client with no answer, counted 499 as if it had left.
        """
        ex, self.parsing = self.parsing, None
        self.in_head = False
        self.pause_reading("closing")
        if ex is None or ex.finished:   # garbage where a request should begin
            ex = Exchange(self, self.ctx)
        ex.keep_alive = False
        if ex.started:   # in flight: its upstream gets a cut request, its client the refusal
            ex.fail_local(status, reason, message)
            return
        ex.refusal = (status, reason, message)
        if ex not in self.queue:
            self.queue.append(ex)

    def _answer_and_close(self, status: int, reason: str, message: str) -> None:
        ctx = self.ctx
        ctx.fail(reason, message)
        ctx.metrics.observe_request("none", "other", str(status), 0.0, None)
        self.write(http.error_response(status, reason, message, keep_alive=False))
        self.parsing = None
        self.in_head = False
        self.close_gracefully(False)

    # --- time -------------------------------------------------------------------------
    def check_deadlines(self, now: float, lim: Limits) -> None:
        """Apply whichever timeout of `lim` this connection's state has passed (see context.py)."""
        t = self.transport
        if self.closed or t is None:
            return
        if t.is_closing():
            if t.get_write_buffer_size():
                self._check_closing(now, lim)
            return
        if self.discarding:
            return
        if self.confirming and not self.write_blocked_at:
            return   # counting answers written after an early FIN (_confirm closes the connection)
        if self.paused and self.reset_by_peer():
            self.graceful = False
            self.transport.abort()   # connection_lost: what is in flight counts 499
            return
        if self.write_blocked_at:
            # Progress, not a deadline: a client that drains anything restarts the clock.
            size = self._unread()
            if size < self.blocked_size:
                self.blocked_size = size
                self.write_blocked_at = now
            elif now - self.write_blocked_at > lim.send_timeout:
                self._cut_slow_reader(lim)
                return
        elif self.unrecorded and not self.fin_early:
            # answers finished while earlier bytes sat in our buffer (Exchange._finish): they count
            # when the kernel has taken everything, or as cut when the client takes nothing for
            # send_timeout (the buffer stayed under the high-water mark, so pause_writing never came)
            if not self.transport.get_write_buffer_size():
                self.held_at = 0.0
                self._record_unrecorded()
            else:
                size = self._unread()
                if not self.held_at or size < self.held_size:
                    self.held_at, self.held_size = now, size
                elif now - self.held_at > lim.send_timeout:
                    self._cut_slow_reader(lim)
                    return
        ex = self.queue[0] if self.queue else None
        if ex is not None and ex.started and not ex.finished:
            if ex.request_done:
                if not ex.response_started:
                    if now - ex.req_done_at > lim.ttfb:
                        ex.upstream_failed("upstream_timeout", f"the upstream sent no response head within "
                                                               f"{lim.ttfb} s of the request's end")
                elif not self.write_blocked_at and now - max(ex.last_up, ex.req_done_at) > lim.upstream_idle:
                    ex.upstream_failed("upstream_idle_timeout",
                                       f"the upstream sent nothing for {lim.upstream_idle} s mid-response")
            elif self.paused_at:
                if now - self.paused_at > lim.upstream_idle:   # the upstream stopped reading our body
                    ex.upstream_failed("upstream_timeout",
                                       f"the upstream read none of the request body for {lim.upstream_idle} s")
            elif now - self.last_active > lim.body_idle:
                ex.fail_local(408, "request_body_timeout",
                              f"no request body bytes for {lim.body_idle} s")
            return
        if self.parsing is not None and self.parsing.finished and not self.in_head:
            # The rest of a body whose exchange is over (the upstream answered early): dropped
            # as it arrives, but a client that stops sending it must not hold the connection.
            if now - self.last_active > lim.body_idle:
                self.ctx.fail("request_body_timeout", f"no request body bytes for {lim.body_idle} s")
                self._close_transport()
            return
        if self.in_head:
            if now - self.head_started > lim.head_timeout:
                self._refuse_head(_Refuse(408, "request_head_timeout",
                                          f"request head not complete within {lim.head_timeout} s"))
            return
        if ex is None and self.parsing is None:
            # A connection that never sent a byte gets the head timeout; a used one keep-alive.
            if now - self.last_active > (lim.keepalive_idle if self.used else lim.head_timeout):
                self._close_transport()

    def _check_closing(self, now: float, lim: Limits) -> None:
        """A transport we closed still holds bytes for the client: it must take some within send_timeout.

        close() waits for our buffer to be written; a client that never reads again held the socket,
        its buffer and a connection slot for good.
        """
        size = self._unread()
        if not self.held_at or size < self.held_size:
            self.held_at, self.held_size = now, size
        elif now - self.held_at > lim.send_timeout:
            self._cut_slow_reader(lim)

    def _cut_slow_reader(self, lim: Limits) -> None:
        self.cut("downstream_send_timeout", f"a client read none of its response for {lim.send_timeout} s")

    def cut(self, reason: str, message: str, unanswered: str = INCOMPLETE) -> None:
        """The proxy ends this connection itself (a slow reader, the drain deadline): what it cuts
        counts as the proxy's doing, not the client's leaving (499). Answers waiting on the client
        and answers begun count `incomplete`, requests in flight with no answer begun `unanswered`
        (the drain deadline: `502`), and pipelined ones never started `502` (abort)."""
        self.ctx.fail(reason, message)
        self._record_unrecorded(INCOMPLETE)
        self.write_blocked_at = 0.0
        for ex in list(self.queue):
            if ex.started and not ex.finished:
                ex._drop_upstream()
                if ex.response_started or unanswered == INCOMPLETE:
                    ex._finish(INCOMPLETE)
                else:   # nothing of an answer will come: counted now (not deferred)
                    ex.finished = True
                    self.ctx.metrics.inflight_count -= 1
                    ex.record(unanswered)
        self._reset()
        self.abort()

    def _reset(self) -> None:
        """Make the abort that follows a reset: what the kernel still holds for the client is dropped.

        A plain close hands the kernel's send queue to an orphan socket that goes on delivering
        it: a client cut as a slow reader (counted `incomplete`) could still read its whole answer.
        """
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None and not self.closed:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except (OSError, ValueError):
                pass


def close_idle(ctx: ProxyContext, idle_s: float) -> int:
    """Close keep-alive client connections with no request for `idle_s` seconds; returns how many."""
    cutoff = ctx.loop.time() - idle_s
    stale = [c for c in ctx.connections if c.idle() and c.last_active < cutoff and c.transport is not None]
    for c in stale:
        c._close_transport()
    return len(stale)
