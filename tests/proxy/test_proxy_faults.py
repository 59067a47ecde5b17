"""Faults: upstream down, slow, resetting; client gone; bad requests; oversized bodies."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest
from proxy_helpers import RunningSidecar, Upstream, free_port, make_config, raw_exchange

from sentinel import metricnames as mn

ERR = mn.PROXY_ERRORS.sample_name
REQ = mn.REQUESTS.sample_name


@pytest.fixture(scope="module")
def env():
    with Upstream() as up, RunningSidecar(make_config(up.url, upstream_timeout_s=0.5,
                                                      max_body_bytes=1 << 20)) as sc:
        yield up, sc


def _error(r: httpx.Response) -> dict:
    assert r.headers["content-type"] == "application/json"
    return json.loads(r.content)["error"]


def test_upstream_down_is_502():
    cfg = make_config(f"http://127.0.0.1:{free_port()}")
    with RunningSidecar(cfg) as sc:
        r = httpx.post(sc.url + "/v2/models/digits/infer", content=b"{}")
        assert r.status_code == 502 and _error(r)["reason"] == "upstream_refused"
        assert sc.value(ERR, {"reason": "upstream_refused"}) == 1
        assert sc.value(REQ, {"model": "digits", "protocol": "v2", "code": "502"}) == 1
        assert "traceparent" in r.headers
        r = httpx.get(sc.url + "/again")   # still serving
        assert r.status_code == 502
        ready = httpx.get(sc.admin_url + "/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json()["upstream"]


def test_slow_upstream_is_504_and_proxy_keeps_serving(env):
    up, sc = env
    t = time.monotonic()
    r = httpx.get(sc.url + "/slow?s=2")
    assert r.status_code == 504 and _error(r)["reason"] == "upstream_timeout"
    assert time.monotonic() - t < 1.5
    assert sc.value(ERR, {"reason": "upstream_timeout"}) >= 1
    assert httpx.get(sc.url + "/echo").status_code == 200


def test_upstream_reset_mid_response(env):
    up, sc = env
    before = sc.value(ERR, {"reason": "upstream_reset"})
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(sc.url + "/reset")
    assert sc.value(ERR, {"reason": "upstream_reset"}) == before + 1
    assert httpx.get(sc.url + "/echo").status_code == 200


def test_client_disconnect_mid_upload(env):
    up, sc = env
    before = sc.value(ERR, {"reason": "client_disconnect"})
    with socket.create_connection(("127.0.0.1", sc.port)) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n" + b"a" * 1000)
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while sc.value(ERR, {"reason": "client_disconnect"}) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sc.value(ERR, {"reason": "client_disconnect"}) == before + 1
    assert sc.value(REQ, {"model": "none", "protocol": "other", "code": "499"}) >= 1
    assert sc.value(mn.INFLIGHT.name) == 0
    assert httpx.post(sc.url + "/echo", content=b"ok").content == b"ok"


def test_content_length_with_transfer_encoding_refused(env):
    up, sc = env
    n = len(up.seen)
    out = raw_exchange(sc.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b'"reason":"content_length_and_transfer_encoding"' in out
    assert len(up.seen) == n   # never forwarded
    assert sc.value(ERR, {"reason": "content_length_and_transfer_encoding"}) == 1


def test_malformed_request_is_400(env):
    up, sc = env
    out = raw_exchange(sc.port, b"THIS IS NOT HTTP\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"malformed HTTP request" in out


def test_declared_1gb_body_refused_without_reading_it(env):
    up, sc = env
    n = len(up.seen)
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
        s.sendall(b"x" * 65536)
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 413 ") and b"exceeds the limit" in data
    assert len(up.seen) == n
    assert sc.value(ERR, {"reason": "body_too_large"}) >= 1
    assert sc.value(REQ, {"model": "digits", "protocol": "v2", "code": "413"}) >= 1


def test_client_mid_upload_reads_its_413_rather_than_a_reset(env):
    """Refused while megabytes of its body are already in flight (the socket buffers hold up to
    tens of MiB on loopback): the proxy drains them and the client reads the 413, not a reset."""
    up, sc = env
    with socket.create_connection(("127.0.0.1", sc.port), timeout=10) as s:
        s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
        s.sendall(b"x" * (8 << 20))
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 413 "), data[:200]


def test_streamed_chunked_body_over_limit_is_413(env):
    """A chunked upload that would reach 1 GB is cut at the 1 MiB limit; the client gets 413."""
    up, sc = env
    chunk = b"10000\r\n" + b"z" * 0x10000 + b"\r\n"
    sent = 0
    view = memoryview(chunk)
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.setblocking(False)
        reply = b""
        while sent < (1 << 30):
            r, w, _ = select.select([s], [s], [], 5)
            if r:
                reply = s.recv(65536)
                break
            if w:
                try:
                    n = s.send(view)
                    sent += n
                    view = view[n:] or memoryview(chunk)   # a partial send resumes mid-chunk
                except BlockingIOError:
                    pass
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert sent < 64 << 20   # stopped long before 1 GB
    assert httpx.get(sc.url + "/echo").status_code == 200


def test_stale_pooled_connection_is_retried_once_for_idempotent_requests(env):
    up, sc = env
    up.dropped = 0
    with httpx.Client(base_url=sc.url) as c:
        assert c.get("/echo").status_code == 200     # leaves a pooled upstream connection
        r = c.get("/drop-once")
    assert r.status_code == 200 and r.json() == {"second": "try"}
    assert sc.value(ERR, {"reason": "stale_connection_retried"}) == 1


def test_a_408_on_a_pooled_connection_is_retried_once_for_idempotent_requests(env):
    # The server's idle-timeout 408 raced a GET on the pooled connection: the GET is sent
    # again on a fresh one; a 408 to a POST (it may have been read) reaches the client.
    up, sc = env
    up.dropped = 0
    retried = sc.value(ERR, {"reason": "stale_connection_retried"})
    with httpx.Client(base_url=sc.url) as c:
        assert c.get("/echo").status_code == 200     # leaves a pooled upstream connection
        r = c.get("/408-once")
    assert r.status_code == 200 and r.json() == {"second": "try"}
    assert sc.value(ERR, {"reason": "stale_connection_retried"}) == retried + 1
    up.dropped = 0
    with httpx.Client(base_url=sc.url) as c:
        assert c.get("/echo").status_code == 200
        assert c.post("/408-once", content=b"x").status_code == 408
    assert sc.value(ERR, {"reason": "stale_connection_retried"}) == retried + 1


def test_post_the_upstream_read_is_not_sent_again(env):
    """The upstream read the POST and closed: it may have run, so the client gets 502, not a rerun."""
    up, sc = env
    up.dropped = 0
    retried = sc.value(ERR, {"reason": "stale_connection_retried"})
    with httpx.Client(base_url=sc.url) as c:
        assert c.get("/echo").status_code == 200
        n = len(up.seen)
        r = c.post("/drop-once", content=b"payload")
    assert r.status_code == 502 and _error(r)["reason"] == "upstream_reset"
    assert [s["path"] for s in up.seen[n:]] == ["/drop-once"]    # received once, never resent
    assert sc.value(ERR, {"reason": "stale_connection_retried"}) == retried
    assert httpx.post(sc.url + "/echo", content=b"ok").content == b"ok"


def test_slow_client_upload_is_not_an_upstream_timeout(env):
    """The upstream timeout (0.5 s here) counts from the end of the request, not its start."""
    up, sc = env

    def trickle():
        for i in range(4):
            time.sleep(0.25)
            yield b"part%d;" % i

    r = httpx.post(sc.url + "/echo", content=trickle())
    assert r.status_code == 200 and r.content == b"part0;part1;part2;part3;"


def test_idle_client_connections_are_closed():
    with Upstream() as up, RunningSidecar(make_config(up.url, client_idle_timeout_s=0.3)) as sc:
        with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1.0)
            data = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break   # closed by the proxy after answering and idling
                data += b
        assert data.startswith(b"HTTP/1.1 200")
