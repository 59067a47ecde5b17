"""Faults nobody scripted before, over real loopback sockets: a pipelining client that stops
reading, gRPC streams that never send. Each checks what the client saw against what was counted,
that the sidecar's memory stays bounded, and that a normal client is served meanwhile."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

from fault_helpers import (  # noqa: E402
    RawUpstream,
    RunningSidecar,
    code_count,
    make_config,
    normal_request_ok,
    wait_until,
)

TIMEOUTS = dict(request_head_timeout_s=2.0, body_idle_timeout_s=2.0, upstream_timeout_s=3.0,
                upstream_idle_timeout_s=2.0, send_timeout_s=2.5, client_idle_timeout_s=5.0)


def _client_conns(sc: RunningSidecar) -> list:
    return list(sc.sc.ctx.connections)  # type: ignore[union-attr]


def test_a_pipelined_answer_behind_one_that_filled_the_buffer_is_not_read_into_memory():
    """The client stops reading; the first answer ends in the read whose write fills the client's
    buffer, so pause_writing comes while the next request is still connecting upstream. That
    upstream was never paused: its whole 64 MB answer was read into the proxy's memory."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 290000\r\nConnection: close\r\n\r\n"
    with RawUpstream() as up, RunningSidecar(make_config(up.url, **TIMEOUTS)) as sc:
        # the first answer's last 60 kB come 0.5 s after the rest: its end is what fills the buffer
        up.canned["/first"] = ([head + b"f" * 230000, b"f" * 60000], "close")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", sc.port))
        with s:
            assert wait_until(lambda: len(_client_conns(sc)) == 1)
            # small kernel buffers on the proxy's side too, so the proxy's own buffer is what fills
            _client_conns(sc)[0].transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /big?n=67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_until(lambda: up.count("/big?n=67108864") == 1)
            most = 0
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                most = max([most] + [c.transport.get_write_buffer_size() for c in _client_conns(sc)
                                     if c.transport is not None])
                time.sleep(0.05)
            assert most < 4 << 20, f"{most} bytes buffered for a client that reads nothing"
            normal_request_ok(sc)   # served while that client holds its connection
            # the reader that never read is cut by send_timeout_s: neither answer is a 200
            assert wait_until(lambda: code_count(sc, "incomplete") >= 1)
            time.sleep(0.2)
            codes = {c: code_count(sc, c) for c in ("200", "incomplete", "499", "502")}
            assert codes == {"200": 1.0, "incomplete": 2.0, "499": 0.0, "502": 0.0}, codes   # 200: normal_request_ok
