"""The admin listener: a small buffered HTTP/1.1 server for /metrics, /healthz, /readyz, /status, /ingest.

It has the proxy's protections with its own budget (`proxy.admin_max_connections`), so a
flood of the proxy port leaves `/healthz` and `/metrics` answering: a head must be
complete within `request_head_timeout_s` (408), a body must keep arriving
(`body_idle_timeout_s`), idle keep-alive connections close, a declared body over the
limit is refused (413) before it is read, oversized heads get 414/431, and Upgrade or
CONNECT get 501 — never a traceback. Pipelined requests are answered one at a time, in
order; at most `MAX_PIPELINED` are read ahead, then the connection closes after answering them.

A POST whose body is refused (413) is still told to the handler, its head only: a `Request`
whose `headers` is a `RefusedBody` and whose body is empty, so that an endpoint can count what
the head says (/ingest: a binary-mode CloudEvent's Ce-* headers name the event and its model).
The 413 goes out at once either way and the body is never read; the handler's answer is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from sentinel.proxy import http
from sentinel.proxy.context import Limits

log = logging.getLogger("sentinel.admin")

LINGER_S = 1.0
MAX_PIPELINED = 8   # requests read ahead of their answers on one connection; nothing more is read


class Request:
    """A fully read admin request."""

    __slots__ = ("method", "path", "headers", "body", "peer")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes, peer: str | None = None):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.peer = peer   # the client's IP address


class RefusedBody(dict[str, str]):
    """The headers of a request whose body was refused unread (413): `size` the bytes it declared
    (Content-Length) or, for a chunked body, that had come when it passed `limit`. Only the listener
    makes one (no header on the wire can say a body was refused)."""

    def __init__(self, headers: dict[str, str], size: int, limit: int, chunked: bool = False):
        super().__init__(headers)
        self.size, self.limit, self.chunked = size, limit, chunked


Response = tuple[int, bytes, bytes]   # status, content type, body
Handler = Callable[[Request], Awaitable[Response]]


class _Refuse(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class _Stop(Exception):
    """Raised in a parser callback: nothing after this request is read (see on_message_complete)."""


class AdminConnections:
    """The admin listener's shared state: limits, its connection budget, one deadline sweep."""

    def __init__(self, limits: Limits, fail: Callable[[str, str], None] | None = None):
        self.limits = limits
        self.fail = fail or (lambda reason, message: None)
        self.open: set[AdminConnection] = set()
        self.telling: set[asyncio.Task] = set()   # handlers told of a refused body (kept from the collector)

    def sweep(self, now: float) -> None:
        for c in list(self.open):
            c.check_deadlines(now)

    async def run_sweeper(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.limits.tick)
            self.sweep(loop.time())


class AdminConnection(asyncio.Protocol):
    """Reads one request at a time (bodies up to `max_body`), answers via `handler`."""

    def __init__(self, handler: Handler, max_body: int, shared: AdminConnections | None = None):
        self.handler = handler
        self.max_body = max_body
        self.shared = shared or AdminConnections(Limits())
        self.limits = self.shared.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._head_bytes = 0
        self._busy: asyncio.Task | None = None
        self._pending: deque[tuple[Request, bool]] = deque()   # read, not yet answered, in order
        self._stopped = False  # nothing more is read: answer what is pending, then close
        self._done = False     # an answer was given that ends the connection
        self._refusal: tuple[int, str, str] | None = None   # a refusal owed after the pending answers
        self.in_head = False
        self.in_body = False
        self._h2c = False       # the request being parsed offers h2c, declined (on_headers_complete)
        self.used = False
        self.last_active = 0.0
        self.head_started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_active = asyncio.get_running_loop().time()
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        lim = self.limits
        if len(self.shared.open) >= lim.max_connections:
            self.shared.fail("admin_connection_limit", f"more than {lim.max_connections} admin connections")
            self._done = True
            transport.write(lim.shed_response())   # type: ignore[attr-defined]
            transport.close()
            return
        self.shared.open.add(self)

    def data_received(self, data: bytes) -> None:
        if self._done or self._stopped:
            return
        self.last_active = asyncio.get_running_loop().time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            r = exc.__context__
            if isinstance(r, _Stop):
                return
            if isinstance(r, _Refuse):
                self._refuse(r.status, r.reason, r.message)
            else:
                log.error("internal error in the admin listener: %r", r)
                self._refuse(500, "internal", "internal error")
        except httptools.HttpParserUpgrade as exc:
            if self._h2c:   # a declined h2c offer (on_headers_complete): HTTP/1.1 goes on, for a fresh parser
                self._h2c = False
                self.parser = httptools.HttpRequestParser(self)
                rest = data[exc.args[0]:]
                if rest:
                    self.data_received(rest)
                return
            self._refuse(501, "upgrade_refused", "the admin listener does not support CONNECT or upgrades")
        except httptools.HttpParserError as exc:
            self._refuse(400, "bad_request", f"malformed HTTP request: {exc}")
        else:
            if self.in_head:
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_line + self.limits.max_head:
                    self._refuse(431, "headers_too_large", f"request head longer than {self.limits.max_head} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.shared.open.discard(self)

    # --- httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", {}, [], 0
        self.used = self.in_head = True
        self.in_body = self._h2c = False
        self.head_started = self.last_active
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_line:
            raise _Refuse(414, "uri_too_long", f"request target longer than {self.limits.max_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        if len(self._headers) > self.limits.max_headers:
            raise _Refuse(431, "too_many_headers", f"more than {self.limits.max_headers} header fields")

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.in_body = True
        cl = self._headers.get("content-length")
        if cl is not None and int(cl) > self.max_body:
            self._tell_refused(int(cl), chunked=False)
            raise _Refuse(413, "body_too_large", f"body of {cl} bytes exceeds the limit of {self.max_body}")
        up = self._headers.get("upgrade")
        if up is not None and up.strip().lower() == "h2c" and self._headers.get("content-length", "0").strip() == "0" \
                and "transfer-encoding" not in self._headers:
            # An h2c offer without a body (curl --http2 on /metrics): declined by answering in
            # HTTP/1.1 (RFC 9110 §7.8), as the proxy listener does; data_received goes on after it.
            self._h2c = True
        elif self.parser.get_method() == b"CONNECT" or up is not None:
            raise _Refuse(501, "upgrade_refused", "the admin listener does not support CONNECT or upgrades")
        te = self._headers.get("transfer-encoding")
        if te is not None and te.strip().lower() != "chunked":
            # `gzip, chunked` is framed as chunks but still coded: refused as the proxy listener
            # refuses it (it waited out the body timeout here)
            raise _Refuse(501, "transfer_coding_unsupported",
                          f"request transfer coding {te[:64]!r} is not supported; send chunked or Content-Length")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body:
            self._tell_refused(self._size, chunked=True)
            raise _Refuse(413, "body_too_large", f"body exceeds the limit of {self.max_body} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_body = False
        keep = self.parser.should_keep_alive()
        req = Request(self.parser.get_method().decode(), self._url.decode("latin-1"), self._headers,
                      b"".join(self._body), self.peer)
        self._body = []
        # Pipelined requests in the same read are answered one at a time, in order (they were
        # handled concurrently and their answers lost); a few are read ahead, then reading stops.
        self._pending.append((req, keep))
        if self._busy is None:
            self.transport.pause_reading()  # type: ignore[union-attr]
            self._busy = asyncio.get_running_loop().create_task(self._run())
        if not keep or len(self._pending) >= MAX_PIPELINED:
            self._stopped = True
            raise _Stop()   # stop this read's parse here: what follows is not read

    def _tell_refused(self, size: int, chunked: bool) -> None:
        """Hand the head of a POST whose body is refused to the handler (see the module docstring)."""
        if self.parser.get_method() != b"POST":
            return
        req = Request("POST", self._url.decode("latin-1"), RefusedBody(self._headers, size, self.max_body, chunked),
                      b"", self.peer)
        task = asyncio.get_running_loop().create_task(self._told(req))
        self.shared.telling.add(task)
        task.add_done_callback(self.shared.telling.discard)

    async def _told(self, req: Request) -> None:
        try:
            await self.handler(req)
        except Exception:  # an endpoint bug must not kill the listener; the 413 went out anyway
            log.exception("admin handler failed for the refused body of %s %s", req.method, req.path)

    async def _run(self) -> None:
        while self._pending:
            req, keep = self._pending.popleft()
            try:
                status, ctype, body = await self.handler(req)
            except Exception as exc:  # an admin endpoint bug must not kill the listener
                log.exception("admin handler failed for %s %s", req.method, req.path)
                status, ctype, body = 500, b"application/json", http.error_body(500, "internal", str(exc))
            last = self._stopped and not self._pending
            # a refusal behind the last answer keeps the connection open for it (see _refuse)
            self._send(status, ctype, body, keep and (not last or self._refusal is not None),
                       head=req.method == "HEAD")
            if not keep or last or self.transport is None:
                break
        self._pending.clear()
        self._busy = None
        if self._refusal is not None:
            self._refuse(*self._refusal)
        elif self.transport is not None and not self._stopped:
            self.last_active = asyncio.get_running_loop().time()
            self.transport.resume_reading()

    def _send(self, status: int, ctype: bytes, body: bytes, keep: bool, head: bool = False) -> None:
        if self.transport is None:
            return
        out = http.response(status, body, ctype, keep_alive=keep)
        if head and body:   # a HEAD answer says the body's length but carries none (RFC 9110 §9.3.2)
            out = out[:-len(body)]
        self.transport.write(out)
        if not keep:
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer without reading further, then close."""
        if self._refusal is None:
            self.shared.fail(reason, f"admin listener: {message}")
        if self._busy is not None:
            # answers still owed come first: they go out, then this one (it was dropped: a pipelined
            # event over the body limit got no answer, only the close), then the close
            self._stopped = True
            self._refusal = (status, reason, message)
            self.in_head = self.in_body = False
            return
        self._refusal = None
        self._done = True
        self.in_head = self.in_body = False
        self._body = []
        t = self.transport
        if t is None:
            return
        t.write(http.response(status, http.error_body(status, reason, message), keep_alive=False))
        t.resume_reading()   # reading was paused for the answers owed before it: what still comes is discarded
        http.send_fin(t)   # half-close, and discard what the client still sends, so it can read the answer
        asyncio.get_running_loop().call_later(LINGER_S, t.close)

    # --- time -------------------------------------------------------------------------
    def check_deadlines(self, now: float) -> None:
        if self.transport is None or self._done or self._busy is not None:
            return
        lim = self.limits
        if self.in_head:
            if now - self.head_started > lim.head_timeout:
                self._refuse(408, "request_head_timeout", f"request head not complete within {lim.head_timeout} s")
        elif self.in_body:
            if now - self.last_active > lim.body_idle:
                self._refuse(408, "request_body_timeout", f"no request body bytes for {lim.body_idle} s")
        elif now - self.last_active > (lim.keepalive_idle if self.used else lim.head_timeout):
            self.transport.close()
