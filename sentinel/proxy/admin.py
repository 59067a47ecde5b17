"""The admin listener: a small buffered HTTP/1.1 server for /metrics, /healthz, /readyz, /status, /ingest."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httptools

from sentinel.proxy import http

log = logging.getLogger("sentinel.admin")


class Request:
    """A fully read admin request."""

    __slots__ = ("method", "path", "headers", "body")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body


Response = tuple[int, bytes, bytes]   # status, content type, body
Handler = Callable[[Request], Awaitable[Response]]


class AdminConnection(asyncio.Protocol):
    """Reads one request at a time (bodies up to `max_body`), answers via `handler`."""

    def __init__(self, handler: Handler, max_body: int):
        self.handler = handler
        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_big = False
        self._busy: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._send(400, b"application/json", http.error_body(400, "bad_request", str(exc)), False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size, self._too_big = b"", {}, [], 0, False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        cl = self._headers.get("content-length")
        if cl is not None and int(cl) > self.max_body:
            self._too_big = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body:
            self._too_big = True
        if not self._too_big:
            self._body.append(body)

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        if self._too_big:
            self._send(413, b"application/json",
                       http.error_body(413, "body_too_large", f"body exceeds {self.max_body} bytes"), keep)
            return
        req = Request(self.parser.get_method().decode(), self._url.decode("latin-1"), self._headers,
                      b"".join(self._body))
        self.transport.pause_reading()  # type: ignore[union-attr]
        self._busy = asyncio.get_running_loop().create_task(self._run(req, keep))

    async def _run(self, req: Request, keep: bool) -> None:
        try:
            status, ctype, body = await self.handler(req)
        except Exception as exc:  # an admin endpoint bug must not kill the listener
            log.exception("admin handler failed for %s %s", req.method, req.path)
            status, ctype, body = 500, b"application/json", http.error_body(500, "internal", str(exc))
        self._send(status, ctype, body, keep)
        if self.transport is not None and keep:
            self.transport.resume_reading()

    def _send(self, status: int, ctype: bytes, body: bytes, keep: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(http.response(status, body, ctype, keep_alive=keep))
        if not keep:
            self.transport.close()
