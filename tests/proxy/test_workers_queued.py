"""`proxy.workers > 1`: connections queued on a worker's listening socket survive the worker.

Each worker bound a SO_REUSEPORT socket of its own; the kernel hashes every new connection to
one socket of the port and queues it there until it is accepted. When a worker died, its socket
closed and the connections in its queue were reset, counted nowhere. The main process now owns
each slot's socket, hands it to every start of the slot, and accepts from it while the slot has
no worker that does: the queued connections are answered. Real processes, a real SIGKILL.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time

import httpx
import pytest
from proxy_helpers import (
    ResponseReader,
    RunningSidecar,
    Upstream,
    make_config,
    proxy_workers,
    wait_or_fail,
)

pytestmark = pytest.mark.slow   # each test spawns interpreter processes

V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
INFER = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(V2_BODY), V2_BODY))
REQ = "sentinel_requests_total"
OK = {"model": "digits", "protocol": "v2", "code": "200"}
CONNECTIONS = 24   # hashed over two sockets: none on the worker's has odds of 2**-24


def _ready(sc: RunningSidecar) -> dict:
    return wait_or_fail(lambda: (ws := proxy_workers(sc)) and ws[0]["ready"] and not ws[0].get("served_by_main")
                        and ws[0], lambda: f"not ready: {proxy_workers(sc)}")


def _answer(s: socket.socket) -> int | str:
    try:
        return ResponseReader(s).read()[0]
    except (ConnectionError, OSError) as exc:
        return type(exc).__name__


def test_connections_queued_on_a_sigkilled_workers_socket_are_answered():
    with Upstream() as up, RunningSidecar(make_config(up.url, workers=2)) as sc:
        pid = _ready(sc)["pid"]
        ok = sc.value(REQ, OK)
        os.kill(pid, signal.SIGSTOP)   # it accepts nothing more: what the kernel gives its socket waits there
        socks: list[socket.socket] = []
        try:
            for _ in range(CONNECTIONS):
                s = socket.create_connection(("127.0.0.1", sc.port), timeout=15)
                s.sendall(INFER)
                socks.append(s)
            time.sleep(0.5)   # the main process answers its share at once (the watchdog waits 3 s)
            answered, _, _ = select.select(socks, [], [], 0)
            queued = CONNECTIONS - len(answered)
            assert queued >= 1, "the kernel gave every connection to the main process"
            assert not proxy_workers(sc)[0].get("served_by_main")
            os.kill(pid, signal.SIGKILL)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        got = [_answer(s) for s in socks]
        for s in socks:
            s.close()
        # HEAD: the `queued` ones were reset when the dead worker's socket closed, and counted nowhere
        assert got == [200] * CONNECTIONS, f"{queued} queued on the worker: {got}"
        wait_or_fail(lambda: sc.value(REQ, OK) == ok + CONNECTIONS, lambda: f"{sc.value(REQ, OK)} != {ok + CONNECTIONS}",
                     timeout=5)
        assert sc.value("sentinel_proxy_errors_total", {"reason": "proxy_worker_died"}) == 1
        # the next start takes its socket back: the main process stops accepting from it
        w = _ready(sc)
        assert w["pid"] != pid and w["restarts"] == 1
        for _ in range(CONNECTIONS):
            with httpx.Client() as c:
                assert c.post(sc.url + "/v2/models/digits/infer", content=V2_BODY).status_code == 200
        wait_or_fail(lambda: sc.value(REQ, OK) == ok + 2 * CONNECTIONS, "not all counted", timeout=5)
