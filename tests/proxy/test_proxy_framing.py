"""HTTP/1.1 framing both ways against a raw-socket upstream: pipelining, Connection: close, stray bytes."""

from __future__ import annotations

import socket

import pytest
from proxy_helpers import (
    ResponseReader,
    RunningSidecar,
    ScriptedUpstream,
    make_config,
    raw_exchange,
)

from sentinel import metricnames as mn

REQ = mn.REQUESTS.sample_name
ERR = mn.PROXY_ERRORS.sample_name
OTHER = {"model": "none", "protocol": "other"}

REPLIES = {
    # a response with a second, unasked-for one right behind it in the same write
    b"/extra": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!",
}


@pytest.fixture(scope="module")
def env():
    with ScriptedUpstream(REPLIES) as up, RunningSidecar(make_config(up.url)) as sc:
        yield up, sc


def test_bytes_after_a_response_never_answer_the_pipelined_request_behind_it(env):
    up, sc = env
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"GET /extra HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = ResponseReader(s)
        first, second = reader.read(), reader.read()
    assert first[2] == b"ok"
    assert second[0] == 200 and second[2] == b"ok"   # /next's own answer, not the stray "EVIL!"


@pytest.mark.parametrize("first", [b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                   b"GET /a HTTP/1.0\r\n\r\n"])
def test_a_request_closing_the_connection_is_answered_though_more_bytes_follow_it(env, first):
    """RFC 9112 §9.6: what follows a `close` request is not processed; the request still is."""
    up, sc = env
    before = sc.value(REQ, {**OTHER, "code": "200"})
    out = raw_exchange(sc.port, first + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nok")
    assert out.count(b"HTTP/1.1") == 1
    assert sc.wait_for(REQ, {**OTHER, "code": "200"}, before + 1) == before + 1
    assert sc.value(REQ, {**OTHER, "code": "499"}) == 0
    assert not any(line.startswith(b"GET /b") for _, line in up.seen)
