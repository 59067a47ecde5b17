"""`Upgrade: h2c` is declined by answering in HTTP/1.1, not refused (RFC 9110 §7.8, RFC 7540 §3.2).

curl --http2 on an http:// URL and Java's java.net.http.HttpClient (HTTP/2 by default) offer
an h2c upgrade on their first request. A server that does not speak h2c answers that request
in HTTP/1.1 as if the offer were absent, and the connection goes on in HTTP/1.1; Envoy does
the same. The proxy used to answer 501 `upgrade_refused`, so those clients could not reach
the model at all. Other upgrades (WebSocket) and CONNECT are still refused (501), and
tests/faults/test_faults_proxy.py pins that.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest
from proxy_helpers import ResponseReader, RunningSidecar, Upstream, make_config

from sentinel import metricnames as mn

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}]}).encode()
INFER = b"/v2/models/digits/infer"
H2C = b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
OK = {"model": "digits", "protocol": "v2", "code": "200"}


@pytest.fixture(scope="module")
def env():
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        yield up, sc


def _post(extra: bytes = b"", body: bytes = BODY) -> bytes:
    return (b"POST " + INFER + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _requests_ok(sc) -> float:
    return sc.value(mn.REQUESTS.sample_name, OK)


def _forwarded_plain(seen: dict) -> None:
    h = seen["headers"]
    assert "upgrade" not in h and "http2-settings" not in h, h
    assert "upgrade" not in h.get("connection", "").lower(), h


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_an_h2c_offer_is_answered_in_http11_and_the_connection_goes_on(env, method):
    up, sc = env
    before = _requests_ok(sc)
    n = len(up.seen)
    if method == "POST":
        first = _post(H2C)
    else:
        first = b"GET " + INFER + b" HTTP/1.1\r\nHost: x\r\n" + H2C + b"\r\n"
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(first)
        r = ResponseReader(s)
        status, headers, body = r.read()
        assert status == 200, (status, body[:200])
        assert "upgrade" not in headers.get("connection", "").lower()
        # the same connection carries an ordinary HTTP/1.1 request next
        s.sendall(_post())
        status2, _, body2 = r.read()
        assert status2 == 200 and b"outputs" in body2
    assert len(up.seen) == n + 2
    _forwarded_plain(up.seen[n])
    assert up.seen[n]["path"] == INFER.decode()
    if method == "POST":
        assert up.seen[n]["body"] == BODY
    assert sc.wait_for(mn.REQUESTS.sample_name, OK, before + 2) == before + 2   # both counted 200


def test_a_request_pipelined_behind_an_h2c_offer_in_the_same_read_is_answered(env):
    up, sc = env
    n = len(up.seen)
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(_post(H2C) + _post())   # one write: httptools stops at the offer, the rest is parsed after
        r = ResponseReader(s)
        assert [r.read()[0] for _ in range(2)] == [200, 200]
    assert len(up.seen) == n + 2
    _forwarded_plain(up.seen[n])
    assert up.seen[n + 1]["body"] == BODY


def test_an_offer_of_h2c_and_websocket_is_still_refused(env):
    up, sc = env
    n = len(up.seen)
    req = _post(b"Upgrade: h2c, websocket\r\nConnection: Upgrade\r\n")
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(req)
        status, _, body = ResponseReader(s).read()
    assert status == 501 and b"upgrade_refused" in body
    assert len(up.seen) == n


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_http2_on_an_http_url_reaches_the_model(env):
    """A real client: curl --http2 sends the h2c offer (Upgrade, HTTP2-Settings) on http://."""
    up, sc = env
    n = len(up.seen)
    out = subprocess.run(
        ["curl", "-sS", "--http2", "-o", "-", "-w", "\\n%{http_code} %{http_version}",
         "-H", "Content-Type: application/json", "--data-binary", BODY.decode(),
         f"http://127.0.0.1:{sc.port}{INFER.decode()}"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    assert status == "200 1.1", out.stdout[-300:]
    assert "outputs" in body
    assert len(up.seen) == n + 1
    _forwarded_plain(up.seen[n])


def test_an_h2c_offer_whose_body_comes_in_later_reads_is_forwarded_whole(env):
    up, sc = env
    n = len(up.seen)
    body = b'{"pad": "' + b"x" * 300_000 + b'"}'
    req = _post(H2C, body)
    head_end = req.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", sc.port), timeout=10) as s:
        for part in (req[:head_end + 10], req[head_end + 10:head_end + 70_000], req[head_end + 70_000:]):
            s.sendall(part)
        status, _, _ = ResponseReader(s).read()
    assert status == 200
    assert up.seen[n]["body_len"] == len(body)
    _forwarded_plain(up.seen[n])


def test_the_admin_listener_declines_an_h2c_offer_without_a_body_too(env):
    _, sc = env
    port = int(sc.admin_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        # two requests in one write: the second is parsed after the declined offer
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + H2C + b"\r\n" + b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        r = ResponseReader(s)
        first, second = r.read(), r.read()
    assert first[0] == 200 and second[0] == 200
    assert b"sentinel_requests_total" in second[2]
    # with a body, the admin listener still refuses it (its bodies are CloudEvents, never h2c)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\n" + H2C + b"Content-Length: 2\r\n\r\n{}")
        status, _, body = ResponseReader(s).read()
    assert status == 501 and b"upgrade_refused" in body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_http2_scrapes_metrics(env):
    _, sc = env
    out = subprocess.run(["curl", "-sS", "--http2", "-o", "-", "-w", "\\n%{http_code} %{http_version}",
                          sc.admin_url + "/metrics"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    assert status == "200 1.1" and "sentinel_requests_total" in body
