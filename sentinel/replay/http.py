"""A minimal asyncio HTTP/1.1 keep-alive client for load generation.

Why not httpx: the replay client must sustain thousands of requests per second on one
shared core and account for its own time precisely; a generic client spends most of its
time in layers we do not need. This speaks just enough HTTP/1.1: one request at a time
per connection, Content-Length or chunked response bodies, `Connection: close`, over
plain TCP or TLS (https URLs).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

# What a model server's answer may take in the client (replay, and the canary inside the daemon):
# a prediction for one sample is kilobytes; a server streaming gigabytes must not exhaust memory.
MAX_RESPONSE_BYTES = 64 << 20   # body, as proxy.max_body_bytes
MAX_RESPONSE_HEADERS = 100      # header lines (each at most the StreamReader's 64 KiB line limit)


class HttpError(Exception):
    """A transport failure; `kind` is a short label for reports (connect, timeout, reset, protocol)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]   # lower-case names
    body: bytes


@dataclass(frozen=True)
class Target:
    """Where requests go: scheme, host, port and a path prefix from a base URL."""

    host: str
    port: int
    prefix: str = ""
    tls: bool = False     # https: TLS with the system's trust store and hostname checks

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), parts.path.rstrip("/"), tls)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


class Connection:
    """One keep-alive connection; `request` may be called again once it has returned."""

    def __init__(self, target: Target, connect_timeout: float = 2.0):
        self.target = target
        self.connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.retries = 0   # requests resent once on a fresh connection after the kept-alive one closed

    async def _connect(self) -> None:
        try:
            ctx = _tls_context() if self.target.tls else None
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that
            # arrives as the connect completes, and the cancelled request then waits for an answer.
            async with asyncio.timeout(self.connect_timeout):
                self._reader, self._writer = await asyncio.open_connection(self.target.host, self.target.port,
                                                                           ssl=ctx)
        except TimeoutError:
            raise HttpError("connect", f"connect to {self.target.authority} timed out") from None
        except ssl.SSLError as exc:
            raise HttpError("tls", f"TLS handshake with {self.target.authority} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise HttpError("connect", f"cannot connect to {self.target.authority}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(self, head: bytes, body: bytes) -> Response:
        """Send a pre-built request head (see `build_head`) and body; read the whole response."""
        reused = self._writer is not None
        if not reused:
            await self._connect()
        try:
            return await self._exchange(head, body)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.close()
            if reused and isinstance(exc, (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)) \
                    and not getattr(exc, "partial", b""):
                # The server closed an idle keep-alive connection: retry once on a fresh one.
                # Counted: a server that closes after reading the request looks the same.
                self.retries += 1
                await self._connect()
                try:
                    return await self._exchange(head, body)
                except (ConnectionError, asyncio.IncompleteReadError) as exc2:
                    self.close()
                    raise HttpError("reset", f"connection to {self.target.authority} lost: {exc2!r}") from None
            raise HttpError("reset", f"connection to {self.target.authority} lost: {exc!r}") from None
        except asyncio.CancelledError:
            self.close()  # half-read responses make the connection unusable
            raise

    async def _exchange(self, head: bytes, body: bytes) -> Response:
        assert self._reader is not None and self._writer is not None
        self._writer.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self._writer.write(body)
        await self._writer.drain()
        try:
            return await self._read_response()
        except (ValueError, asyncio.LimitOverrunError) as exc:   # ValueError: a line over the reader's limit
            self.close()
            raise HttpError("protocol", f"malformed response from {self.target.authority}: {exc}") from None

    async def _read_response(self) -> Response:
        """Status line, headers and body, each bounded (`MAX_RESPONSE_BYTES`, `MAX_RESPONSE_HEADERS`)."""
        assert self._reader is not None
        line = await self._reader.readuntil(b"\r\n")
        try:
            _, code, *_ = line.split(b" ", 2)
            status = int(code)
        except ValueError:
            self.close()
            raise HttpError("protocol", f"bad status line {line[:80]!r}") from None
        headers: dict[str, str] = {}
        for _ in range(MAX_RESPONSE_HEADERS + 1):
            h = await self._reader.readuntil(b"\r\n")
            if h == b"\r\n":
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            self.close()
            raise HttpError("protocol", f"more than {MAX_RESPONSE_HEADERS} header lines in the response")
        if "content-length" in headers:
            try:
                n = int(headers["content-length"])
            except ValueError:
                n = -1
            if not 0 <= n <= MAX_RESPONSE_BYTES:
                self.close()
                raise HttpError("too_large" if n > 0 else "protocol",
                                f"response Content-Length {headers['content-length'][:40]!r}; "
                                f"at most {MAX_RESPONSE_BYTES} bytes are read")
            data = await self._reader.readexactly(n)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = await self._read_chunked()
        elif status in (204, 304) or 100 <= status < 200:
            data = b""
        else:
            data = await self._read_to_eof()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, headers, data)

    async def _read_to_eof(self) -> bytes:
        assert self._reader is not None
        parts, total = [], 0
        while chunk := await self._reader.read(65536):
            total += len(chunk)
            if total > MAX_RESPONSE_BYTES:
                self.close()
                raise HttpError("too_large", f"response body over {MAX_RESPONSE_BYTES} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        parts = []
        total = 0
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)   # ValueError → "protocol"
            total += size
            if size < 0 or total > MAX_RESPONSE_BYTES:
                self.close()
                raise HttpError("too_large", f"chunked response body over {MAX_RESPONSE_BYTES} bytes")
            if size == 0:
                while await self._reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)


_TLS: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    """One default client context, shared: building one per connection costs milliseconds."""
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


def build_head(target: Target, method: str, path: str, headers: dict[str, str], body_len: int) -> bytes:
    """The request line and headers, built once per distinct request and reused."""
    lines = [f"{method} {target.prefix}{path} HTTP/1.1", f"Host: {target.authority}",
             f"Content-Length: {body_len}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def probe(target: Target, timeout: float = 2.0) -> None:
    """Raise HttpError("connect") unless a TCP connection to the target can be opened."""
    conn = Connection(target, timeout)
    await conn._connect()
    conn.close()
