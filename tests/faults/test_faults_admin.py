"""The fault catalog against the admin listener, and a slowloris flood of the proxy listener."""

from __future__ import annotations

import logging
import resource
import socket
import time

import httpx
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

ERR = mn.PROXY_ERRORS.sample_name


@pytest.fixture(scope="module")
def env():
    with RawUpstream() as up, RunningSidecar(make_config(up.url, request_head_timeout_s=0.8,
                                                         body_idle_timeout_s=0.8, client_idle_timeout_s=1.0,
                                                         admin_max_connections=10)) as sc:
        yield up, sc


def _admin_port(sc: RunningSidecar) -> int:
    return sc.sc.admin_address[1]


def _healthz_ok(sc: RunningSidecar) -> None:
    assert httpx.get(sc.admin_url + "/healthz", timeout=2).status_code == 200


def test_admin_partial_head_gets_408(env):
    up, sc = env
    t = time.monotonic()
    with send_request(_admin_port(sc), b"GET /metr") as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 408 ") and time.monotonic() - t < 5
    _healthz_ok(sc)
    normal_request_ok(sc)


def test_admin_idle_keep_alive_is_closed(env):
    up, sc = env
    with send_request(_admin_port(sc), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") as s:
        t = time.monotonic()
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 200 ") and time.monotonic() - t < 5
    _healthz_ok(sc)


def test_admin_refuses_a_declared_200mb_body_before_reading_it(env):
    up, sc = env
    with send_request(_admin_port(sc), b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n") as s:
        s.settimeout(2)
        out = s.recv(65536)
    assert out.startswith(b"HTTP/1.1 413 ")
    _healthz_ok(sc)


def test_admin_upgrade_and_connect_get_501_without_a_traceback(env, caplog):
    up, sc = env
    caplog.set_level(logging.WARNING)
    for req in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\n\r\n"):
        with send_request(_admin_port(sc), req) as s:
            out = read_all(s)
        assert out.startswith(b"HTTP/1.1 501 "), out[:100]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    _healthz_ok(sc)


@pytest.mark.parametrize("te", [b"gzip, chunked", b"x, chunked", b"gzip"])
def test_admin_refuses_a_transfer_coding_other_than_chunked_at_once(env, te):
    up, sc = env
    t = time.monotonic()
    with send_request(_admin_port(sc), b"POST /ingest HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te +
                      b"\r\n\r\n5\r\nhello\r\n") as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 501 ") and b"transfer_coding_unsupported" in out
    assert time.monotonic() - t < 2   # not the body timeout
    _healthz_ok(sc)


def test_admin_large_target_and_headers_are_refused(env):
    up, sc = env
    with send_request(_admin_port(sc), b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n") as s:
        assert read_all(s).startswith(b"HTTP/1.1 414 ")
    with send_request(_admin_port(sc), b"GET / HTTP/1.1\r\nX: " + b"b" * 200000) as s:
        assert read_all(s).startswith(b"HTTP/1.1 431 ")
    _healthz_ok(sc)


def test_admin_has_its_own_connection_budget(env):
    up, sc = env
    held = [socket.create_connection(("127.0.0.1", _admin_port(sc))) for _ in range(10)]
    try:
        time.sleep(0.1)
        with send_request(_admin_port(sc), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") as s:
            assert read_all(s).startswith(b"HTTP/1.1 503 ")
        normal_request_ok(sc)    # the proxy listener is not affected
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    _healthz_ok(sc)


def test_ingest_from_loopback_needs_no_token_and_others_need_one():
    from sentinel.proxy.admin import Request
    from sentinel.proxy.sidecar import ingest_denied

    def req(peer: str, **headers: str) -> Request:
        return Request("POST", "/ingest", {k.replace("_", "-"): v for k, v in headers.items()}, b"", peer)

    assert ingest_denied(req("127.0.0.1"), None) is None
    assert ingest_denied(req("::1"), b"s3cret") is None
    assert "loopback peers only" in ingest_denied(req("10.0.0.7"), None)
    assert "shared secret" in ingest_denied(req("10.0.0.7"), b"s3cret")
    assert "shared secret" in ingest_denied(req("10.0.0.7", x_sentinel_ingest_token="wrong"), b"s3cret")
    assert ingest_denied(req("10.0.0.7", x_sentinel_ingest_token="s3cret"), b"s3cret") is None
    assert ingest_denied(req("10.0.0.7", authorization="Bearer s3cret"), b"s3cret") is None


@pytest.mark.slow
def test_slowloris_flood_leaves_healthz_and_proxied_requests_answering():
    """Up to 2,000 connections with partial heads (bounded by the descriptor limit): /healthz < 1 s."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = max(100, min(2000, (soft - 400) // 2))   # the sidecar runs in this process: two descriptors each
    with RawUpstream() as up, RunningSidecar(make_config(up.url, request_head_timeout_s=4.0,
                                                         max_connections=n + 50)) as sc:
        socks = []
        try:
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", sc.port), timeout=10)
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow-%d: " % i)
                socks.append(s)
            assert len(socks) == n
            for _ in range(3):
                t = time.monotonic()
                assert httpx.get(sc.admin_url + "/healthz", timeout=5).status_code == 200
                assert time.monotonic() - t < 1.0
                normal_request_ok(sc)
                for s in socks[:50]:          # the flood keeps trickling
                    try:
                        s.sendall(b"a")
                    except OSError:
                        pass
                time.sleep(0.3)
            # every partial head is answered 408 and closed within the head timeout (plus a sweep)
            deadline = time.monotonic() + 15
            while sc.sc.ctx.connections and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not sc.sc.ctx.connections
            assert sc.value(ERR, {"reason": "request_head_timeout"}) >= n
            assert up.count("/ok") == 3
        finally:
            for s in socks:
                s.close()
        normal_request_ok(sc)
