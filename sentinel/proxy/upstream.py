"""Pooled keep-alive HTTP/1.1 connections to the model server, parsed with httptools."""

from __future__ import annotations

import asyncio
import logging
import select
from typing import TYPE_CHECKING, Any

import httptools

from sentinel.proxy.http import BufferedWriter, Outbox, Trailers, TrailersTooLarge

if TYPE_CHECKING:
    from sentinel.proxy.exchange import Exchange

log = logging.getLogger("sentinel.proxy")

WRITE_HIGH_WATER = 256 * 1024
# Bytes of one response head before it is refused as 502: the head as received, from its status
# line to its blank line, whatever reads it came in (`UpstreamConnection._head_size`). The pool's
# `max_head` is set from `proxy.max_request_line_bytes + max_header_bytes`. A chunked response's
# trailer fields count with its head's fields (http.field_bytes) against the same bound, and its
# reads without body data (trailers, chunk lines) may bring at most that many bytes.
MAX_RESPONSE_HEAD = 8192 + 65536
_PARSE_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)
_HEAD, _CHUNKS = 1, 2   # UpstreamConnection.bounded: what a read's bytes are counted against
_NO_MAX = 1 << 62       # response fields have no bound on their count, only on their bytes


class UpstreamConnection(BufferedWriter, asyncio.Protocol):
    """One connection to the model server; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.until_close = False   # response body delimited by connection close
        self.informational = False  # the message being parsed is not the final response: skip it
        # What the reads are counted against (0: nothing): _HEAD, a response head has begun and is
        # not complete; _CHUNKS, a chunked body, whose reads without body data are bounded (_bound)
        self.bounded = 0
        self.head_bytes = 0         # bytes of the head in reads before the one being parsed
        self.head_tail = b""        # their last 3 bytes (the blank line may begin there)
        self.framing = 0            # bytes of a chunked body's reads since the last that brought body data
        self.read = b""             # the read being parsed
        self.skip = 0               # bytes of `skip_read` before the message being parsed (a 1xx head)
        self.skip_read: bytes | None = None
        self.outbox = pool.outbox
        self._out: list[bytes] = []
        self._poll: Any = None
        self.completing = False      # inside on_message_complete: the parser may hold more of this read
        self.release_pending = False  # released while completing: pooled once the read is parsed

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()   # for `stale()`: one poll(0) call, no allocation per check
            self._poll.register(sock.fileno(), select.POLLIN)

    def stale(self) -> bool:
        """Whether an idle connection has something to read: the server closed it (or sent garbage)."""
        p = self._poll
        if p is None:
            return False
        try:
            return bool(p.poll(0))
        except (OSError, ValueError):
            return True

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:       # nothing asked: a confused server; do not reuse
            self.abort()
            return
        ex.last_up = ex.ctx.loop.time()   # progress, for the upstream idle timeout
        self.outbox.active = True
        self.read = data
        try:
            try:
                self.parser.feed_data(data)
            except _PARSE_ERRORS as exc:
                self._feed_failed(exc)
            if self.bounded and not self.closed:   # the upstream picks these sizes: bounded like a request's
                self._bound(data)
        finally:
            self.read = b""
            ex = self.exchange
            if ex is not None and ex.out is not None:   # a response that goes on in the next read
                ex.send_out()
            if self.release_pending:   # bytes after the response were parsed first (on_message_begin)
                self.release_pending = False
                self.pool.release(self)
            self.outbox.flush()

    def _bound(self, data: bytes) -> None:
        """After a read that left a head incomplete, or in a chunked body: refuse what passed its bound."""
        lim = self.pool.max_head
        if self.bounded == _HEAD:
            start = self.skip if self.skip_read is data else 0
            self.skip_read = None
            self.head_tail = (self.head_tail + (data[-3:] if len(data) - start >= 3 else data[start:]))[-3:]
            self.head_bytes += len(data) - start
            if self.head_bytes > lim:   # its bytes so far: as whole, it would be refused too
                self._too_large(f"response head from upstream longer than {lim} bytes")
            return
        ex = self.exchange
        if ex is None or ex.finished:
            return
        if ex.out is not None:   # this read brought part of the response (ex.out: sent in data_received)
            self.framing = 0
            return
        self.framing += len(data)
        if self.framing > lim:
            # one trailer field that never ends is held by httptools until it does; chunk lines
            # (their extensions) may go on without end too
            self._too_large(f"chunked response trailers (or chunk lines) from upstream longer than {lim} "
                            "bytes without body data")

    def _too_large(self, message: str) -> None:
        ex = self.exchange
        self.abort()
        if ex is not None:
            ex.upstream_failed("upstream_headers_too_large", message)

    def _feed_failed(self, exc: Exception) -> None:
        """httptools stopped parsing a read (a bug in a callback, bad bytes, an upgrade)."""
        if isinstance(exc, httptools.HttpParserCallbackError) and isinstance(exc.__context__, TrailersTooLarge):
            self._too_large(f"chunked response trailers from upstream: its head's fields and its trailer "
                            f"fields longer than {self.pool.max_head} bytes")
        elif isinstance(exc, httptools.HttpParserCallbackError):
            # a bug in our own callbacks, not the upstream's fault: say so loudly
            log.exception("internal error while relaying a response")   # called from data_received's except
            ex = self.exchange
            self.abort()
            if ex is not None:
                ex.upstream_failed("internal_error", "internal error in the proxy")
        elif isinstance(exc, httptools.HttpParserUpgrade):   # a 101 (refused in on_headers_complete)
            self._bad_response("upstream switched protocols")
        else:
            self._bad_response(f"malformed response from upstream: {exc}")

    def _bad_response(self, message: str) -> None:
        ex = self.exchange
        self.abort()
        if ex is not None:
            ex.upstream_failed("upstream_bad_response", message)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        ex, self.exchange = self.exchange, None
        if ex is None:
            return
        if self.until_close and ex.response_started and exc is None:
            ex.response_done(reusable=False)   # the close (FIN) is the end of this body; a reset is not
        else:
            ex.upstream_failed("upstream_reset", "upstream closed the connection" +
                               (f": {exc}" if exc else " before the response was complete"))

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.pause_reading("upstream")

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.resume_reading("upstream")

    # --- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.exchange is None:
            # A response nobody asked for: bytes after a complete response (a body longer than
            # its Content-Length). Reused, the connection would answer the next request with them.
            self.abort()
        self.headers = []
        self.reason = b""
        self.until_close = False
        self.bounded = _HEAD
        self.head_bytes = 0
        self.head_tail = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # The head's size is checked once it is complete (on_headers_complete) and after every
        # read that leaves it incomplete (data_received); trailer fields go to a Trailers (on_chunk_header).
        self.headers.append((name, value))

    def _head_end(self) -> int:
        """Where, in the read being parsed, the head just parsed ends (after its blank line).

        httptools refuses a line end without CR and a line break inside a field, so the first
        CRLF CRLF from the head's start is its end (it may begin in the read before).
        """
        data = self.read
        if self.head_bytes:   # the head began in an earlier read
            tail = self.head_tail
            across = (tail + data[:3]).find(b"\r\n\r\n")   # 7 bytes: a match begins in the tail
            return across + 4 - len(tail) if across >= 0 else data.find(b"\r\n\r\n") + 4
        return data.find(b"\r\n\r\n", self.skip if self.skip_read is data else 0) + 4

    def _head_size(self) -> int:
        """Bytes of the head just parsed, as received: status line, fields, blank line, whatever the reads."""
        start = 0 if self.head_bytes or self.skip_read is not self.read else self.skip
        return self.head_bytes + self._head_end() - start

    def on_headers_complete(self) -> None:
        self.bounded = 0
        # The head is no longer than the reads it came in: measured only when they are over the limit.
        if self.head_bytes + len(self.read) > self.pool.max_head and self._head_size() > self.pool.max_head:
            self._too_large(f"response head from upstream longer than {self.pool.max_head} bytes")
            return
        status = self.parser.get_status_code()
        if 200 <= status < 600:
            self.informational = False
            if self.exchange is not None:
                self.exchange.response_head(status, self.reason, self.headers, self)
            return
        self.informational = True   # not a final response: its (empty) body is skipped too
        if 100 <= status < 200 and status != 101:
            # 100 Continue, 103 Early Hints...: the proxy answered Expect itself; dropped. The final
            # head may begin in this read: its size starts after this one's blank line.
            self.skip, self.skip_read = self._head_end(), self.read
            return
        # 101 (the proxy forwards no Upgrade, so none was asked for) or a status outside
        # RFC 9110's 100..599: not a response a client can be given.
        self._bad_response(f"upstream answered with status {status}, which the proxy cannot relay")

    def on_chunk_header(self) -> None:
        if self.bounded != _CHUNKS:   # the first chunk: trailer fields may follow the last
            self.bounded = _CHUNKS
            self.framing = 0
            self.headers = Trailers(self.headers, _NO_MAX, self.pool.max_head)   # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self.informational or self.exchange is None:
            return
        # The rest of this read is still to be parsed: a pipelined request behind this one must
        # not be handed this connection (and be answered with those bytes) before it is.
        # (No try/finally: if response_done raises, _feed_failed aborts this connection anyway.)
        self.completing = True
        self.exchange.response_done(reusable=self.parser.should_keep_alive())
        self.completing = False

    # --- used by the exchange (write, writelines, flush: BufferedWriter) ---------
    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection without reporting to the exchange (it already knows)."""
        self.exchange = None
        self.closed = True
        self._out = []
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections to one host:port, reused last-in first-out."""

    def __init__(self, host: str, port: int, connect_timeout: float, max_idle: int, outbox: Outbox | None = None):
        self.outbox = outbox or Outbox()
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.max_head = MAX_RESPONSE_HEAD   # set from the listener's limits by ProxyContext
        self.idle: list[UpstreamConnection] = []
        self.opened = 0

    def get_idle(self, check_stale: bool = False) -> UpstreamConnection | None:
        """The most recently used idle connection, or None.

        `check_stale` (for requests that must not be sent twice) first polls the socket: an
        idle keep-alive connection that is readable has been closed by the server (or holds
        garbage), so it is dropped before anything is written to it, not after.
        """
        while self.idle:
            c = self.idle.pop()
            t = c.transport
            if c.closed or t is None or t.is_closing():
                continue
            if check_stale and c.stale():
                c.abort()
                continue
            return c
        return None

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can drop a cancel (the client
        # went away) that arrives just as the connect completes, and it runs the connect in a
        # task of its own.
        async with asyncio.timeout(self.connect_timeout):
            _, proto = await loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port)
        self.opened += 1
        return proto

    def release(self, conn: UpstreamConnection) -> None:
        conn.exchange = None
        if conn.closed:
            return
        if conn.completing:   # see UpstreamConnection.on_message_complete
            conn.release_pending = True
            return
        if len(self.idle) < self.max_idle:
            conn.resume_reading()
            self.idle.append(conn)
        else:
            conn.abort()

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        for c in self.idle:
            c.abort()
        self.idle.clear()
