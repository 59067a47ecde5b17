"""Test helpers: a scriptable upstream HTTP server on a thread, and the sidecar on a thread."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from sentinel.config import AnalysisConfig, Config, ModelConfig, ProxyConfig, SamplingConfig
from sentinel.protocols import oip_v2
from sentinel.proxy.sidecar import Sidecar

# Tests use the built-in monitor: the real one needs a registry entry and a golden set.
BUILTIN_MONITOR = "sentinel.proxy.builtin_monitor:build_builtin"
LOGITS = np.array([[0.1, 2.0, -1.0, 0.3, 0.0, 0.5, -0.2, 1.1, 0.9, -3.0]], dtype=np.float32)


def v2_response(batch: int = 1) -> bytes:
    body, _ = oip_v2.encode([("logits", np.repeat(LOGITS, batch, axis=0))], "outputs", binary=False,
                            extra={"model_name": "digits", "id": "1"})
    return body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: Any) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes; without this, Nagle + delayed ACK add 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = bytearray()
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionResetError("client went away mid-body")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._send(200, b"x" * 10)

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        srv: Upstream = self.server.owner  # type: ignore[attr-defined]
        body = self._body()
        parts = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        srv.seen.append({"path": self.path, "client": self.client_address,
                         "headers": {k.lower(): v for k, v in self.headers.items()},
                         "body_len": len(body), "body": body[:65536]})
        path = parts.path
        if path.endswith("/infer") or path.endswith(":predict") or path.startswith("/predictions/"):
            if path.endswith(":predict"):
                self._send(200, json.dumps({"predictions": LOGITS.tolist()}).encode())
            elif path.startswith("/predictions/"):
                self._send(200, json.dumps(LOGITS[0].tolist()).encode())
            elif "gzip" in self.headers.get("Accept-Encoding", ""):   # a server that compresses when asked
                self._send(200, gzip.compress(v2_response()), extra={"Content-Encoding": "gzip"})
            else:
                self._send(200, v2_response())
        elif path == "/v1/traces":   # an OTLP/HTTP collector
            self._send(200, b"", "application/x-protobuf")
        elif path == "/echo":
            self._send(200, body, self.headers.get("Content-Type", "application/octet-stream"),
                       {"X-Seen-Traceparent": self.headers.get("traceparent", ""),
                        "Connection": "X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5"})
        elif path == "/slow":
            time.sleep(float(q.get("s", "1")))
            self._send(200, b'{"slow":true}')
        elif path == "/status":
            self._send(int(q.get("code", "503")), b'{"upstream":"says no"}')
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(q.get("n", "5"))):
                piece = (b"chunk%d;" % i)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/reset":
            # promise 1000 bytes, send 10, then reset the connection
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif path == "/drop-once":
            # like a server closing an idle keep-alive connection just as a request arrives
            if srv.dropped < 1:
                srv.dropped += 1
                self.close_connection = True
                return
            self._send(200, b'{"second":"try"}')
        elif path == "/408-once":
            # a server timing out an idle keep-alive connection: 408, then close (RFC 9110 §15.5.9)
            if srv.dropped < 1:
                srv.dropped += 1
                self.wfile.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.close_connection = True
                return
            self._send(200, b'{"second":"try"}')
        elif path == "/close-delimited":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close-body")
            self.close_connection = True
        else:
            self._send(404, b'{"error":"no such path"}')


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)


class Upstream:
    """A threaded HTTP/1.1 server on loopback that behaves according to the request path."""

    def __init__(self) -> None:
        self.server = _QuietServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.owner = self  # type: ignore[attr-defined]
        self.seen: list[dict] = []
        self.dropped = 0
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(upstream: str, *, rate: float = 0.0, models: tuple[ModelConfig, ...] | None = None,
                **proxy: Any) -> Config:
    models = models or (ModelConfig(name="digits", version="v3", protocol="v2"),)
    return Config(models=models, listen="127.0.0.1:0", admin="127.0.0.1:0", upstream=upstream,
                  proxy=ProxyConfig(**{"drain_timeout_s": 3.0, **proxy}),
                  sampling=SamplingConfig(rate=rate, max_per_second=1000, max_bytes=4 << 20),
                  analysis=AnalysisConfig(queue_size=64, ingest_ttl_s=1.0))


class RunningSidecar:
    """The sidecar on its own uvloop thread, for in-process tests."""

    def __init__(self, config: Config, monitor_factory: str = BUILTIN_MONITOR):
        self.config = config
        self.factory = monitor_factory
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sc: Sidecar | None = None

    def _run(self) -> None:
        import uvloop

        async def main() -> None:
            self.sc = Sidecar(self.config, monitor_factory=self.factory)
            self.loop = asyncio.get_running_loop()
            await self.sc.start()
            self.started.set()
            await self.sc.wait_stopped()

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                r.run(main())
        except BaseException as exc:  # surfaced by __enter__
            self.error = exc
            self.started.set()

    def __enter__(self) -> RunningSidecar:
        self.thread.start()
        self.started.wait(10)
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.sc.request_stop)  # type: ignore[union-attr]
            self.thread.join(15)

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.sc.proxy_address[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.sc.admin_address[1]}"  # type: ignore[union-attr]

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value from the registry (0.0 when absent)."""
        v = self.sc.metrics.registry.get_sample_value(name, labels or {})  # type: ignore[union-attr]
        return 0.0 if v is None else v

    def wait_for(self, name: str, labels: dict[str, str], at_least: float, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(name, labels)
            if v >= at_least or time.monotonic() > deadline:
                return v
            time.sleep(0.05)


def proxy_workers(sc: RunningSidecar) -> list[dict]:
    """`/status`'s `proxy_workers` (proxy.workers > 1): one entry per extra proxy process."""
    import httpx

    return httpx.get(sc.admin_url + "/status").json()["proxy_workers"]


def wait_or_fail(cond: Callable[[], Any], what: str | Callable[[], str], timeout: float = 20.0) -> Any:
    """Poll `cond` every 50 ms until it returns something true, and return that; past `timeout`,
    fail with `what` (a string, or a callable that says what was seen then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(what() if callable(what) else what)


def with_models(cfg: Config, **kw: Any) -> Config:
    return dataclasses.replace(cfg, **kw)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout), return what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


class ResponseReader:
    """Reads Content-Length responses one after another from a socket, keeping leftover bytes."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        b = self.sock.recv(65536)
        if not b:
            raise ConnectionError(f"closed after {self.buf[:200]!r}")
        self.buf += b

    def read(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        n = int(headers.get("content-length", "0"))
        self.buf = rest
        while len(self.buf) < n:
            self._more()
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length response from a socket (status, headers, body)."""
    return ResponseReader(s).read()


def read_request(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """One request from `conn` (`buf`: bytes already read): its head without the blank line, and
    what follows its Content-Length body (the body itself is read and dropped); None at EOF."""
    while b"\r\n\r\n" not in buf:
        more = conn.recv(65536)
        if not more:
            return None
        buf += more
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        more = conn.recv(65536)
        if not more:
            return None
        buf += more
    return head, buf[length:]


class ScriptedUpstream:
    """A raw-socket upstream on loopback: each request's first line picks the bytes sent back.

    `replies` maps a request path to the raw bytes to answer with (anything a real server
    would not send is the point); other paths get a 2-byte 200. Requests seen are kept
    as (connection number, request line).
    """

    def __init__(self, replies: dict[bytes, bytes], close_after: frozenset[bytes] = frozenset()):
        self.replies = replies
        self.close_after = close_after   # paths whose reply is followed by closing the connection
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.seen: list[tuple[int, bytes]] = []
        self.conns = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._serve, args=(c, self.conns), daemon=True).start()

    def _serve(self, c: socket.socket, n: int) -> None:
        buf = b""
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.settimeout(10)
        try:
            while True:
                got = read_request(c, buf)
                if got is None:
                    return
                head, buf = got
                first = head.split(b"\r\n", 1)[0]
                self.seen.append((n, first))
                path = first.split(b" ")[1]
                reply = self.replies.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if callable(reply):   # StepUpstream's scripts write the answer themselves
                    reply(c)
                else:
                    c.sendall(reply)
                if path in self.close_after:
                    return
        except OSError:
            return
        finally:
            c.close()

    def __enter__(self) -> ScriptedUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()


class StepUpstream(ScriptedUpstream):
    """A raw upstream: each request path runs a script that writes the answer as it likes
    (`scripts`: path → a callable given the socket); other paths get a 2-byte 200."""

    def __init__(self) -> None:
        super().__init__({})
        self.scripts: dict[bytes, Callable[[socket.socket], None]] = self.replies   # type: ignore[assignment]
        self.sock.listen(64)
        self.thread.start()

    def close(self) -> None:
        self.sock.close()


def pieces(*parts: bytes, pause: float = 0.15) -> Callable[[socket.socket], None]:
    """A script that writes `parts` with a pause between them (each arrives as a read of its own)."""
    def script(c: socket.socket) -> None:
        for i, p in enumerate(parts):
            if i:
                time.sleep(pause)
            c.sendall(p)
    return script
