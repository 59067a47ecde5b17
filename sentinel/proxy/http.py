"""HTTP/1.1 details the proxy needs: hop-by-hop headers, reason phrases, error responses."""

from __future__ import annotations

import json
from typing import Any

# RFC 9110 §7.6.1 connection-specific fields, plus the de-facto Proxy-Connection.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection",
})

REASONS = {
    100: b"Continue", 200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
    413: b"Content Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 403: b"Forbidden", 408: b"Request Timeout",
    414: b"URI Too Long", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 501: b"Not Implemented",
    505: b"HTTP Version Not Supported",
}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Connection header values that name no other header (the common case: nothing more to strip).
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
JOIN_BELOW = 64 * 1024   # buffered output smaller than this leaves as one buffer (one iovec)


def field_bytes(headers: list[tuple[bytes, bytes]]) -> int:
    """What header fields count against a head's size limit: name + value + 4 (`: ` and CRLF) each."""
    return sum(len(n) + len(v) for n, v in headers) + 4 * len(headers)


class TrailersTooLarge(Exception):
    """Raised by `Trailers.append` (in a parser callback): the trailer fields passed a bound."""

    def __init__(self, count: bool):
        super().__init__("too many trailer fields" if count else "trailer fields too large")
        self.count = count   # the count of fields was passed (else their size)


class Trailers:
    """Where a parser's `on_header` puts a chunked message's trailer fields: counted, never kept.

    httptools reports trailer fields through on_header after on_headers_complete, where no limit
    is checked: appended to the head's fields, they were kept for as long as the peer sent them.
    The fields of the head and its trailers are held together to `max_count` fields and `max_size`
    bytes (`field_bytes`); past either, `append` raises `TrailersTooLarge` (see `over`).
    """

    __slots__ = ("count", "size", "max_count", "max_size")

    def __init__(self, headers: list[tuple[bytes, bytes]], max_count: int, max_size: int):
        self.count = len(headers)
        self.size = field_bytes(headers)
        self.max_count = max_count
        self.max_size = max_size

    def __len__(self) -> int:
        return self.count

    def append(self, field: tuple[bytes, bytes]) -> None:
        self.count += 1
        self.size += len(field[0]) + len(field[1]) + 4
        if self.count > self.max_count or self.size > self.max_size:
            self.over(self.count > self.max_count)

    def over(self, count: bool) -> None:
        raise TrailersTooLarge(count)


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in `Connection:` (they are hop-by-hop too)."""
    out: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(out)


def send_fin(transport: Any) -> None:
    """Half-close: our FIN goes out after what is buffered; reading goes on. A transport that cannot
    (not TCP), or whose socket is already gone, is left as it is."""
    try:
        if transport.can_write_eof():
            transport.write_eof()
    except OSError:
        pass


def response(status: int, body: bytes, content_type: bytes = b"application/json",
             keep_alive: bool = True, extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete HTTP/1.1 response with a Content-Length body."""
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Unknown")),
             b"content-type: " + content_type,
             b"content-length: %d" % len(body)]
    lines += [n + b": " + v for n, v in extra]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def error_body(status: int, reason: str, message: str) -> bytes:
    """The JSON body of a response the proxy gives itself."""
    return json.dumps({"error": {"code": status, "reason": reason, "message": message}},
                      separators=(",", ":")).encode()


def error_response(status: int, reason: str, message: str, keep_alive: bool,
                   extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A JSON error response the proxy answers with itself (400, 408, 413, 414, 431, 501, 502, 503, 504)."""
    return response(status, error_body(status, reason, message), keep_alive=keep_alive, extra=extra)


class Outbox:
    """Coalesces writes made while one read is processed into one writev per connection.

    httptools reports a request's head and body (or a response's) in separate callbacks;
    writing each at once costs a syscall apiece, which dominated the proxy's CPU time.
    """

    __slots__ = ("active", "pending")

    def __init__(self) -> None:
        self.active = False
        self.pending: list = []   # connections holding buffered output

    def flush(self) -> None:
        self.active = False
        pending = self.pending
        if pending:
            self.pending = []
            for conn in pending:
                conn.flush()


class BufferedWriter:
    """The one write path of both sides of the proxy: batched through the shared Outbox.

    A subclass sets `outbox`, `transport`, `closed` and `_out` (an empty list).
    """

    __slots__ = ()
    outbox: Outbox
    transport: Any
    closed: bool
    _out: list

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.outbox.active:
            out = self._out
            if not out:
                self.outbox.pending.append(self)
            out.append(data)
        else:
            self.transport.write(data)

    def writelines(self, data: Any) -> None:
        if self.closed:
            return
        if self.outbox.active:
            out = self._out
            if not out:
                self.outbox.pending.append(self)
            out.extend(data)
        else:
            _write_out(self.transport, data)   # one buffer when small: uvloop's one-buffer write is its fast path

    def flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        t = self.transport
        if t is not None and not self.closed and not t.is_closing():
            _write_out(t, out)

    def send(self, out: list) -> None:
        """Write the pieces of `out` now, in one write, after what the outbox holds for this connection."""
        if self.closed:
            return
        if self._out:   # earlier bytes wait for the outbox's flush: these go after them
            self._out.extend(out)
            return
        t = self.transport
        if t is not None and not t.is_closing():
            _write_out(t, out)


def _write_out(t: Any, out: list) -> None:
    if len(out) == 1:
        t.write(out[0])
    elif sum(map(len, out)) < JOIN_BELOW:
        t.write(b"".join(out))   # a head and a small body: one copy here, one iovec in the kernel
    else:
        t.writelines(out)   # large bodies are not copied


# Methods whose request may be sent twice without changing the outcome (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
