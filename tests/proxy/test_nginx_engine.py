"""proxy.engine nginx against a real nginx over loopback: what each client got is what is counted.

nginx carries the bytes and logs each request over UDP to sentinel's AccessLog
(sentinel/proxy/nginx.py). These tests drive real sockets through a real nginx (Debian's
nginx-light; skipped where there is none) to a scripted upstream, and compare what the
client actually received with `sentinel_requests_total`. The process faults (a stalled sentinel,
nginx killed, stop, config errors, lost log lines) are in test_nginx_engine_faults.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import re
import shutil
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

if shutil.which("nginx") is None:
    pytest.skip("proxy.engine nginx needs nginx on PATH (Debian: apt-get install nginx-light)",
                allow_module_level=True)

import httpx  # noqa: E402
from proxy_helpers import (  # noqa: E402
    RunningSidecar,
    StepUpstream,
    Upstream,
    free_port,
    make_config,
    pieces,
    read_response,
    wait_or_fail,
)

from sentinel import metricnames as mn  # noqa: E402
from sentinel.config import Config, ModelConfig, SamplingConfig  # noqa: E402
from sentinel.errors import InfrastructureError  # noqa: E402
from sentinel.proxy import nginx as ngx  # noqa: E402
from sentinel.proxy.metrics import ProxyMetrics  # noqa: E402

REQ = mn.REQUESTS.sample_name
SAMPLES = mn.SAMPLES.sample_name
DIGITS = ("digits", "v2")
OTHER = ("none", "other")
TIMEOUT = 0.5      # head, body and upstream timeouts of the shared sidecar
SEND_TIMEOUT = 1.0


# --- helpers (test_nginx_engine_faults.py imports these) ---------------------------------

def nginx_config(upstream: str, *, rate: float = 0.0, models: tuple[ModelConfig, ...] | None = None,
                 **proxy) -> Config:
    """make_config with proxy.engine nginx on a fixed free port (nginx cannot listen on port 0)."""
    cfg = make_config(upstream, rate=rate, models=models, engine="nginx", **proxy)
    return dataclasses.replace(cfg, listen=f"127.0.0.1:{free_port()}")


def in_groups(pgids: set[int]) -> set[int]:
    """Live processes in these process groups (an nginx master leads its own: its workers stay in
    it, even once a dead master leaves them to init)."""
    import psutil

    out = set()
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) in pgids and p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
    return out


@contextlib.contextmanager
def running(cfg: Config) -> Iterator[RunningSidecar]:
    """The sidecar, stopped however the test ends; its nginx (master and workers) must be gone after."""
    sc = RunningSidecar(cfg)
    try:
        sc.__enter__()
        yield sc
    finally:
        sc.stop()
        proc = sc.sc.nginx.proc if sc.sc is not None and sc.sc.nginx is not None else None
        if proc is not None and proc.returncode is None:   # not reaped: a stop that failed must not leak it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)


def counts(sc: RunningSidecar) -> Counter:
    """sentinel_requests_total as {(model, protocol, code): n}."""
    out: Counter = Counter()
    for metric in sc.sc.metrics.registry.collect():
        for s in metric.samples:
            if s.name == REQ and s.value:
                out[(s.labels["model"], s.labels["protocol"], s.labels["code"])] += s.value
    return out


def counted_after(sc: RunningSidecar, action: Callable[[], object], n: int = 1,
                  timeout: float = 10.0) -> tuple[object, Counter]:
    """Run `action`; once `n` more requests are counted (and a moment for any extra), what it
    returned and the requests counted since, as {(model, protocol, code): n}."""
    before = counts(sc)
    seen = sc.sc.access_log.lines + sc.sc.access_log.skipped
    got = action()
    deadline = time.monotonic() + timeout
    while sc.sc.access_log.lines + sc.sc.access_log.skipped < seen + n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)   # a line too many would show now
    delta = counts(sc)
    delta.subtract(before)
    return got, +delta


def send(port: int, data: bytes, *, then: Callable[[socket.socket], bytes] | None = None,
         rcvbuf: int = 0) -> bytes:
    """Send raw bytes and read until nginx closes (or `then` decides what was read)."""
    s = socket.socket()
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        if then is not None:
            return then(s)
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b := s.recv(65536):
                got += b
        return got
    finally:
        s.close()


def get(path: bytes, method: bytes = b"GET", headers: bytes = b"") -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"


def reset(c: socket.socket) -> None:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


# --- the shared sidecar: rate 0 (nginx straight to the model server), short timeouts ----------

BIG = 8 << 20
CUT = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def _close_after(reply: bytes) -> Callable[[socket.socket], None]:
    def script(c: socket.socket) -> None:
        c.sendall(reply)
        c.shutdown(socket.SHUT_RDWR)
    return script


def _scripts(up: StepUpstream) -> None:
    s = up.scripts
    s[b"/e404"] = lambda c: c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    s[b"/v2/models/digits/infer?e500"] = lambda c: c.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nno")
    s[b"/204"] = lambda c: c.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    s[b"/slow"] = lambda c: (time.sleep(TIMEOUT + 1.0),
                             c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    s[b"/cut-close"] = _close_after(CUT)
    s[b"/cut-reset"] = lambda c: (c.sendall(CUT), time.sleep(0.05), reset(c))
    s[b"/cut-stall"] = lambda c: c.sendall(CUT)
    s[b"/chunked-close"] = _close_after(CHUNKED_HEAD + b"a\r\n0123456789\r\n20\r\nabc")
    s[b"/chunked-stall"] = lambda c: c.sendall(CHUNKED_HEAD + b"a\r\n0123456789\r\n")
    s[b"/chunked"] = lambda c: c.sendall(CHUNKED_HEAD + b"a\r\n0123456789\r\n0\r\n\r\n")
    s[b"/stream"] = pieces(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n0123456789", b"9876543210", pause=0.4)
    s[b"/big"] = lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"b" * BIG)
    up.close_after = frozenset({b"/cut-close", b"/chunked-close"})


@pytest.fixture(scope="module")
def env():
    up = StepUpstream()
    _scripts(up)
    cfg = nginx_config(up.url, upstream_timeout_s=TIMEOUT, upstream_idle_timeout_s=TIMEOUT,
                       request_head_timeout_s=TIMEOUT, body_idle_timeout_s=TIMEOUT, send_timeout_s=SEND_TIMEOUT,
                       max_body_bytes=1000, max_request_line_bytes=1024, max_header_bytes=4096,
                       max_model_labels=8)
    try:
        with running(cfg) as sc:
            yield up, sc
    finally:
        up.close()


@pytest.fixture(autouse=True)
def no_nginx_left_behind(monkeypatch):
    """Every nginx a test starts (and the workers of each) is gone when it ends, pass or fail."""
    started: set[int] = set()
    spawn = ngx.Nginx._spawn

    async def recorded(self) -> None:
        await spawn(self)
        started.add(self.proc.pid)
    monkeypatch.setattr(ngx.Nginx, "_spawn", recorded)
    yield
    deadline = time.monotonic() + 5
    while (left := in_groups(started)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:   # so that one test's leak does not fail the next ones
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert not left, f"nginx processes left behind: {sorted(left)}"


# --- 1. what the client got ---------------------------------------------------------------

def _close_early(half: bool = False) -> Callable[[socket.socket], bytes]:
    def then(s: socket.socket) -> bytes:
        if half:   # the client shuts its sending side and waits for the answer
            s.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):
                return s.recv(65536)
        time.sleep(0.2)
        return b""
    return then


def _first_piece_then_leave(s: socket.socket) -> bytes:
    got = b""
    while b"0123456789" not in got and (more := s.recv(65536)):
        got += more
    return got   # closed before the rest comes (0.4 s later)


def _never_read(s: socket.socket) -> bytes:
    time.sleep(SEND_TIMEOUT + 1.5)   # past send_timeout without reading a byte
    got = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        s.settimeout(2)
        while len(got) < BIG and (b := s.recv(1 << 20)):
            got += b
    return got


def _one_answer(s: socket.socket) -> bytes:
    status, _, body = read_response(s)
    return b"HTTP/1.1 %d\r\n\r\n" % status + body


def _truncated(declared: int) -> Callable[[bytes], bool]:
    return lambda got: got.startswith(b"HTTP/1.1 200 ") and len(body_of(got)) < declared


def _chunked_unfinished(got: bytes) -> bool:
    return got.startswith(b"HTTP/1.1 200 ") and b"chunked" in got and not got.endswith(b"0\r\n\r\n")


# (id, request bytes, how the client behaves, what it must have got, what is counted)
CASES = [
    ("200", get(b"/v2/models/digits/infer"), None, lambda g: g.startswith(b"HTTP/1.1 200 ") and body_of(g) == b"ok",
     (*DIGITS, "200")),
    ("upstream-404", get(b"/e404"), None, lambda g: g.startswith(b"HTTP/1.1 404 "), (*OTHER, "404")),
    ("upstream-500", get(b"/v2/models/digits/infer?e500"), None, lambda g: g.startswith(b"HTTP/1.1 500 "),
     (*DIGITS, "500")),
    ("upstream-204", get(b"/204"), None, lambda g: g.startswith(b"HTTP/1.1 204 "), (*OTHER, "204")),
    ("head-request", get(b"/v2/models/digits/infer", b"HEAD"), None,
     lambda g: g.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 2" in g and body_of(g) == b"", (*DIGITS, "200")),
    ("chunked-whole", get(b"/chunked"), None, lambda g: g.endswith(b"0\r\n\r\n"), (*OTHER, "200")),
    ("upstream-slow-504", get(b"/slow"), None, lambda g: g.startswith(b"HTTP/1.1 504 "), (*OTHER, "504")),
    # the upstream breaks off after its head: nginx logs these 200 with $request_completion OK
    ("cut-upstream-closes", get(b"/cut-close"), None, _truncated(1000), (*OTHER, "incomplete")),
    ("cut-upstream-resets", get(b"/cut-reset"), None, _truncated(1000), (*OTHER, "incomplete")),
    ("cut-upstream-stalls", get(b"/cut-stall"), None, _truncated(1000), (*OTHER, "incomplete")),
    ("chunked-upstream-closes", get(b"/chunked-close"), None, _chunked_unfinished, (*OTHER, "incomplete")),
    ("chunked-upstream-stalls", get(b"/chunked-stall"), None, _chunked_unfinished, (*OTHER, "incomplete")),
    # the client
    ("client-leaves-before-answer", get(b"/slow"), _close_early(), lambda g: g == b"", (*OTHER, "499")),
    ("client-half-closes", get(b"/slow"), _close_early(half=True), lambda g: g == b"", (*OTHER, "499")),
    ("client-leaves-mid-answer", get(b"/stream"), _first_piece_then_leave, _truncated(20), (*OTHER, "incomplete")),
    ("client-stops-reading", get(b"/big"), _never_read, _truncated(BIG), (*OTHER, "incomplete")),
    ("client-leaves-mid-head", b"GET /v2/models/digits/infer HTTP/1.1\r\nHo", _close_early(),
     lambda g: g == b"", (*DIGITS, "499")),
    ("client-leaves-mid-upload", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab", _close_early(),
     lambda g: g == b"", (*OTHER, "499")),
    # nginx refuses
    ("body-over-max-413", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000, _one_answer,
     lambda g: g.startswith(b"HTTP/1.1 413"), (*OTHER, "413")),
    ("head-timeout-408", b"GET /x HTTP/1.1\r\nHo", None, lambda g: g == b"", (*OTHER, "408")),
    ("head-timeout-in-request-line", b"GET /x HT", None, lambda g: g == b"", (*OTHER, "408")),
    ("body-timeout-408", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab", None,
     lambda g: g == b"", (*OTHER, "408")),
    ("request-line-too-long-414", get(b"/" + b"a" * 3000), None, lambda g: g.startswith(b"HTTP/1.1 414 "),
     (*OTHER, "414")),
    ("field-too-long-400", get(b"/v2/models/digits/infer", headers=b"X-A: " + b"a" * 3000 + b"\r\n"), None,
     lambda g: g.startswith(b"HTTP/1.1 400 "), (*DIGITS, "400")),
    ("head-too-large-400", get(b"/v2/models/digits/infer", headers=(b"X-C: " + b"c" * 60 + b"\r\n") * 80), None,
     lambda g: g.startswith(b"HTTP/1.1 400 "), (*DIGITS, "400")),
    ("not-http-400", b"GARBAGE\r\n\r\n", None, lambda g: g.startswith(b"HTTP/1.1 400 "), (*OTHER, "400")),
]


@pytest.mark.parametrize("request_bytes,client,received,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_what_the_client_got_is_what_is_counted(env, request_bytes, client, received, expected):
    _, sc = env
    got, delta = counted_after(sc, lambda: send(sc.port, request_bytes, then=client,
                                                rcvbuf=4096 if client is _never_read else 0))
    assert received(got), f"the client got {got[:300]!r}"
    assert delta == Counter({expected: 1}), f"counted {dict(delta)} for a client that got {got[:200]!r}"


def test_upstream_refused_is_502_and_counted_once():
    with running(nginx_config(f"http://127.0.0.1:{free_port()}")) as sc:
        r, delta = counted_after(sc, lambda: httpx.post(sc.url + "/v2/models/digits/infer", content=b"{}"))
        assert r.status_code == 502
        assert delta == Counter({(*DIGITS, "502"): 1})


def test_an_answer_streams_through_as_it_comes():
    """proxy_buffering off: what the model server sent reaches the client before it sends the rest
    (a token stream), as through the Python proxy. Buffered, nginx held a Content-Length body's
    first bytes until the rest came (or its read timeout cut the answer)."""
    up = StepUpstream()
    answers = {b"/chunked": (CHUNKED_HEAD, b"5\r\nfirst\r\n", b"4\r\nlast\r\n0\r\n\r\n"),
               b"/length": (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", b"first", b"last")}
    for path, (head, first, rest) in answers.items():
        up.scripts[path] = pieces(head + first, rest, pause=1.5)

    def timed(s: socket.socket) -> bytes:
        t0, got = time.monotonic(), b""
        while b"first" not in got:
            more = s.recv(65536)
            if not more:
                return b"closed before the first piece: " + got
            got += more
        took = time.monotonic() - t0
        while more := s.recv(65536):
            got += more
        return b"%.3f " % took + got
    try:
        with running(nginx_config(up.url)) as sc:
            for path in answers:
                got, delta = counted_after(sc, lambda p=path: send(sc.port, get(p), then=timed))
                took, _, response = got.partition(b" ")
                assert not got.startswith(b"closed"), got
                assert float(took) < 1.0, f"{path!r}: the first piece took {float(took):.2f} s: nginx held it back"
                assert response.endswith(b"last" if path == b"/length" else b"0\r\n\r\n")
                assert delta == Counter({(*OTHER, "200"): 1})
    finally:
        up.close()


# --- 2. model and protocol labels -----------------------------------------------------------

LABELS = [
    (b"POST", b"/v2/models/digits/infer", (*DIGITS, "200")),
    (b"POST", b"/v2/models/digits/versions/3/infer", (*DIGITS, "200")),
    (b"POST", b"/v1/models/digits:predict", ("digits", "v1", "200")),
    (b"POST", b"/predictions/digits", ("digits", "torchserve", "200")),
    (b"GET", b"/v2/health/ready", (*OTHER, "200")),
    (b"GET", b"/metrics", (*OTHER, "200")),
    (b"POST", b"/v2/models/dig%69ts/infer", (*DIGITS, "200")),          # percent-encoded: as the server routes it
    (b"POST", b"/v2/models/digits/infer?x=1&y=%2F", (*DIGITS, "200")),   # a query string
    (b"POST", b"http://x/v2/models/digits/infer", (*DIGITS, "200")),     # absolute form
    # a '"' in the target: nginx logs it as \x22, sentinel reads it back
    (b"POST", b'/v2/models/a"b%22c/infer', ('a"b"c', "v2", "200")),
    (b"POST", b"/v2/models/x\\y/infer", ("x\\y", "v2", "200")),        # a backslash: logged \x5C
]


@pytest.mark.parametrize("method,target,expected", LABELS, ids=[t.decode() for _, t, _ in LABELS])
def test_model_and_protocol_labels(env, method, target, expected):
    _, sc = env
    got, delta = counted_after(sc, lambda: send(sc.port, get(target, method, b"Content-Length: 0\r\n")))
    assert got.startswith(b"HTTP/1.1 200 ")
    assert delta == Counter({expected: 1})


@pytest.mark.parametrize("value,counted", [(b"1", False), (b" 1 ", False), (b"0", True), (b"1 x", True),
                                           (b"true", True)], ids=["1", "padded-1", "0", "1-x", "true"])
def test_canary_requests_are_not_counted(env, value, counted):
    """Exactly `X-Sentinel-Canary: 1` (as the Python proxy reads it) is the sidecar's canary; a value
    with a space once shifted the log line's fields (`1 x` was read as a canary)."""
    _, sc = env
    skipped = sc.sc.access_log.skipped
    got, delta = counted_after(sc, lambda: send(sc.port, get(b"/v2/models/digits/infer", b"POST",
                                                             b"Content-Length: 0\r\nX-Sentinel-Canary: " + value +
                                                             b"\r\n")))
    assert got.startswith(b"HTTP/1.1 200 ")
    assert delta == (Counter({(*DIGITS, "200"): 1}) if counted else Counter())
    assert sc.sc.access_log.skipped == skipped + (0 if counted else 1)


# --- 3. sampling: nginx captures, sentinel takes the files -------------------------------------

V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'


@pytest.fixture
def submitted(monkeypatch):
    """The samples handed to analysis (then queued as usual)."""
    from sentinel.proxy.analysis import AnalysisManager

    seen: list = []
    real = AnalysisManager.submit

    def submit(self, sample):
        seen.append(sample)
        real(self, sample)
    monkeypatch.setattr(AnalysisManager, "submit", submit)
    return seen


def capture_files(sc: RunningSidecar) -> list[str]:
    """The files in the capture folders (none where nothing is captured: no folders)."""
    folders = [os.path.join(sc.sc.nginx.capture_dir, f) for f in (ngx.CAPTURE_IN, ngx.CAPTURE_OUT)]
    return sorted(name for f in folders if os.path.isdir(f) for name in os.listdir(f))


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_the_captured_share_reaches_analysis_byte_for_byte_counted_once_and_leaves_no_file(rate, submitted):
    n = 6
    with Upstream() as up, running(nginx_config(up.url, rate=rate)) as sc:
        def burst() -> list[httpx.Response]:
            with httpx.Client(base_url=sc.url) as c:
                return [c.post("/v2/models/digits/infer", content=V2_BODY,
                               headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
                        for _ in range(n)]
        answers, delta = counted_after(sc, burst, n)
        assert [r.status_code for r in answers] == [200] * n
        assert delta == Counter({(*DIGITS, "200"): n})   # a captured request is counted once
        assert [s["body"] for s in up.seen] == [V2_BODY] * n   # the model server got every body whole
        if rate:
            assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "queued"}, n) == n
            assert len(submitted) == n
            for sample, answer in zip(submitted, answers, strict=True):
                assert (sample.model, sample.protocol, sample.source) == ("digits", "v2", "proxy")
                # httpx asks for gzip, the upstream compresses: the sample has the bytes as sent, and the
                # header that says how to read them
                assert sample.request_body == V2_BODY and gzip.decompress(sample.response_body) == answer.content
                assert sample.request_headers == {"content-type": "application/json"}   # never Authorization
                assert sample.response_headers == {"content-type": "application/json", "content-encoding": "gzip"}
                assert re.fullmatch("[0-9a-f]{32}", sample.request_id)
            assert sc.sc.access_log.state()["captured"] == n
        else:
            assert submitted == [] and "proxy_store" not in sc.sc.nginx.conf_text
        assert capture_files(sc) == []
        folder = sc.sc.nginx.capture_dir
    assert not os.path.exists(folder)   # removed at the stop, wherever it was


def test_a_captured_request_is_not_held_by_nagle_and_a_delayed_ack():
    """A captured body leaves nginx's file in a second write after the head; on a kept-alive
    upstream connection without TCP_NODELAY that write waited ~40 ms for the server's delayed ACK
    (in 40% of captured requests, measured; how many varies with the server). Each captured
    request gets a fresh connection: 30 requests reach the model server on 30 connections."""
    with Upstream() as up, running(nginx_config(up.url, rate=1.0)) as sc:
        slow = []
        with httpx.Client(base_url=sc.url) as c:
            for _ in range(30):
                t0 = time.perf_counter()
                assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
                slow.append(time.perf_counter() - t0 > 0.035)
        assert sum(slow) <= 6, f"{sum(slow)} of 30 captured requests took over 35 ms"   # a loaded machine: a few
        wait_or_fail(lambda: sc.sc.access_log.state()["captured"] == 30, "not all were captured")
        connections = {s["client"] for s in up.seen}
        assert len(up.seen) == 30 and len(connections) == 30, f"30 requests on {len(connections)} connections"


def test_what_is_not_captured_still_reaches_the_model_server_whole(submitted):
    """Sampling everything with a byte cap of 1 kB: a larger body and a chunked one (no length to
    check against the cap) go straight on; a canary is captured but not sampled; none is lost."""
    cfg = nginx_config("http://127.0.0.1:1", rate=1.0)
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, max_bytes=1024))
    big = b'{"inputs":[' + b" " * 4096 + b"]}"
    with Upstream() as up, running(dataclasses.replace(cfg, upstream=up.url)) as sc:
        def sends() -> list[int]:
            with httpx.Client(base_url=sc.url) as c:
                return [c.post("/v2/models/digits/infer", content=big).status_code,
                        c.post("/v2/models/digits/infer", content=iter([V2_BODY[:9], V2_BODY[9:]])).status_code,
                        c.post("/v2/models/digits/infer", content=V2_BODY,
                               headers={"X-Sentinel-Canary": "1"}).status_code,
                        c.post("/v2/models/digits/infer", content=V2_BODY).status_code]
        codes, delta = counted_after(sc, sends, 3)
        assert codes == [200] * 4
        assert delta == Counter({(*DIGITS, "200"): 3})   # the canary is not counted
        assert [s["body"] for s in up.seen] == [big, V2_BODY, V2_BODY, V2_BODY]
        wait_or_fail(lambda: len(submitted) == 1, lambda: f"{len(submitted)} samples, not 1")
        assert submitted[0].request_body == V2_BODY
        assert sc.sc.access_log.state()["captured"] == 2   # the canary and the last one
        assert capture_files(sc) == []


def test_captures_are_capped_at_what_the_sampling_caps_take_and_the_rest_goes_on_uncaptured(submitted):
    """Sampling everything with a cap of 3 per second: a burst of 40 requests must not all be
    written to files. nginx captures at most the cap (a second's burst of it); the rest go
    straight to the model server, each answered once, with its body, and counted once."""
    n = 40
    cfg = nginx_config("http://127.0.0.1:1", rate=1.0)
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, max_per_second=3))
    assert ngx.capture_requests_per_second(cfg) == 3
    with Upstream() as up, running(dataclasses.replace(cfg, upstream=up.url)) as sc:
        def burst() -> list[int]:
            with httpx.Client(base_url=sc.url) as c:
                return [c.post("/v2/models/digits/infer", content=V2_BODY).status_code for _ in range(n)]
        started = time.monotonic()
        codes, delta = counted_after(sc, burst, n)
        took = time.monotonic() - started
        assert codes == [200] * n
        assert delta == Counter({(*DIGITS, "200"): n})
        assert [s["body"] for s in up.seen] == [V2_BODY] * n
        captured = sc.sc.access_log.state()["captured"]
        # the burst (3) and 3 per second of what the burst took, with a request of slack
        assert 1 <= captured <= 3 + 3 * took + 1, (captured, took)
        assert len(submitted) <= captured
        assert capture_files(sc) == []
    models = (ModelConfig(name="digits", version="v3", sampling=SamplingConfig(rate=0.2, max_per_second=10)),
              ModelConfig(name="other", version="v1", sampling=SamplingConfig(rate=0.05, max_per_second=10)))
    # the captured share is 0.2: "other" is sampled in a quarter of its captures, so filling its
    # cap takes 40 of them per second
    assert ngx.capture_requests_per_second(nginx_config("http://127.0.0.1:1", models=models)) == 50


def test_the_captured_share_is_the_largest_rate_and_each_model_samples_its_rate_over_it():
    models = (ModelConfig(name="digits", version="v3", sampling=SamplingConfig(rate=0.2, max_bytes=5000)),
              ModelConfig(name="other", version="v1", sampling=SamplingConfig(rate=0.05, max_bytes=700)))
    cfg = nginx_config("http://127.0.0.1:1", rate=0.0, models=models)
    assert ngx.sample_share(cfg) == 0.2
    scaled = ngx.capture_config(cfg)
    assert [scaled.sampling_for(m).rate for m in scaled.models] == pytest.approx([1.0, 0.25])
    text = ngx.render_conf(cfg, upstream=("127.0.0.1", 1), log_to=("127.0.0.1", 3), run_dir="/tmp/x")
    assert '    20% 1;\n    * "";' in text
    assert "proxy_store /tmp/x/capture_out/$request_id;" in text
    assert ngx.capture_max_bytes(cfg) == 5000
    unsampled = ngx.render_conf(cfg, upstream=("127.0.0.1", 1), log_to=("127.0.0.1", 3), run_dir="/tmp/x",
                                sample=False)
    assert "proxy_store" not in unsampled and "split_clients" not in unsampled


@pytest.mark.parametrize("n", [0, 1, 9, 10, 99, 100, 101, 1000, 1024, 4096, 65535, 8388608, 10 ** 12 + 7,
                               2 ** 40 + 1])
def test_at_most_matches_exactly_the_numbers_up_to_n(n):
    import random

    rx = re.compile(ngx.at_most(n))
    rng = random.Random(n)
    near = {0, 1, n, n + 1, max(0, n - 1), 10 ** len(str(n)), 10 ** (len(str(n)) - 1)}
    near |= {rng.randrange(0, 10 * n + 10) for _ in range(2000)}
    for x in near:
        assert bool(rx.fullmatch(str(x))) == (x <= n), (n, x)
    for bad in ("", "-1", "+1", "1e3", " 1", "0x1", str(n) + "0"):
        assert not rx.fullmatch(bad), (n, bad)


def _capture(tmp_path, body: bytes = V2_BODY, answer: bytes | None = b'{"outputs":[]}', code: str = "200",
             name: str = "0000000001", request_id: str = "ab" * 16, sampler=None) -> tuple[list, str, str]:
    from sentinel.proxy.sampling import Sampler

    (tmp_path / ngx.CAPTURE_IN).mkdir(exist_ok=True)
    (tmp_path / ngx.CAPTURE_OUT).mkdir(exist_ok=True)
    body_path = tmp_path / ngx.CAPTURE_IN / name
    body_path.write_bytes(body)
    answer_path = tmp_path / ngx.CAPTURE_OUT / request_id
    if answer is not None:
        answer_path.write_bytes(answer)
    sampler = sampler or Sampler(SamplingConfig(rate=1.0, max_per_second=1000, max_bytes=1 << 20))
    capture = [str(body_path).encode(), request_id.encode(), str(len(body)).encode(),
               {"content-type": "application/json"}, {}, ("v2", "digits", ("digits", sampler)), code, b"ff" * 16]
    return capture, str(body_path), str(answer_path)


def test_capture_files_are_sampled_or_deleted_and_never_read_outside_their_folders(tmp_path):
    from sentinel.proxy.sampling import Sampler

    got, outcomes = [], []
    files = ngx.CaptureFiles(str(tmp_path), {}, got.append, lambda m, o: outcomes.append((m, o)))
    capture, body, answer = _capture(tmp_path)
    files.take([capture])
    assert [(s.request_body, s.response_body, s.request_id) for s in got] == [(V2_BODY, b'{"outputs":[]}',
                                                                                "ff" * 16)]
    assert not os.path.exists(body) and not os.path.exists(answer)
    # not a whole 200, a line that did not parse past the capture fields, an answer nginx did not store
    for case in ("incomplete", "unparsed", "not stored"):
        capture, body, answer = _capture(tmp_path, code="incomplete" if case == "incomplete" else "200",
                                         answer=None if case == "not stored" else b"{}")
        if case == "unparsed":
            del capture[5:]
        files.take([capture])
        assert not os.path.exists(body) and not os.path.exists(answer)
    assert len(got) == 1 and outcomes == [("digits", "dropped")]
    # over the byte cap: counted oversize, not read
    small = Sampler(SamplingConfig(rate=1.0, max_per_second=1000, max_bytes=10))
    capture, body, _ = _capture(tmp_path, sampler=small)
    files.take([capture])
    assert outcomes[-1] == ("digits", "oversize") and not os.path.exists(body)
    # a forged line naming files elsewhere: neither read nor deleted
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    for forged_body, forged_id in ((str(outside).encode(), b"ab" * 16),
                                   (str(tmp_path / ngx.CAPTURE_IN / ".." / "precious").encode(), b"ab" * 16),
                                   (str(tmp_path / ngx.CAPTURE_IN / "0000000002").encode(), b"../precious")):
        capture, _, _ = _capture(tmp_path, name="0000000002")
        capture[0], capture[1] = forged_body, forged_id
        files.take([capture])
        assert outside.read_bytes() == b"keep me"
    assert len(got) == 1


def test_files_whose_line_never_came_are_swept_once_old(tmp_path):
    files = ngx.CaptureFiles(str(tmp_path), {}, lambda s: None, lambda m, o: None)
    _, old_body, old_answer = _capture(tmp_path, name="0000000007", request_id="cd" * 16)
    _, new_body, new_answer = _capture(tmp_path, name="0000000008", request_id="ef" * 16)
    now = time.time()
    for p in (old_body, old_answer):
        os.utime(p, (now - 100, now - 100))
    assert files.sweep(now, ttl=30) == 2
    assert not os.path.exists(old_body) and not os.path.exists(old_answer)
    assert os.path.exists(new_body) and os.path.exists(new_answer)
    assert files.state()["captured_files_swept"] == 2


def test_a_capture_line_is_parsed_with_its_headers_and_counted_as_an_access_line():
    metrics = ProxyMetrics({"digits": "digits"}, 8)
    taken: list = []

    class Files:
        samplers: dict = {}

        def take(self, captures):
            taken.extend(captures)
    log = ngx.AccessLog(metrics, captures=Files())   # type: ignore[arg-type]
    try:
        line = (b'<190>Dec  5 07:39:34 ' + log.tag.encode() + b'_cap: /r/capture_in/0000000003 ' + b"ab" * 16
                + b' 71 "application/json; charset=utf-8" "12" "-" "application/x\\x22y" "-" "gzip" '
                + b"200 1 0.004 211 64 64 3 " + b"cd" * 16 + b" 01 0 POST /v2/models/digits/infer")
        log.feed_many([line, line[:60]])
        assert log.lines == 1 and log.malformed == 1
        (capture,) = taken
        assert capture[:3] == [b"/r/capture_in/0000000003", b"ab" * 16, b"71"]
        assert capture[3] == {"content-type": "application/json; charset=utf-8",
                              "inference-header-content-length": "12"}
        assert capture[4] == {"content-type": 'application/x"y', "content-encoding": "gzip"}
        assert capture[5][:2] == ("v2", "digits") and capture[6] == "200" and capture[7] == b"cd" * 16
    finally:
        log.close()


# --- 9. trace context ------------------------------------------------------------------------

TP = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")
TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def traced():
    with Upstream() as up, running(nginx_config(up.url)) as sc:
        yield up, sc


def _forwarded(up: Upstream, sc: RunningSidecar, headers: dict[str, str]) -> dict[str, str]:
    n = len(up.seen)
    assert httpx.post(sc.url + "/v2/models/digits/infer", content=V2_BODY, headers=headers).status_code == 200
    return up.seen[n]["headers"]


@pytest.mark.parametrize("sent,trace_kept,flags", [
    (f"00-{TRACE}-{SPAN}-01", True, "01"),
    (f"00-{TRACE}-{SPAN}-00", True, "00"),            # not sampled: stays so
    (f"00-{TRACE}-{SPAN}-03", True, "01"),            # only the sampled bit goes on
    (f"01-{TRACE}-{SPAN}-01-later-fields", True, "01"),   # a later version's extra fields
    (None, False, "01"),
    (f"00-{TRACE.upper()}-{SPAN}-01", False, "01"),   # uppercase hex
    (f"00-{'0' * 32}-{SPAN}-01", False, "01"),        # all-zero trace id
    (f"00-{TRACE}-{'0' * 16}-01", False, "01"),       # all-zero parent id
    (f"ff-{TRACE}-{SPAN}-01", False, "01"),           # version ff
    (f"00-{TRACE}-{SPAN}-01-x", False, "01"),         # version 00 with extra fields
    ("garbage", False, "01"),
], ids=["sampled", "not-sampled", "flags-03", "later-version", "none", "uppercase", "zero-trace", "zero-span",
        "version-ff", "00-extra", "garbage"])
def test_the_model_server_gets_a_valid_traceparent(traced, sent, trace_kept, flags):
    up, sc = traced
    headers = {"tracestate": "vendor=1"}
    if sent is not None:
        headers["traceparent"] = sent
    seen = _forwarded(up, sc, headers)
    m = TP.fullmatch(seen["traceparent"])
    assert m, seen["traceparent"]
    trace, span, got_flags = m.groups()
    assert span != "0" * 16 and span != SPAN and trace != "0" * 32
    assert (trace == TRACE) is trace_kept
    assert got_flags == flags
    # tracestate goes with the caller's trace only
    assert seen.get("tracestate") == ("vendor=1" if trace_kept else None)


def test_new_traces_differ_and_exemplars_carry_the_trace_id(traced):
    up, sc = traced
    fresh = {TP.fullmatch(_forwarded(up, sc, {})["traceparent"]).group(1) for _ in range(3)}
    assert len(fresh) == 3
    other = "0af7651916cd43dd8448eb211c80319c"
    for trace in (TRACE, other):
        _forwarded(up, sc, {"traceparent": f"00-{trace}-{SPAN}-01"})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = httpx.get(sc.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text"}).text
            exemplars = re.findall(r'sentinel_request_duration_seconds_bucket\{[^}]*model="digits"[^}]*\} \S+ '
                                   r'# \{trace_id="([0-9a-f]{32})"\}', text)
            if trace in exemplars:
                break
            time.sleep(0.05)
        assert trace in exemplars, exemplars
    # a trace its caller does not record gets no exemplar
    unsampled = "11111111111111111111111111111111"
    _forwarded(up, sc, {"traceparent": f"00-{unsampled}-{SPAN}-00"})
    time.sleep(0.2)
    text = httpx.get(sc.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text"}).text
    assert unsampled not in text


# --- 10. the configuration and the log parser ---------------------------------------------

def _checked(cfg: Config, upstream: tuple[str, int] = ("127.0.0.1", 8081)) -> str:
    n = ngx.Nginx(cfg, "nginx")
    try:
        text = ngx.render_conf(cfg, upstream=upstream,
                               log_to=ngx.LogTarget("127.0.0.1", 40001, "sentinel_0123456789ab"), run_dir=n.run_dir,
                               capture_dir=n.capture_dir)
        n.write_and_check(text)   # nginx -t; raises InfrastructureError with nginx's words
        assert os.stat(n.conf).st_mode & 0o077 == 0   # it holds the log tag: sentinel's user only
        return text
    finally:
        n.remove_dirs()


@pytest.mark.parametrize("listen,upstream,proxy,rate", [
    ("[::1]:18080", ("::1", 8081), {}, 0.0),
    ("0.0.0.0:18080", ("127.0.0.1", 8081), {"workers": 2}, 1.0),
    ("127.0.0.1:18080", ("127.0.0.1", 8081), {}, 0.0123),
    ("127.0.0.1:18080", ("127.0.0.1", 8081),
     {"max_body_bytes": 1 << 40, "max_request_line_bytes": 65536, "max_header_bytes": 1 << 20,
      "max_connections": 100000, "upstream_timeout_s": 3600.0, "drain_timeout_s": 0.001, "upstream_pool_size": 0,
      "shed_retry_after_s": 0}, 1.0),
], ids=["ipv6", "workers-2-rate-1", "rate-fraction", "large-limits"])
def test_nginx_accepts_the_configuration(listen, upstream, proxy, rate):
    cfg = dataclasses.replace(make_config("http://x:1", rate=rate, engine="nginx", **proxy), listen=listen)
    text = _checked(cfg, upstream)
    assert f"listen {listen} " in text
    assert ("[::1]:8081" if ":" in upstream[0] else "127.0.0.1:8081") in text
    assert "tag=sentinel_0123456789ab sentinel;" in text and "tag=sentinel_0123456789ab_err error;" in text


def test_a_configuration_nginx_refuses_is_an_infrastructure_error_with_its_words():
    n = ngx.Nginx(make_config("http://x:1", engine="nginx"), "nginx")
    try:
        with pytest.raises(InfrastructureError, match="unknown directive"):
            n.write_and_check("no_such_directive on;\n")
    finally:
        n.remove_dirs()


def _log() -> ngx.AccessLog:
    return ngx.AccessLog(ProxyMetrics({"digits": "digits"}, 4))


def _dgram(log: ngx.AccessLog, line: bytes, tag: str | None = None, pri: int = 190) -> bytes:
    return b"<%d>Dec  5 05:06:12 %s: " % (pri, (tag or log.tag).encode()) + line


def _counted(log: ngx.AccessLog) -> Counter:
    out: Counter = Counter()
    for metric in log.metrics.registry.collect():
        for s in metric.samples:
            if s.name == REQ and s.value:
                out[(s.labels["model"], s.labels["protocol"], s.labels["code"])] += s.value
    return out


LINE = b"200 1 0.004 111 2 2 7 4bf92f3577b34da6a3ce929d0e0e4736 01 0 POST /v2/models/digits/infer"


@pytest.mark.unit
def test_access_log_lines_are_counted_by_what_the_client_got():
    log = _log()
    try:
        log.feed(_dgram(log, LINE))
        log.feed(_dgram(log, LINE.replace(b" 0 POST", b" 1 POST")))                       # canary
        log.feed(_dgram(log, b"499 0 0.200 0 0 - 8 " + LINE.split(b" ", 7)[7]))            # the client left
        log.feed(_dgram(log, b"200 1 0.001 122 10 1000 9 " + LINE.split(b" ", 7)[7]))      # short of its length
        log.feed(_dgram(log, b"200 1 0.001 109 0 2 10 4bf92f3577b34da6a3ce929d0e0e4736 01 0 HEAD /x"))
        log.feed(_dgram(log, b'200 1 0.001 111 2 2 11 4bf92f3577b34da6a3ce929d0e0e4736 00 0 GET '
                             b'/v2/models/a\\x22b\\x5Cc/infer?q=\\x22 x'))                    # escaped, spaces
        assert _counted(log) == Counter({(*DIGITS, "200"): 1, (*DIGITS, "499"): 1, (*DIGITS, "incomplete"): 1,
                                         (*OTHER, "200"): 1, ('a"b\\c', "v2", "200"): 1})
        assert (log.lines, log.skipped, log.malformed) == (5, 1, 0)
        hist = log.metrics.registry.get_sample_value("sentinel_request_duration_seconds_sum",
                                                     {"model": "digits", "protocol": "v2", "code": "200"})
        assert hist == pytest.approx(0.004)
    finally:
        log.close()


@pytest.mark.unit
def test_an_error_line_while_relaying_the_body_marks_that_connection_cut():
    log = _log()
    err = (b"2026/12/05 05:12:16 [error] 11010#11010: *%d upstream %s while %s, client: 127.0.0.1, server: , "
           b'request: "GET /v2/models/digits/infer HTTP/1.1", upstream: "http://127.0.0.1:1/", host: "x"')
    chunked = b"200 1 0.501 133 15 - %d 4bf92f3577b34da6a3ce929d0e0e4736 01 0 GET /v2/models/digits/infer"
    try:
        log.feed(_dgram(log, err % (21, b"timed out (110: Connection timed out)", b"reading upstream"),
                        log.tag + "_err", 187))
        log.feed(_dgram(log, err % (22, b"prematurely closed connection", b"sending to client"), log.tag + "_err", 187))
        # not cuts: an answer nginx made itself (504), a warning, another connection's line
        log.feed(_dgram(log, err % (23, b"timed out", b"reading response header from upstream"),
                        log.tag + "_err", 187))
        log.feed(_dgram(log, err % (24, b"sent more data", b"reading upstream"), log.tag + "_err", 188))
        # the request line (after ", client: ") is the client's: it cannot forge the action
        log.feed(_dgram(log, b"2026/12/05 05:12:16 [error] 1#1: *25 upstream timed out while connecting to "
                             b'upstream, client: 1, request: "GET /x while reading upstream, client: HTTP/1.1"',
                        log.tag + "_err", 187))
        for conn in (21, 22, 23, 24, 25, 99):
            log.feed(_dgram(log, chunked % conn))
        assert _counted(log) == Counter({(*DIGITS, "incomplete"): 2, (*DIGITS, "200"): 4})
        assert log.cuts == 2 and not log._cut
        for conn in range(ngx.MAX_CUT_MARKS + 100):   # marks whose access lines never came: bounded
            log.feed(_dgram(log, err % (1000 + conn, b"timed out", b"reading upstream"), log.tag + "_err", 187))
        assert len(log._cut) == ngx.MAX_CUT_MARKS
    finally:
        log.close()


@pytest.mark.unit
@pytest.mark.parametrize("datagram", [
    b"", b"<190>", b"garbage", b"\xff" * 100, b"<190>Dec  5 05:06:12 sentinel: " + LINE,   # not this run's tag
    b"TAG " + LINE[:20], b"TAG " + LINE.replace(b"200 1", b"2000 1"), b"TAG " + LINE.replace(b"200 1", b"2x0 1"),
    b"TAG " + LINE.replace(b"0.004", b"nan"), b"TAG " + LINE.replace(b"0.004", b"-1"),
    b"TAG " + LINE.replace(b"0.004", b"inf"), b"TAG " + LINE.replace(b" 111 ", b" x "),
    b"TAG " + LINE.replace(b" 2 2 ", b" 2 \xff "), b"TAG_err 2026/12/05 [error] 1#1: *x y while reading upstream",
], ids=lambda d: repr(d[:30]))
def test_malformed_datagrams_are_counted_as_such_and_never_as_requests(datagram):
    log = _log()
    try:
        if datagram.startswith(b"TAG"):
            kind, _, rest = datagram.partition(b" ")
            datagram = _dgram(log, rest, log.tag + kind[3:].decode(), 187 if b"_err" in kind else 190)
        log.feed(datagram)
        assert _counted(log) == Counter() and log.lines == 0 and not log._cut
        assert log.malformed == (0 if b"_err:" in datagram else 1)
    finally:
        log.close()


@pytest.mark.unit
@pytest.mark.parametrize("status,done,sent,body,length,head,cut,code", [
    (b"200", True, 111, 2, 2, False, False, "200"),
    (b"404", True, 111, 2, 2, False, False, "404"),
    (b"200", True, 138, 20, None, False, False, "200"),          # chunked, whole
    (b"200", True, 136, 18, None, False, True, "incomplete"),    # chunked, cut (error line)
    (b"200", True, 122, 10, 1000, False, False, "incomplete"),   # short of its Content-Length
    (b"200", True, 109, 0, 2, True, False, "200"),               # HEAD
    (b"304", True, 110, 0, 55, False, False, "304"),
    (b"204", True, 90, 0, None, False, False, "204"),
    (b"200", False, 125, 10, 20, False, False, "incomplete"),   # the client left or stopped reading
    (b"499", False, 0, 0, None, False, False, "499"),
    (b"408", False, 0, 0, None, False, False, "408"),            # nginx's head/body timeout: nothing sent
    (b"400", False, 0, 0, None, False, False, "499"),            # the client closed mid-request
    (b"413", True, 334, 176, 176, False, False, "413"),
    (b"504", True, 310, 160, 160, False, False, "504"),
])
def test_classify(status, done, sent, body, length, head, cut, code):
    assert ngx.classify(status, done, sent, body, length, head, cut) == code


def test_datagrams_from_others_on_the_log_port_count_nothing(env):
    """Only loopback can reach the log socket, but any process there can: a line without this run's
    tag (kept in a file only sentinel's user reads) is malformed, never a request."""
    _, sc = env
    log = sc.sc.access_log
    before, malformed = counts(sc), log.malformed
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in (b"<190>Dec  5 05:06:12 sentinel: " + LINE, b"x" * 60000, b"\x00"):
            s.sendto(d, tuple(log.address[:2]))
    deadline = time.monotonic() + 5
    while log.malformed < malformed + 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert log.malformed == malformed + 3
    assert counts(sc) == before
    assert httpx.get(sc.url + "/v2/models/digits/infer").status_code == 200   # still counting
    assert httpx.get(sc.admin_url + "/status").json()["nginx"]["log_lines_malformed"] == log.malformed


def test_run_directories_of_sentinels_that_are_gone_are_removed_with_their_captures(tmp_path):
    """A SIGKILLed sentinel leaves its run directory (configuration, captured bodies) behind; the
    next one removes every such directory whose owner is gone, and no other."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    made = {}
    for name, owner in (("dead", str(dead.pid)), ("alive", str(os.getpid())), ("unowned", None),
                        ("garbled", "x")):
        d = tmp_path / f"{ngx.RUN_PREFIX}{name}"
        (d / ngx.CAPTURE_IN).mkdir(parents=True)
        (d / ngx.CAPTURE_IN / "0000000001").write_bytes(b"a payload")
        if owner is not None:
            (d / ngx.OWNER_FILE).write_text(owner)
        made[name] = d
    (tmp_path / "sentinel-other").mkdir()
    assert ngx.remove_stale_run_dirs(str(tmp_path)) == 1
    assert not made["dead"].exists()
    assert all(made[n].exists() for n in ("alive", "unowned", "garbled"))
    assert (tmp_path / "sentinel-other").exists()


def test_capture_folders_go_to_a_memory_file_system_with_room_or_where_configured(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc /proc proc rw 0 0\ntmpfs {shm} tmpfs rw,nosuid,nodev 0 0\n")
    assert ngx.capture_base("auto", 1 << 20, str(shm), str(mounts)) == str(shm)
    # too little room for four times the free-space floor: captures would pause for good there
    assert ngx.capture_base("auto", 1 << 60, str(shm), str(mounts)) is None
    mounts.write_text(f"/dev/vda {shm} ext4 rw 0 0\n")   # not a memory file system
    assert ngx.capture_base("auto", 1 << 20, str(shm), str(mounts)) is None
    assert ngx.capture_base("auto", 1 << 20, str(tmp_path / "none"), str(tmp_path / "none")) is None
    assert ngx.capture_base(str(tmp_path), 1 << 60) == str(tmp_path)   # configured: used as it is
    cfg = make_config("http://x:1", rate=0.5, engine="nginx", capture_dir=str(tmp_path))
    n = ngx.Nginx(cfg, "nginx")
    try:
        assert os.path.dirname(n.capture_dir) == str(tmp_path) and n.capture_dir != n.run_dir
        text = ngx.render_conf(cfg, upstream=("127.0.0.1", 1), log_to=("127.0.0.1", 3), run_dir=n.run_dir,
                               capture_dir=n.capture_dir)
        assert f"proxy_store {n.capture_dir}/{ngx.CAPTURE_OUT}/$request_id;" in text
        assert f"client_body_temp_path {n.run_dir}/body;" in text
    finally:
        n.remove_dirs()
    assert not os.path.exists(n.capture_dir) and not os.path.exists(n.run_dir)
