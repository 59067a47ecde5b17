"""The fault catalog of issue 12 against the proxy listener, over real loopback sockets.

Every case ends with `normal_request_ok`: the sidecar keeps serving ordinary requests
after (and, where it matters, during) the fault.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import httpx
import pytest
from fault_helpers import (
    RawUpstream,
    RunningSidecar,
    code_count,
    make_config,
    normal_request_ok,
    read_all,
    send_request,
    wait_until,
)

from sentinel import metricnames as mn

ERR = mn.PROXY_ERRORS.sample_name
REQ = mn.REQUESTS.sample_name
SAMPLES = mn.SAMPLES.sample_name
TIMEOUTS = dict(request_head_timeout_s=0.8, body_idle_timeout_s=0.8, upstream_timeout_s=3.0,
                upstream_idle_timeout_s=0.8, send_timeout_s=1.0, client_idle_timeout_s=5.0)


@pytest.fixture(scope="module")
def env():
    with RawUpstream() as up, RunningSidecar(make_config(up.url, rate=1.0, **TIMEOUTS)) as sc:
        yield up, sc


_code = code_count
_wait = wait_until


# --- request heads ---------------------------------------------------------------------
def test_a_lone_byte_gets_408_and_is_closed(env):
    up, sc = env
    t = time.monotonic()
    with send_request(sc.port, b"G") as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 408 ") and b"request_head_timeout" in out
    assert time.monotonic() - t < 5
    assert sc.value(ERR, {"reason": "request_head_timeout"}) >= 1
    normal_request_ok(sc)


@pytest.mark.parametrize("line", [b"GET /ok\r\n", b"GET /ok\n", [b"GET /o", b"k\r", b"\n"],
                                  b"GET /ok\r\n\r\n"], ids=["crlf", "lf", "in-pieces", "blank-line"])
def test_an_http09_request_is_refused_505_at_once_not_408_at_the_head_timeout(env, line):
    up, sc = env
    n = len(up.seen)
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        for part in line if isinstance(line, list) else [line]:
            s.sendall(part)
            time.sleep(0.05)
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 505 ") and b"http_version_unsupported" in out
    assert time.monotonic() - t < 0.6   # not the head timeout (0.8 s here)
    assert len(up.seen) == n
    normal_request_ok(sc)


def test_leading_blank_lines_before_a_request_are_not_http09(env):
    up, sc = env
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        for part in (b"\r\nGET /o", b"k HTTP/1.1\r\n", b"Host: x\r\nConnection: close\r\n\r\n"):
            s.sendall(part)
            time.sleep(0.05)
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 200 ")


def test_a_head_trickled_a_byte_at_a_time_is_cut_at_the_head_timeout(env):
    up, sc = env
    n = len(up.seen)
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        out = b""
        for b in b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Trickle: " + b"a" * 200:
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            time.sleep(0.05)
            s.setblocking(False)
            try:
                out += s.recv(65536)
            except BlockingIOError:
                pass
            s.setblocking(True)
            if out:
                break
        s.settimeout(5)
        out += read_all(s)
    assert out.startswith(b"HTTP/1.1 408 "), out[:100]
    assert time.monotonic() - t < 5
    assert len(up.seen) == n
    normal_request_ok(sc)


def test_a_silent_connection_is_closed_after_the_head_timeout(env):
    up, sc = env
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        t = time.monotonic()
        assert read_all(s) == b""
        assert time.monotonic() - t < 4
    normal_request_ok(sc)


@pytest.mark.parametrize("size", [16 << 10, 1 << 20])
def test_a_long_url_is_414_and_never_forwarded(env, size):
    up, sc = env
    n = len(up.seen)
    with send_request(sc.port, b"GET /" + b"u" * size + b" HTTP/1.1\r\nHost: x\r\n\r\n") as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 414 ")
    assert len(up.seen) == n
    normal_request_ok(sc)


@pytest.mark.parametrize("size", [64 << 10, 1 << 20])
def test_large_headers_are_431_and_never_forwarded(env, size):
    up, sc = env
    n = len(up.seen)
    try:
        with send_request(sc.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * size + b"\r\n\r\n") as s:
            out = read_all(s)
    except (BrokenPipeError, ConnectionResetError):   # refused before we finished sending
        out = b"HTTP/1.1 431 (reset before read)"
    assert out.startswith(b"HTTP/1.1 431 ")
    assert len(up.seen) == n
    assert sc.value(ERR, {"reason": "headers_too_large"}) >= 1
    normal_request_ok(sc)


def test_too_many_header_fields_are_431(env):
    up, sc = env
    fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(150))
    with send_request(sc.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n") as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 431 ") and b"too_many_headers" in out
    normal_request_ok(sc)


def test_a_client_streaming_a_huge_header_does_not_slow_others(env):
    """One client streams a 128 MB header; it is refused within the first 64 KiB while others are served."""
    up, sc = env
    s = socket.create_connection(("127.0.0.1", sc.port), timeout=5)
    s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Huge: ")
    sent, refused = 0, False
    block = b"h" * 16384
    try:
        while sent < (128 << 20):
            s.sendall(block)
            sent += len(block)
    except OSError:
        refused = True
    s.close()
    assert refused and sent < (8 << 20)
    t = time.monotonic()
    normal_request_ok(sc)
    assert time.monotonic() - t < 2


# --- request bodies ----------------------------------------------------------------------
def test_a_body_that_stops_arriving_is_408_and_frees_the_upstream(env):
    up, sc = env
    socks = [send_request(sc.port, b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
             for _ in range(20)]
    outs = [read_all(s) for s in socks]
    for s in socks:
        s.close()
    assert all(o.startswith(b"HTTP/1.1 408 ") and b"request_body_timeout" in o for o in outs), outs[0][:200]
    assert _wait(lambda: sc.value(mn.INFLIGHT.name) == 0)
    assert sc.sc.metrics.inflight_count == 0   # every exchange started was finished
    normal_request_ok(sc)


# --- responses that do not reach the client whole ----------------------------------------
@pytest.mark.parametrize("path,reason", [("/truncate", "upstream_reset"), ("/badchunk", "upstream_bad_response"),
                                         ("/stall", "upstream_idle_timeout")])
def test_a_response_cut_after_its_head_is_not_a_200(env, path, reason):
    up, sc = env
    ok = _code(sc, "200")
    before = _code(sc, "incomplete")
    with send_request(sc.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()) as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 200 ")    # the head went out ...
    assert _wait(lambda: _code(sc, "incomplete") == before + 1)   # ... but the response was cut
    assert _code(sc, "200") == ok
    assert sc.value(ERR, {"reason": reason}) >= 1
    normal_request_ok(sc)


# --- responses the proxy cannot relay as they are -------------------------------------------
@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nraw bytes",
    b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nhi",            # not a 3-digit status once relayed
    b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nhi",            # outside RFC 9110's 100..599
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\ncoded",   # a coding re-framing would drop
    b"HTTP/1.1 200 " + b"R" * 200_000 + b"\r\nContent-Length: 2\r\n\r\nhi",   # a head over the bound
    b"HTTP/1.1 200 OK\r\n" + b"X-Many: vvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\r\n" * 20_000,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",   # bad framing, one read
    # just over the bound (8,192 + 65,536 bytes), small enough to arrive in one read: was relayed
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 74_000 + b"\r\nContent-Length: 2\r\n\r\nhi",
], ids=["101", "099", "600", "te-gzip", "huge-reason", "huge-head", "bad-chunk-with-head", "head-just-over"])
def test_a_response_the_proxy_cannot_relay_is_a_502_not_passed_on(env, raw):
    up, sc = env
    path = f"/canned/{len(up.canned)}"
    up.canned[path] = (raw, "close")
    before = _code(sc, "502")
    with send_request(sc.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode()) as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 502 "), out[:100]
    assert b"upstream_bad_response" in out or b"upstream_headers_too_large" in out
    assert _code(sc, "502") == before + 1
    normal_request_ok(sc)


def test_bytes_after_a_complete_response_are_never_served_to_the_next_request(env):
    # A body longer than its Content-Length: the rest starts what looks like a second response.
    up, sc = env
    up.canned["/canned/overlong"] = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                                     b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nev", "keep")
    with send_request(sc.port, b"GET /canned/overlong HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") as s:
        assert read_all(s).endswith(b"\r\n\r\nhello")
    for _ in range(3):   # the next requests get their own answers, not the rest of that one
        with send_request(sc.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") as s:
            out = read_all(s)
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b'"target": "/ok"}'), out[:200]
    assert _code(sc, "0") == 0


def test_a_close_delimited_body_cut_by_a_reset_is_incomplete_not_a_200(env):
    up, sc = env
    up.canned["/canned/until-close-reset"] = (b"HTTP/1.1 200 OK\r\n\r\npartial body", "reset")
    up.canned["/canned/until-close"] = (b"HTTP/1.0 200 OK\r\n\r\nwhole body", "close")
    ok, cut = _code(sc, "200"), _code(sc, "incomplete")
    with send_request(sc.port, b"GET /canned/until-close HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") as s:
        assert read_all(s).endswith(b"\r\nwhole body\r\n0\r\n\r\n")   # the close ends the body: complete
    assert _wait(lambda: _code(sc, "200") == ok + 1)
    with send_request(sc.port, b"GET /canned/until-close-reset HTTP/1.1\r\nHost: x\r\n\r\n") as s:
        out = read_all(s)
    assert b"partial body" in out and not out.endswith(b"0\r\n\r\n")   # no last chunk: the client sees the cut
    assert _wait(lambda: _code(sc, "incomplete") == cut + 1)
    assert _code(sc, "200") == ok + 1
    normal_request_ok(sc)


def test_a_pipelining_client_that_resets_mid_response_is_499_not_its_answers(env):
    # Reading is paused while the second request waits, so the reset is not read; the
    # first response completing afterwards must not count as delivered.
    up, sc = env
    up.canned["/canned/in-two-parts"] = ([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", b"cd"], "keep")
    ok, gone = _code(sc, "200"), _code(sc, "499")
    s = send_request(sc.port, b"GET /canned/in-two-parts HTTP/1.1\r\nHost: x\r\n\r\n"
                              b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 200 ")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()   # a reset
    assert _wait(lambda: _code(sc, "499") == gone + 2)
    time.sleep(0.6)   # the rest of the first response has arrived from the upstream by now
    assert _code(sc, "200") == ok
    normal_request_ok(sc)


def _late_pipelined(up, sc, n: int = 2):
    """n pipelined requests whose answers come 0.5 s late; the socket and the 200/499 counts before."""
    up.canned["/canned/late"] = ([b"", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], "keep")
    before = _code(sc, "200"), _code(sc, "499")
    s = send_request(sc.port, b"GET /canned/late HTTP/1.1\r\nHost: x\r\n\r\n" * n)
    time.sleep(0.2)
    return s, before


@pytest.mark.parametrize("n", [1, 2], ids=["one", "pipelined"])
def test_a_client_that_times_out_counts_499_for_every_answer_it_never_took(env, n):
    """A client timeout (FIN) before its answers. Pipelined: reading is paused for the second
    request, so the FIN was not read, and the first answer counted 200 when it was written.
    One: our FIN now follows the answer at once (a half-close's end of stream), and the reset the
    answer meets is still what counts."""
    up, sc = env
    s, (ok, gone) = _late_pipelined(up, sc, n)
    s.close()   # the client gave up: FIN, and a reset for whatever reaches it afterwards
    assert _wait(lambda: _code(sc, "499") == gone + n)
    time.sleep(0.3)
    assert _code(sc, "200") == ok
    normal_request_ok(sc)


@pytest.mark.parametrize("req", [
    b"GET /canned/chunked-answer HTTP/1.0\r\n\r\n",   # an HTTP/1.0 client: the body ends with the connection
    b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n",           # `printf ... | nc -N`: reads until EOF
])
def test_a_half_closed_client_sees_the_end_of_its_answer_at_once(env, req):
    """A client that half-closes after its request and reads to EOF got the close 0.5 s late
    (CONFIRM_S): for a close-delimited body that is the end of the response itself."""
    up, sc = env
    up.canned["/canned/chunked-answer"] = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                           b"5\r\nhello\r\n0\r\n\r\n", "keep")
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


def test_a_pipelining_client_that_half_closes_gets_every_answer_counted_as_sent(env):
    up, sc = env
    s, (ok, gone) = _late_pipelined(up, sc)
    s.shutdown(socket.SHUT_WR)   # done sending, still reading
    out = read_all(s)
    s.close()
    assert out.count(b"HTTP/1.1 200 ") == 2 and out.endswith(b"ok")
    assert _wait(lambda: _code(sc, "200") == ok + 2)
    assert _code(sc, "499") == gone
    normal_request_ok(sc)


def test_a_reader_that_never_reads_is_cut_and_not_a_200(env):
    up, sc = env
    before = _code(sc, "incomplete")
    s = socket.create_connection(("127.0.0.1", sc.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /big?n=67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _wait(lambda: _code(sc, "incomplete") == before + 1, 15)
    assert sc.value(ERR, {"reason": "downstream_send_timeout"}) >= 1
    s.close()
    normal_request_ok(sc)


@pytest.mark.slow
def test_a_large_response_to_a_slow_steady_reader_is_not_cut(env):
    """6 MB at about 2 MB/s takes far longer than every timeout (0.8-3 s), and arrives whole."""
    up, sc = env
    n = 6 << 20
    before = _code(sc, "200")
    with socket.create_connection(("127.0.0.1", sc.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % n)
        got = bytearray()
        t = time.monotonic()
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
            expected_t = len(got) / (2 << 20)
            lag = expected_t - (time.monotonic() - t)
            if lag > 0:
                time.sleep(lag)
    assert time.monotonic() - t > 2.5
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and len(body) == n
    assert _wait(lambda: _code(sc, "200") == before + 1)
    normal_request_ok(sc)


def test_clients_closing_after_a_complete_response_are_successes(env):
    up, sc = env
    ok, gone = _code(sc, "200"), _code(sc, "499")
    for _ in range(20):   # read the whole response, close at once
        with send_request(sc.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n") as s:
            buf = b""
            while b"}" not in buf:
                buf += s.recv(65536)
    for _ in range(5):    # half-close right after the request, then read the answer
        with send_request(sc.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n") as s:
            s.shutdown(socket.SHUT_WR)
            assert read_all(s).startswith(b"HTTP/1.1 200 ")
    assert _wait(lambda: _code(sc, "200") == ok + 25)
    assert _code(sc, "499") == gone
    normal_request_ok(sc)


def test_tritonclient_health_checks_are_successes(env):
    tritonhttp = pytest.importorskip("tritonclient.http")
    up, sc = env
    before, gone = _code(sc, "200"), _code(sc, "499")
    for _ in range(5):
        client = tritonhttp.InferenceServerClient(f"127.0.0.1:{sc.port}")
        assert client.is_server_live()
        client.close()
    assert _wait(lambda: _code(sc, "200") == before + 5)
    assert _code(sc, "499") == gone
    normal_request_ok(sc)


def test_a_client_that_aborts_mid_response_is_499(env):
    up, sc = env
    gone = _code(sc, "499")
    s = send_request(sc.port, b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 200 ")
    s.close()
    assert _wait(lambda: _code(sc, "499") == gone + 1)
    normal_request_ok(sc)


# --- retries ------------------------------------------------------------------------------
def test_a_post_the_upstream_read_is_not_sent_twice(env):
    up, sc = env
    with httpx.Client(base_url=sc.url) as c:
        assert c.get("/ok").status_code == 200          # a pooled upstream connection
        r = c.post("/read-and-close", content=b"run me once")
        assert r.status_code == 502
        assert up.count("/read-and-close") == 1
        assert c.get("/ok").status_code == 200
        r = c.get("/read-and-close")                      # idempotent: resent once on a fresh connection
        assert r.status_code == 502 and up.count("/read-and-close") == 3
    normal_request_ok(sc)


# --- routes --------------------------------------------------------------------------------
def test_percent_encoded_and_absolute_form_targets_count_under_their_model_and_are_sampled(env):
    up, sc = env
    labels = {"model": "digits", "protocol": "v2", "code": "200"}
    before = sc.value(REQ, labels)
    queued = sc.value(SAMPLES, {"model": "digits", "outcome": "queued"})
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}]}).encode()
    with httpx.Client(timeout=5) as c:
        for target in ("/v2/models/dig%69ts/infer", "/v2/models/digits/inf%65r"):
            r = c.post(sc.url + target, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200
    req = (b"POST http://127.0.0.1:%d/v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (sc.port, len(body), body))
    with send_request(sc.port, req) as s:
        assert read_all(s).startswith(b"HTTP/1.1 200 ")
    assert _wait(lambda: sc.value(REQ, labels) == before + 3)
    assert _wait(lambda: sc.value(SAMPLES, {"model": "digits", "outcome": "queued"}) == queued + 3)
    normal_request_ok(sc)


# --- upgrades ------------------------------------------------------------------------------
@pytest.mark.parametrize("req", [
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    # h2c is declined in HTTP/1.1 (tests/proxy/test_proxy_h2c_upgrade.py), except with a chunked body
    b"POST /ok HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
])
def test_upgrade_and_connect_get_501_and_are_not_forwarded(env, req):
    up, sc = env
    n = len(up.seen)
    with send_request(sc.port, req) as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 501 ") and b"upgrade_refused" in out
    assert len(up.seen) == n
    normal_request_ok(sc)


@pytest.mark.parametrize("te", [b"gzip, chunked", b"deflate,chunked", b"gzip\r\nTransfer-Encoding: chunked"])
def test_a_transfer_coding_other_than_chunked_is_501_not_forwarded_without_it(env, te):
    # Re-framed as plain chunked, a gzip-coded body would reach the model as if it were not coded.
    up, sc = env
    n = len(up.seen)
    req = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + te +
           b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    with send_request(sc.port, req) as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 501 ") and b"transfer_coding_unsupported" in out, out[:200]
    assert len(up.seen) == n
    assert _wait(lambda: sc.value(ERR, {"reason": "transfer_coding_unsupported"}) >= 1)
    normal_request_ok(sc)


def test_an_http09_request_is_refused_not_forwarded_as_http11(env):
    up, sc = env
    n = len(up.seen)
    with send_request(sc.port, b"GET /v2/models/digits/infer\r\n\r\n") as s:
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n") and b"http_version_unsupported" in out, out[:200]
    assert len(up.seen) == n
    normal_request_ok(sc)


# --- budget ---------------------------------------------------------------------------------
def test_over_the_connection_budget_new_clients_get_503_and_admin_answers():
    with RawUpstream() as up, RunningSidecar(make_config(up.url, max_connections=20,
                                                         request_head_timeout_s=30.0)) as sc:
        held = [socket.create_connection(("127.0.0.1", sc.port)) for _ in range(20)]
        try:
            time.sleep(0.2)
            with send_request(sc.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n") as s:
                out = read_all(s)
            assert out.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in out.lower()
            assert sc.value(ERR, {"reason": "connection_limit"}) >= 1
            assert httpx.get(sc.admin_url + "/healthz", timeout=2).status_code == 200
        finally:
            for s in held:
                s.close()
        assert _wait(lambda: not sc.sc.ctx.connections)
        normal_request_ok(sc)


def test_requests_cut_at_the_drain_deadline_count_as_the_proxys_cut_not_the_clients_leaving():
    """SIGTERM's drain deadline: the proxy cuts what is still in flight. It was counted 499 with
    `client_disconnect`, as if the clients had left; it is 502 (no answer begun) or `incomplete`."""
    with RawUpstream() as up, RunningSidecar(make_config(up.url, rate=0.0, drain_timeout_s=0.5,
                                                         upstream_timeout_s=30.0, upstream_idle_timeout_s=30.0)) as sc:
        up.canned["/silent"] = (b"", "keep")   # reads the request, answers nothing
        held = [send_request(sc.port, b"GET /silent HTTP/1.1\r\nHost: x\r\n\r\n"),
                send_request(sc.port, b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")]   # head and 10 bytes, then nothing
        try:
            assert _wait(lambda: up.count("/silent") == 1 and up.count("/stall") == 1)
            time.sleep(0.3)
            sc.stop()
            codes = {c: _code(sc, c) for c in ("502", "incomplete", "499")}
            assert codes == {"502": 1.0, "incomplete": 1.0, "499": 0.0}, codes
            assert sc.value(ERR, {"reason": "drain_timeout"}) == 2   # one per connection cut
            assert not sc.value(ERR, {"reason": "client_disconnect"})
        finally:
            for s in held:
                s.close()
