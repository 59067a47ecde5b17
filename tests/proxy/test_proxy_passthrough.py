"""The proxy passes requests and responses through unchanged, except hop-by-hop headers."""

from __future__ import annotations

import socket

import httpx
import pytest
from proxy_helpers import (
    ResponseReader,
    RunningSidecar,
    Upstream,
    make_config,
    raw_exchange,
    read_response,
)

from sentinel.proxy.tracing import parse_traceparent


@pytest.fixture(scope="module")
def env():
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        yield up, sc


def test_body_and_status_byte_for_byte(env):
    up, sc = env
    body = bytes(range(256)) * 4096   # 1 MiB, every byte value
    with httpx.Client(base_url=sc.url) as c:
        r = c.post("/echo", content=body, headers={"content-type": "application/x-test"})
        assert r.status_code == 200 and r.content == body
        assert r.headers["content-type"] == "application/x-test"
        r = c.get("/status?code=503")
        assert r.status_code == 503 and r.content == b'{"upstream":"says no"}'
        r = c.get("/status?code=418")
        assert r.status_code == 418 and r.reason_phrase == "I'm a Teapot"


def test_chunked_both_ways(env):
    up, sc = env

    def gen():
        for i in range(50):
            yield b"%05d" % i

    with httpx.Client(base_url=sc.url) as c:
        r = c.post("/echo", content=gen())
        assert r.content == b"".join(b"%05d" % i for i in range(50))
        assert up.seen[-1]["headers"].get("transfer-encoding") == "chunked"
        r = c.get("/chunked?n=7")
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.content == b"".join(b"chunk%d;" % i for i in range(7))


def test_close_delimited_response_becomes_chunked(env):
    up, sc = env
    r = httpx.get(sc.url + "/close-delimited")
    assert r.status_code == 200 and r.content == b"until-close-body"


def test_head_request(env):
    up, sc = env
    r = httpx.head(sc.url + "/anything")
    assert r.status_code == 200 and r.headers["content-length"] == "10" and r.content == b""
    assert httpx.get(sc.url + "/echo").status_code == 200   # the proxy still answers


def test_hop_by_hop_headers_removed(env):
    up, sc = env
    r = httpx.post(sc.url + "/echo", content=b"x",
                   headers={"Connection": "keep-alive, X-Private", "X-Private": "secret",
                            "Keep-Alive": "timeout=1", "Proxy-Authorization": "Basic abc", "X-Kept": "1"})
    seen = up.seen[-1]["headers"]
    assert "x-private" not in seen and "keep-alive" not in seen and "proxy-authorization" not in seen
    assert seen["x-kept"] == "1"
    # the upstream's own hop-by-hop headers (Connection: X-Hop, X-Hop, Keep-Alive) do not reach the client
    assert "x-hop" not in r.headers and "keep-alive" not in r.headers


def test_traceparent_propagated_with_new_span(env):
    up, sc = env
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    httpx.post(sc.url + "/echo", content=b"x", headers={"traceparent": incoming})
    trace, span, flags = parse_traceparent(up.seen[-1]["headers"]["traceparent"].encode())
    assert trace == "0af7651916cd43dd8448eb211c80319c" and span != "b7ad6b7169203331"


@pytest.mark.parametrize("incoming", [None, "garbage", "00-00000000000000000000000000000000-b7ad6b7169203331-01"])
def test_traceparent_created_when_absent_or_invalid(env, incoming):
    up, sc = env
    headers = {"traceparent": incoming} if incoming else {}
    httpx.post(sc.url + "/echo", content=b"x", headers=headers)
    assert parse_traceparent(up.seen[-1]["headers"]["traceparent"].encode()) is not None


def test_keep_alive_upstream_connections_are_reused(env):
    up, sc = env
    opened = sc.sc.pool.opened
    with httpx.Client(base_url=sc.url) as c:
        for _ in range(20):
            assert c.post("/echo", content=b"abc").status_code == 200
    assert sc.sc.pool.opened - opened <= 1


def test_pipelined_requests_answered_in_order(env):
    up, sc = env
    reqs = b"".join(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n%02d" % i for i in range(5))
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(reqs)
        reader = ResponseReader(s)
        bodies = [reader.read()[2] for _ in range(5)]
    assert bodies == [b"%02d" % i for i in range(5)]


def test_expect_100_continue_answered_by_proxy(env):
    up, sc = env
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"body")
        status, _, body = read_response(s)
    assert status == 200 and body == b"body"
    assert "expect" not in up.seen[-1]["headers"]


def test_other_expectations_reach_the_model_server(env):
    """Only 100-continue is the proxy's to answer; any other expectation is forwarded unchanged,
    so the server meets it or refuses it (417), instead of the proxy dropping it unseen."""
    up, sc = env
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: x-audit; id=7\r\n\r\nbody")
        status, _, body = read_response(s)
    assert status == 200 and body == b"body"
    assert up.seen[-1]["headers"]["expect"] == "x-audit; id=7"


def test_http10_client(env):
    up, sc = env
    out = raw_exchange(sc.port, b"GET /chunked?n=2 HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"chunk0;chunk1;")
    assert b"transfer-encoding" not in out.lower()


def test_pipelined_large_bodies_and_a_get(env):
    """Large Content-Length bodies bypass the parser; what follows them must still parse."""
    up, sc = env
    bodies = [bytes([65 + i]) * (40_000 + i) for i in range(3)]
    data = b"".join(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies)
    data += b"GET /chunked?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(data)
        reader = ResponseReader(s)
        got = [reader.read()[2] for _ in range(3)]
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nend")
        rest = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            rest += b
    assert got == bodies
    assert b"chunk0;" in reader.buf + rest and rest.endswith(b"end")
