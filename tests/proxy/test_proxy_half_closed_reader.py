"""A client that half-closes (shutdown(SHUT_WR)) before its answer: bounded while it does not read.

Its answers are counted once the proxy knows their fate (server._confirm). One that never reads
was looked at every 0.5 s for good when part of the answer sat in the proxy's buffer, or was
counted 200 when the answer sat unacknowledged in the kernel; it now gets `send_timeout_s`
without progress, as any slow reader: counted `incomplete`, `downstream_send_timeout`, released.
"""

from __future__ import annotations

import socket
import time

import pytest
from proxy_helpers import RunningSidecar, StepUpstream, make_config

from sentinel import metricnames as mn

ERR = mn.PROXY_ERRORS.sample_name
REQ = mn.REQUESTS.sample_name
SEND_TIMEOUT = 1.0


def _answer(size: int, delay: float = 0.3):
    def script(c: socket.socket) -> None:
        time.sleep(delay)   # the client's FIN reaches the proxy before the answer begins
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size)
    return script


@pytest.fixture(scope="module")
def env():
    up = StepUpstream()
    with RunningSidecar(make_config(up.url, send_timeout_s=SEND_TIMEOUT, upstream_timeout_s=5.0,
                                    upstream_idle_timeout_s=30.0)) as sc:
        yield up, sc
    up.close()


def _counted(sc: RunningSidecar, code: str) -> float:
    return sc.value(REQ, {"model": "none", "protocol": "other", "code": code})


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _half_closed(port: int, path: bytes, rcvbuf: int = 4096) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)   # before connect: a small window
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    s.shutdown(socket.SHUT_WR)
    return s


# 96 KiB, 2 MiB: the kernel holds all that the client has not taken, unacknowledged (was counted 200);
# about 2.9 MB: on this kernel (loopback, default tcp_wmem), part of it stays in the proxy's buffer,
# under its high-water mark (was looked at again every 0.5 s for good, the connection held); 8 MiB:
# over it (was already cut, by the send timeout of a paused writer: a control)
@pytest.mark.parametrize("size", [96 << 10, 2 << 20, 2_900_000, 8 << 20], ids=["96k", "2m", "2.9m", "8m"])
def test_a_half_closed_client_that_never_reads_is_cut_after_the_send_timeout(env, size):
    up, sc = env
    path = b"/never-reads-%d" % size
    up.scripts[path] = _answer(size)
    ok, cut = _counted(sc, "200"), _counted(sc, "incomplete")
    slow = sc.value(ERR, {"reason": "downstream_send_timeout"})
    s = _half_closed(sc.port, path)
    try:
        t0 = time.monotonic()
        assert _wait(lambda: _counted(sc, "incomplete") == cut + 1, timeout=SEND_TIMEOUT + 8), \
            f"not cut: counted 200 {_counted(sc, '200') - ok:+}, connections {len(sc.sc.ctx.connections)}"
        assert time.monotonic() - t0 < SEND_TIMEOUT + 5
        assert sc.value(ERR, {"reason": "downstream_send_timeout"}) == slow + 1
        assert _counted(sc, "200") == ok   # what it never took is not counted delivered
        assert _wait(lambda: not sc.sc.ctx.connections)   # its socket and buffer are released
        got = b""
        s.settimeout(5)
        try:   # what reached it: part of the answer, then the reset
            while b := s.recv(1 << 20):
                got += b
        except ConnectionResetError:
            pass
        assert got.startswith(b"HTTP/1.1 200 ") and len(got) < size
    finally:
        s.close()


@pytest.mark.parametrize("size", [100, 512 << 10], ids=["small", "512k"])
def test_a_half_closed_client_that_reads_its_answer_counts_its_status(env, size):
    up, sc = env
    path = b"/reads-%d" % size
    up.scripts[path] = _answer(size)
    ok = _counted(sc, "200")
    with _half_closed(sc.port, path, rcvbuf=1 << 20) as s:
        s.settimeout(5)
        got = b""
        while b := s.recv(1 << 20):
            got += b
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"b" * 100) and len(got) > size
    assert _wait(lambda: _counted(sc, "200") == ok + 1)
    assert _wait(lambda: not sc.sc.ctx.connections)
