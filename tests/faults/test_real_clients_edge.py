"""Behaviour real clients see through the proxy that the fault catalog did not cover."""

from __future__ import annotations

import socket
import time

import pytest
from fault_helpers import (
    RawUpstream,
    RunningSidecar,
    make_config,
    normal_request_ok,
    read_all,
    send_request,
)

from sentinel import metricnames as mn

REQ = mn.REQUESTS.sample_name


@pytest.fixture(scope="module")
def env():
    with RawUpstream() as up, RunningSidecar(make_config(up.url)) as sc:
        up.canned["/canned/chunked"] = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                                        "keep")
        up.canned["/canned/late"] = ([b"", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], "keep")
        yield up, sc


def _code(sc: RunningSidecar, code: str) -> float:
    return sc.value(REQ, {"model": "none", "protocol": "other", "code": code})


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("req", [
    b"GET /canned/chunked HTTP/1.0\r\n\r\n",   # an HTTP/1.0 client: the body ends with the connection
    b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n",    # `printf ... | nc -N`: reads until EOF
])
def test_a_half_closed_client_sees_the_end_of_its_answer_at_once(env, req):
    """A client that half-closes after its request and reads to EOF got the close 0.5 s late
    (CONFIRM_S): for a close-delimited body that is the end of the response itself."""
    _, sc = env
    ok, gone = _code(sc, "200"), _code(sc, "499")
    s = send_request(sc.port, req)
    t = time.monotonic()
    s.shutdown(socket.SHUT_WR)
    out = read_all(s)
    took = time.monotonic() - t
    s.close()
    assert out.startswith(b"HTTP/1.1 200 ") and (out.endswith(b"hello") or out.endswith(b"}")), out
    assert took < 0.3, f"EOF came {took:.3f} s after the request"
    assert _wait(lambda: _code(sc, "200") == ok + 1)
    time.sleep(0.7)
    assert _code(sc, "499") == gone
    normal_request_ok(sc)


def test_a_client_that_closed_for_good_before_its_answer_is_still_499(env):
    _, sc = env
    ok, gone = _code(sc, "200"), _code(sc, "499")
    s = send_request(sc.port, b"GET /canned/late HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.1)
    s.close()   # a client timeout: FIN now, a reset for the answer that reaches it later
    assert _wait(lambda: _code(sc, "499") == gone + 1)
    time.sleep(0.3)
    assert _code(sc, "200") == ok
    normal_request_ok(sc)
