"""A misbehaving upstream on raw sockets, and the checks every fault case ends with."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from proxy_helpers import (  # noqa: E402  (tests/proxy is not a package)
    BUILTIN_MONITOR,
    RunningSidecar,
    make_config,
    read_request,
    v2_response,
)

__all__ = ["BUILTIN_MONITOR", "RawUpstream", "RunningSidecar", "code_count", "make_config", "normal_request_ok",
           "read_all", "send_request", "wait_until"]


class RawUpstream:
    """A model server that misbehaves on purpose, by request path (a thread per connection).

    /ok                 200, small body, keep-alive
    /v2/.../infer etc.  200 with an OIP v2 response for any path naming /v2/models/
    /v2/health/live     200, empty body
    /truncate           promises 1000 bytes, sends 10, resets
    /badchunk           chunked: one good chunk, then a chunk size that is not hex
    /stall              promises 1000 bytes, sends 10, then sends nothing for 30 s
    /big?n=N            200 with N bytes (blocking writes: the reader sets the pace)
    /read-and-close     reads the whole request, closes without answering
    any path in `canned` sends those raw bytes (a list: its parts, 0.5 s apart), then keeps
                        the connection ("keep"), closes it ("close") or resets it ("reset")
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.seen: list[tuple[str, str]] = []   # (method, target) of every request read
        self.canned: dict[str, tuple[bytes | list[bytes], str]] = {}   # path → (raw response, then)
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> RawUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping = True
        self.sock.close()

    def count(self, target: str) -> int:
        with self.lock:
            return sum(1 for _, t in self.seen if t == target)

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                got = read_request(conn, buf)
                if got is None:
                    return
                head, buf = got
                method, target, _ = head.decode("latin-1").split("\r\n", 1)[0].split(" ", 2)
                with self.lock:
                    self.seen.append((method, target))
                if not self._answer(conn, method, target):
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def _answer(self, conn: socket.socket, method: str, target: str) -> bool:
        path, _, query = target.partition("?")
        if "://" in path:
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        if path in self.canned:
            raw, then = self.canned[path]
            for i, part in enumerate([raw] if isinstance(raw, bytes) else raw):
                if i:
                    time.sleep(0.5)
                conn.sendall(part)
            if then == "reset":
                time.sleep(0.05)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return then == "keep"
        if path == "/truncate":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            time.sleep(0.05)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if path == "/badchunk":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            time.sleep(0.05)
            conn.sendall(b"zz\r\nnot a chunk\r\n")
            time.sleep(0.5)
            return False
        if path == "/stall":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            for _ in range(300):
                if self.stopping:
                    break
                time.sleep(0.1)
            return False
        if path == "/read-and-close":
            return False
        if path == "/big":
            n = int(dict(kv.split("=") for kv in query.split("&") if kv).get("n", "1000"))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % n)
            block = b"b" * 65536
            left = n
            while left > 0:
                conn.sendall(block[:left])
                left -= min(left, len(block))
            return True
        if path == "/v2/health/live":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return True
        if "/v2/models/" in path:
            body = v2_response()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            return True
        body = json.dumps({"method": method, "target": target}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        return True


def send_request(port: int, data: bytes, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    return s


def read_all(s: socket.socket, limit: int = 1 << 26) -> bytes:
    """Read until the peer closes or resets (or the socket's timeout); what came back."""
    out = bytearray()
    try:
        while len(out) < limit:
            b = s.recv(1 << 20)
            if not b:
                break
            out += b
    except (TimeoutError, ConnectionResetError):
        pass
    return bytes(out)


def normal_request_ok(sc: RunningSidecar) -> None:
    """The check after every fault: an ordinary proxied request still succeeds."""
    s = send_request(sc.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]


def code_count(sc: RunningSidecar, code: str, model: str = "none", protocol: str = "other") -> float:
    """sentinel_requests_total of one code (a path no model claims: model "none", protocol "other")."""
    from sentinel import metricnames as mn

    return sc.value(mn.REQUESTS.sample_name, {"model": model, "protocol": protocol, "code": code})


def wait_until(pred, timeout: float = 10.0) -> bool:
    """Poll `pred` every 20 ms until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
