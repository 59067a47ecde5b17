"""HTTP/1.1 framing both ways against a raw-socket upstream: pipelining, Connection: close, stray bytes."""

from __future__ import annotations

import socket
import time

import pytest
from proxy_helpers import (
    ResponseReader,
    RunningSidecar,
    ScriptedUpstream,
    make_config,
    raw_exchange,
)

from sentinel import metricnames as mn
from sentinel.proxy import server

REQ = mn.REQUESTS.sample_name
ERR = mn.PROXY_ERRORS.sample_name
OTHER = {"model": "none", "protocol": "other"}

REPLIES = {
    # a response with a second, unasked-for one right behind it in the same write
    b"/extra": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!",
    # a body cut short: 3 of 10 bytes, then the connection closes
    b"/short": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
}


@pytest.fixture(scope="module")
def env():
    with ScriptedUpstream(REPLIES, close_after=frozenset({b"/short"})) as up, RunningSidecar(make_config(up.url)) as sc:
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


def _count(sc, code: str) -> float:
    return sc.value(REQ, {**OTHER, "code": code})


@pytest.mark.parametrize("bad", [
    b"BAD\x01REQUEST\r\n\r\n",                                              # malformed head
    b"GET /c HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",  # 431
])
def test_a_refused_pipelined_request_is_answered_after_those_before_it(env, bad):
    up, sc = env
    ok, refused, gone = _count(sc, "200"), _count(sc, "400") + _count(sc, "431"), _count(sc, "499")
    out = raw_exchange(sc.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n" + bad)
    first, second, third = out.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and second.startswith(b"200")
    assert third.startswith((b"400", b"431")) and b"connection: close" in third
    assert sc.wait_for(REQ, {**OTHER, "code": "200"}, ok + 2) == ok + 2
    assert _count(sc, "400") + _count(sc, "431") == refused + 1
    assert _count(sc, "499") == gone


@pytest.mark.parametrize("chunk", [b"0x3\r\nabc\r\n", b"fffffffffffffffffff3\r\nabc\r\n", b"3\r\nabcXY"])
def test_a_malformed_chunk_in_a_body_already_forwarded_is_answered_400(env, chunk):
    up, sc = env
    bad, gone = _count(sc, "400"), _count(sc, "499")
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        # one write: the scripted upstream answers as soon as it has a head, which would race this
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n" + chunk)
        status, headers, body = ResponseReader(s).read()
    assert status == 400 and headers["connection"] == "close" and b"hunk" in body
    assert _count(sc, "400") == bad + 1 and _count(sc, "499") == gone


def test_an_http10_expectation_is_not_answered_100_continue(env):
    """RFC 9110 §10.1.1: a server ignores 100-continue in an HTTP/1.0 request."""
    up, sc = env
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"POST /a HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        time.sleep(0.2)
        s.sendall(b"abc")
        status, _, body = ResponseReader(s).read()
    assert status == 200 and body == b"ok"


def test_pipelined_requests_dropped_when_the_proxy_cuts_the_connection_are_not_499(env):
    """The upstream cuts the first response mid-body; the proxy must cut the client too. The
    request queued behind it was never tried: the proxy's failure (502), not the client's (499)."""
    up, sc = env
    cut, dropped, gone = _count(sc, "incomplete"), _count(sc, "502"), _count(sc, "499")
    out = raw_exchange(sc.port, b"GET /short HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"abc")
    assert sc.wait_for(REQ, {**OTHER, "code": "502"}, dropped + 1) == dropped + 1
    assert _count(sc, "incomplete") == cut + 1 and _count(sc, "499") == gone
    assert sc.value(ERR, {"reason": "pipelined_request_dropped"}) >= 1


def test_pipelining_is_bounded_per_connection(env):
    """One write of thousands of tiny pipelined requests: the first MAX_PIPELINED are answered
    in order, the next is refused 429, the rest is never parsed (each would hold an Exchange)."""
    up, sc = env
    depth = getattr(server, "MAX_PIPELINED", 64)
    refused = _count(sc, "429")
    out = raw_exchange(sc.port, b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n" * 5000, timeout=10)
    answers = out.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == depth + 1
    assert all(a.startswith(b"200 OK") for a in answers[:-1])
    assert answers[-1].startswith(b"429") and b"pipeline_too_deep" in answers[-1]
    assert sc.wait_for(REQ, {**OTHER, "code": "429"}, refused + 1) == refused + 1


# --- the admin listener ------------------------------------------------------------------

def _admin_port(sc) -> int:
    return sc.sc.admin_address[1]


def test_admin_pipelined_requests_are_answered_in_order(env):
    """They were handled concurrently: a slow /metrics was answered after the /nope behind it."""
    up, sc = env
    with socket.create_connection(("127.0.0.1", _admin_port(sc)), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = ResponseReader(s)
        answers = [reader.read() for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 404]
    assert b"sentinel_requests_total" in answers[0][2] and answers[1][2] == b'{"status":"ok"}'


def test_admin_head_answer_has_no_body(env):
    up, sc = env
    out = raw_exchange(_admin_port(sc), b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, second = out.split(b"\r\n\r\n", 1)
    assert b"content-length: 15" in head
    assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.count(b'{"status":"ok"}') == 1


def test_admin_pipelining_is_bounded(env):
    """2,000 pipelined /metrics in one write rendered 2,000 pages at once (17 s of CPU, 10 MB)."""
    up, sc = env
    out = raw_exchange(_admin_port(sc), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2000, timeout=10)
    assert 1 <= out.count(b"HTTP/1.1 200 OK") <= 8


def test_nothing_after_a_closing_request_with_a_large_body_is_read(env):
    """A body past the parser (large Content-Length) and then more: the request after it was
    parsed and queued, then dropped at the close and counted 499 as if its client had left."""
    up, sc = env
    gone = _count(sc, "499")
    body = b"x" * 40000
    out = raw_exchange(sc.port, b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                       % len(body) + body + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.count(b"HTTP/1.1") == 1
    time.sleep(0.2)
    assert _count(sc, "499") == gone


def test_an_http2_prior_knowledge_client_is_told_what_is_wrong(env):
    """A gRPC client pointed at the HTTP port: 505 naming HTTP/2 and the gRPC listener, not 400."""
    up, sc = env
    before = sc.value(ERR, {"reason": "http2_on_http1_listener"})
    out = raw_exchange(sc.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    assert out.startswith(b"HTTP/1.1 505 ") and b"grpc_listen" in out
    assert sc.value(ERR, {"reason": "http2_on_http1_listener"}) == before + 1


@pytest.mark.parametrize(("head", "why"), [
    (b"GET /h HTTP/1.1\r\n\r\n", b"must carry a Host"),
    (b"GET /h HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"two Host fields"),
    (b"GET /h HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n", b"two Host fields"),
    (b"GET /h HTTP/1.1\r\nHost: a, b\r\n\r\n", b"a list in one"),   # one field naming two hosts
])
def test_a_missing_or_doubled_host_is_refused_not_forwarded(env, head, why):
    """RFC 9112 §3.2: 400. Two Hosts could name two hosts; the model server might route on either."""
    up, sc = env
    before = sc.value(ERR, {"reason": "invalid_host_header"})
    out = raw_exchange(sc.port, head)
    assert out.startswith(b"HTTP/1.1 400 ") and why in out
    assert sc.wait_for(ERR, {"reason": "invalid_host_header"}, before + 1) == before + 1
    assert not any(line.startswith(b"GET /h") for _, line in up.seen)


def test_an_http10_request_without_host_is_forwarded(env):
    up, sc = env
    out = raw_exchange(sc.port, b"GET /h10 HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"ok")
