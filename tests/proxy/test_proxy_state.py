"""The client connection's state machine with fakes: a fake transport, clock and upstream, no sockets.

Each test drives `ClientConnection` by bytes and by time (`ProxyContext.sweep(now)`) and
checks what the client was written and what was counted. The socket-level behaviour of
the same cases is in tests/faults/.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel import metricnames as mn
from sentinel.proxy.context import Limits, ProxyContext
from sentinel.proxy.http import Outbox
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.sampling import Sampler
from sentinel.proxy.server import ClientConnection

pytestmark = pytest.mark.unit

REQ = mn.REQUESTS.sample_name
ERR = mn.PROXY_ERRORS.sample_name


class FakeLoop:
    def __init__(self) -> None:
        self.now = 1000.0
        self.later: list[tuple[float, Any]] = []
        self.tasks: list[Any] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Any, *args: Any) -> None:
        self.later.append((delay, fn))

    def create_task(self, coro: Any) -> Any:
        coro.close()
        self.tasks.append(coro)
        return None


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, data: Any) -> None:
        for d in data:
            self.out += d

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.unread

    unread = 0

    def get_extra_info(self, name: str) -> Any:
        return None


class FakeUpstream:
    """What an Exchange needs of an upstream connection."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.exchange: Any = None
        self.aborted = False
        self.until_close = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, data: Any) -> None:
        for d in data:
            self.sent += d

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakePool:
    def __init__(self) -> None:
        self.outbox = Outbox()
        self.connect_timeout = 1.0
        self.given: list[FakeUpstream] = []
        self.released: list[FakeUpstream] = []

    def get_idle(self, check_stale: bool = False) -> FakeUpstream:
        up = FakeUpstream()
        self.given.append(up)
        return up

    def release(self, up: FakeUpstream) -> None:
        self.released.append(up)


LIMITS = Limits(head_timeout=10, body_idle=20, ttfb=30, upstream_idle=40, send_timeout=50, keepalive_idle=75,
                max_line=100, max_head=1024, max_headers=10, max_connections=3)


@pytest.fixture
def env():
    loop = FakeLoop()
    metrics = ProxyMetrics({"digits": "digits"}, 8)
    samples: list = []
    from sentinel.config import SamplingConfig
    samplers = {"digits": ("digits", Sampler(SamplingConfig(rate=1.0, max_per_second=1000, max_bytes=1 << 20)))}
    ctx = ProxyContext(loop=loop, pool=FakePool(), metrics=metrics, max_body=1 << 20, samplers=samplers,
                       submit=samples.append, limits=LIMITS)
    return loop, ctx, samples


def connect(ctx: ProxyContext) -> tuple[ClientConnection, FakeTransport]:
    c = ClientConnection(ctx)
    t = FakeTransport()
    c.connection_made(t)
    return c, t


def value(ctx: ProxyContext, name: str, labels: dict[str, str]) -> float:
    return ctx.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_lone_byte_gets_408_after_the_head_timeout(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    c.data_received(b"G")
    loop.now += 9.9
    ctx.sweep()
    assert not t.out
    loop.now += 0.2
    ctx.sweep()
    assert t.out.startswith(b"HTTP/1.1 408 ") and b"request_head_timeout" in t.out
    assert t.eof_written and value(ctx, ERR, {"reason": "request_head_timeout"}) == 1
    assert value(ctx, REQ, {"model": "none", "protocol": "other", "code": "408"}) == 1


def test_a_trickled_head_is_timed_from_its_first_byte(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    for b in b"GET / HTTP/1.1\r\nX-Slow: aaaa":
        c.data_received(bytes([b]))
        loop.now += 0.5      # a byte every half second keeps the connection "active"
        ctx.sweep()
    assert t.out.startswith(b"HTTP/1.1 408 ")
    assert ctx.pool.given == []   # nothing forwarded


def test_a_silent_new_connection_is_closed_after_the_head_timeout(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    loop.now += 10.5
    ctx.sweep()
    assert t.closed and not t.out


def test_long_target_is_414_and_large_head_431_before_forwarding(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    c.data_received(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n")
    assert t.out.startswith(b"HTTP/1.1 414 ")
    c, t = connect(ctx)
    c.data_received(b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 2000)   # never completes
    assert t.out.startswith(b"HTTP/1.1 431 ")
    c, t = connect(ctx)
    c.data_received(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(11)) + b"\r\n")
    assert t.out.startswith(b"HTTP/1.1 431 ") and b"too_many_headers" in t.out
    assert ctx.pool.given == []


def test_connect_and_upgrade_are_refused_with_501_and_not_forwarded(env):
    loop, ctx, _ = env
    for req in (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n",
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"):
        c, t = connect(ctx)
        ctx.outbox.active = False
        c.data_received(req)
        assert t.out.startswith(b"HTTP/1.1 501 "), bytes(t.out)
        assert b"connection: close" in t.out
    assert ctx.pool.given == []
    assert value(ctx, ERR, {"reason": "upgrade_refused"}) == 2


def test_body_idle_timeout_is_408_and_drops_the_upstream(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    c.data_received(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
    up = ctx.pool.given[0]
    assert up.sent.startswith(b"POST /v2/models/digits/infer HTTP/1.1\r\n")
    loop.now += 19
    ctx.sweep()
    assert not t.out
    loop.now += 2
    ctx.sweep()
    assert t.out.startswith(b"HTTP/1.1 408 ") and up.aborted
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "408"}) == 1


def _request(c: ClientConnection, ctx: ProxyContext) -> FakeUpstream:
    c.data_received(b"GET /v2/models/dig%69ts/infer HTTP/1.1\r\nHost: x\r\n\r\n")
    return ctx.pool.given[-1]


def test_time_to_first_byte_then_upstream_idle_between_reads(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    loop.now += 31
    ctx.sweep()
    assert t.out.startswith(b"HTTP/1.1 504 ") and b"upstream_timeout" in t.out

    c, t = connect(ctx)
    up = _request(c, ctx)
    ex = up.exchange
    for _ in range(5):   # a response streaming slowly but steadily is never cut
        loop.now += 35
        ex.last_up = loop.now
        if not ex.response_started:
            ex.response_head(200, b"OK", [(b"Content-Length", b"100")], up)
        ex.response_body(b"x")
        ex.send_out()   # the end of the upstream's read (UpstreamConnection.data_received): the bytes leave
        ctx.sweep()
    assert not t.aborted
    loop.now += 41
    ctx.sweep()
    assert t.aborted
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "incomplete"}) == 1
    assert value(ctx, ERR, {"reason": "upstream_idle_timeout"}) == 1


def test_a_reader_that_stops_reading_is_cut_and_counted_incomplete(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    ex = up.exchange
    ex.response_head(200, b"OK", [(b"Content-Length", b"10")], up)
    ex.response_body(b"01234")
    t.unread = 300_000
    c.pause_writing()
    for _ in range(4):   # a slow reader that drains something within each send timeout is kept
        loop.now += 40
        t.unread -= 1000
        ctx.sweep()
    assert not t.aborted
    loop.now += 51
    ctx.sweep()
    assert t.aborted and up.aborted
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "incomplete"}) == 1
    assert value(ctx, ERR, {"reason": "downstream_send_timeout"}) == 1


def test_a_complete_response_the_client_has_not_drained_counts_when_drained(env):
    loop, ctx, samples = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    ex = up.exchange
    c.pause_writing()
    ex.response_head(200, b"OK", [(b"Content-Length", b"2")], up)
    ex.response_body(b"{}")
    ex.response_done(reusable=True)
    labels = {"model": "digits", "protocol": "v2", "code": "200"}
    assert value(ctx, REQ, labels) == 0
    c.resume_writing()
    assert value(ctx, REQ, labels) == 1
    assert len(samples) == 1 and samples[0].model == "digits"   # percent-decoded route, sampled


def test_half_close_after_a_complete_request_still_gets_its_answer(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    assert c.eof_received() is True       # keep the write side open
    ex = up.exchange
    ex.response_head(200, b"OK", [(b"Content-Length", b"2")], up)
    ex.response_body(b"ok")
    ex.response_done(reusable=True)
    assert t.out.startswith(b"HTTP/1.1 200 ") and b"connection: close" in t.out
    # counted once the answer has had time to meet a reset (a client that closed for good)
    assert not t.closed and value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "200"}) == 0
    import time as _time

    _time.sleep(0.3)   # the confirmation's wait is not the request's duration
    for _, fn in loop.later:
        fn()
    assert t.closed and not t.aborted
    c.connection_lost(None)
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "200"}) == 1
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "499"}) == 0
    assert ctx.metrics.registry.get_sample_value(
        "sentinel_request_duration_seconds_sum", {"model": "digits", "protocol": "v2", "code": "200"}) < 0.25


class _ResetSocket:
    """A socket whose peer has reset the connection; as the kernel does, SO_ERROR reports the
    reset (ECONNRESET) once, then reads 0."""

    def __init__(self) -> None:
        self.err = 104

    def getsockopt(self, level: int, opt: int) -> int:
        err, self.err = self.err, 0
        return err


@pytest.mark.parametrize("unread", [0, 10], ids=["written", "still-buffered"])
def test_a_client_that_closed_before_its_answer_counts_499_not_the_upstreams_200(env, unread):
    """curl --max-time, requests' timeouts: the client closes (FIN) before the answer. It was
    taken for a half-close and the upstream's 200 was counted, though nobody received it.
    still-buffered: the confirmation read SO_ERROR twice, the first read cleared it, and an answer
    still in our buffer when the reset arrived counted 200."""
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    assert c.eof_received() is True
    sock = _ResetSocket()
    t.get_extra_info = lambda name: sock if name == "socket" else None   # the answer met a reset
    t.unread = unread
    ex = up.exchange
    ex.response_head(200, b"OK", [(b"Content-Length", b"2")], up)
    ex.response_body(b"ok")
    ex.response_done(reusable=True)
    for _, fn in loop.later:
        fn()
    assert t.aborted
    c.connection_lost(ConnectionResetError())
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "499"}) == 1
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "200"}) == 0
    assert value(ctx, ERR, {"reason": "client_disconnect"}) == 1


def test_pipelined_requests_behind_a_close_the_proxy_chose_count_502_not_499(env):
    """An HTTP/1.0 answer relayed until close: the request pipelined behind it was never tried.
    The client did not leave, so it is not 499 client_disconnect."""
    loop, ctx, _ = env
    c, t = connect(ctx)
    c.data_received(b"GET /v2/models/digits/infer HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                    b"GET /v2/models/digits/infer HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    up = ctx.pool.given[-1]
    up.exchange.response_head(200, b"OK", [], up)    # no length: relayed until close
    up.exchange.response_body(b"ok")
    up.exchange.response_done(reusable=False)
    assert t.closed
    c.connection_lost(None)
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "200"}) == 1
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "502"}) == 1
    assert value(ctx, ERR, {"reason": "pipelined_request_dropped"}) == 1
    assert value(ctx, ERR, {"reason": "client_disconnect"}) == 0


def test_a_client_gone_mid_response_is_499(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    up.exchange.response_head(200, b"OK", [(b"Content-Length", b"10")], up)
    c.connection_lost(ConnectionResetError())
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "499"}) == 1
    assert up.aborted


def test_over_the_connection_budget_new_connections_get_503(env):
    loop, ctx, _ = env
    conns = [connect(ctx) for _ in range(3)]
    c, t = connect(ctx)
    assert t.out.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in t.out and t.eof_written
    assert c not in ctx.connections and value(ctx, ERR, {"reason": "connection_limit"}) == 1
    c.connection_lost(None)
    assert ctx.shedding == 0
    conns[0][0].connection_lost(None)
    c, t = connect(ctx)
    assert not t.out


def test_a_flood_of_floods_is_aborted_uncounted_and_the_shed_budget_stays_whole(env):
    """Connections aborted without an answer were counted as 503s, and their close decremented
    ctx.shedding, which they never incremented: it went negative and the flood guard weakened."""
    loop, ctx, _ = env
    conns = [connect(ctx) for _ in range(3)]                        # LIMITS: 3 connections
    shed = [connect(ctx) for _ in range(8)]
    answered = [t for _, t in shed if t.out.startswith(b"HTTP/1.1 503 ")]
    aborted = [t for _, t in shed if t.aborted and not t.out]
    assert len(answered) + len(aborted) == 8 and aborted
    assert value(ctx, REQ, {"model": "none", "protocol": "other", "code": "503"}) == len(answered)
    for c, _ in shed:
        c.connection_lost(None)
    assert ctx.shedding == 0
    assert conns


def test_keep_alive_idle_closes_a_used_connection(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    up.exchange.response_head(204, b"No Content", [], up)
    up.exchange.response_done(reusable=True)
    loop.now += 74
    ctx.sweep()
    assert not t.closed
    loop.now += 2
    ctx.sweep()
    assert t.closed


@pytest.mark.parametrize("connection", [None, b"close, x-extra"])
def test_a_204_is_relayed_without_the_content_length_an_upstream_gave_it(env, connection):
    # RFC 9110 §8.6: no Content-Length in a 204; a client that trusted one would wait for a body.
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    headers = [(b"Content-Length", b"5"), (b"X-Extra", b"1"), (b"X-Kept", b"1")]
    if connection is not None:
        headers.append((b"Connection", connection))
    up.exchange.response_head(204, b"No Content", headers, up)
    up.exchange.response_done(reusable=True)
    head = bytes(t.out).lower()
    assert head.startswith(b"http/1.1 204 no content\r\n") and head.endswith(b"\r\n\r\n")
    assert b"content-length" not in head and b"transfer-encoding" not in head
    assert b"x-kept: 1" in head and (b"x-extra" in head) == (connection is None)
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "204"}) == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=64),
                          st.sampled_from([b"GET ", b"POST ", b"CONNECT ", b"/v2/models/digits/infer", b" HTTP/1.1",
                                           b"\r\n", b"Content-Length: 5", b"Transfer-Encoding: chunked",
                                           b"Upgrade: x", b"Connection: upgrade", b"Expect: 100-continue",
                                           b"%", b"http://h/", b"\r\n\r\n", b"0\r\n\r\n"])), max_size=20))
def test_any_bytes_give_a_well_formed_answer_or_none_and_never_raise(env, pieces):
    loop, ctx, _ = env
    c, t = connect(ctx)
    for p in pieces:
        c.data_received(p)
        loop.now += 3
        ctx.sweep()
    if t.out:
        assert t.out[:9] in (b"HTTP/1.1 ",), bytes(t.out[:40])
        assert t.out[9:12].isdigit()


# --- an upstream that answers before the request body is in ---------------------------------
def _early_answer(c: ClientConnection, ctx: ProxyContext, head: bytes) -> FakeUpstream:
    c.data_received(head)
    up = ctx.pool.given[-1]
    up.exchange.response_head(413, b"Too Big", [(b"Content-Length", b"2")], up)
    up.exchange.response_body(b"no")
    up.exchange.response_done(reusable=True)
    return up


def test_a_body_still_arriving_after_an_early_answer_is_timed(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _early_answer(c, ctx, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    assert t.out.startswith(b"HTTP/1.1 413 ") and up.aborted and not t.closed
    c.data_received(b"x" * 10)   # the rest of a declared body is read and dropped ...
    loop.now += 19
    ctx.sweep()
    assert not t.closed
    loop.now += 2   # ... but a client that stops sending it does not hold the connection
    ctx.sweep()
    assert t.closed and value(ctx, ERR, {"reason": "request_body_timeout"}) == 1
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "413"}) == 1


def test_an_early_answer_resumes_a_client_paused_for_the_upstream(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    c.data_received(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
    c.pause_reading("upstream")   # the upstream stopped reading the body: so does the proxy
    assert not t.reading
    up = ctx.pool.given[-1]
    up.exchange.response_head(413, b"Too Big", [(b"Content-Length", b"2")], up)
    up.exchange.response_done(reusable=True)
    assert t.reading   # that upstream is gone: the rest of the body is read (and dropped)


def test_an_early_answer_to_a_chunked_body_closes_the_connection(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    _early_answer(c, ctx, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"3\r\nabc\r\n")
    assert t.out.startswith(b"HTTP/1.1 413 ") and t.eof_written   # a body with no length: not read forever
    assert any(fn == c._close_transport for _, fn in loop.later)


def test_an_unsupported_transfer_coding_from_the_upstream_is_502(env):
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    up.exchange.response_head(200, b"OK", [(b"Transfer-Encoding", b"gzip, chunked")], up)
    assert t.out.startswith(b"HTTP/1.1 502 ") and b"upstream_bad_response" in t.out and up.aborted
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "502"}) == 1


class _ResetSocket:
    def getsockopt(self, level: int, name: int) -> int:
        return 104   # ECONNRESET: the client reset the connection


def test_a_client_reset_unseen_while_reading_is_paused_is_499_not_the_answer(env):
    loop, ctx, _ = env
    labels = {"model": "digits", "protocol": "v2"}
    pipelined = (b"GET /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n\r\n")
    c, t = connect(ctx)
    c.data_received(pipelined)
    assert not t.reading   # the second request waits: a reset is not read until ...
    up = ctx.pool.given[-1]
    up.exchange.response_head(200, b"OK", [(b"Content-Length", b"2")], up)
    t.get_extra_info = lambda name: _ResetSocket() if name == "socket" else None   # type: ignore[method-assign]
    up.exchange.response_body(b"ok")
    up.exchange.response_done(reusable=True)   # ... the socket is asked when the answer is counted
    assert value(ctx, REQ, {**labels, "code": "200"}) == 0
    assert value(ctx, REQ, {**labels, "code": "499"}) == 1

    c, t = connect(ctx)
    c.data_received(pipelined)
    up = ctx.pool.given[-1]
    t.get_extra_info = lambda name: _ResetSocket() if name == "socket" else None   # type: ignore[method-assign]
    ctx.sweep()   # ... and by the deadline sweep: the connection is dropped, both requests 499
    assert t.aborted
    c.connection_lost(None)
    assert up.aborted
    assert value(ctx, REQ, {**labels, "code": "499"}) == 3 and value(ctx, REQ, {**labels, "code": "200"}) == 0


def test_a_new_wait_for_a_reading_client_starts_a_fresh_clock(env):
    """An answer held in our buffer, then counted through pause/resume_writing, left its clock set:
    the next held answer, minutes later, was cut at the first sweep as a slow reader."""
    loop, ctx, _ = env
    c, t = connect(ctx)
    up = _request(c, ctx)
    ex = up.exchange
    t.unread = 10_000   # answer A finishes while earlier bytes are still in our buffer
    ex.response_head(200, b"OK", [(b"Content-Length", b"2")], up)
    ex.response_body(b"{}")
    ex.response_done(reusable=True)
    ctx.sweep()
    t.unread = 300_000
    c.pause_writing()
    loop.now += 1
    t.unread = 0
    c.resume_writing()   # A is counted here, not by the sweep
    assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "200"}) == 1
    loop.now += 100      # well past send_timeout
    up = _request(c, ctx)
    ex = up.exchange
    t.unread = 20_000    # answer B, held likewise by a client that reads
    ex.response_head(200, b"OK", [(b"Content-Length", b"2")], up)
    ex.response_body(b"{}")
    ex.response_done(reusable=True)
    ctx.sweep()
    assert not t.aborted
    assert value(ctx, ERR, {"reason": "downstream_send_timeout"}) == 0


def test_answers_left_in_our_buffer_when_the_client_resumes_count_only_once_it_takes_them(env):
    """resume_writing comes when our buffer falls under its low-water mark, not when it is empty:
    answers still partly in it were counted delivered, and a client that then stopped reading
    for good was never cut (the connection idled, was closed, and the rest never left)."""
    loop, ctx, _ = env
    labels = {"model": "digits", "protocol": "v2", "code": "200"}
    for drains in (True, False):
        c, t = connect(ctx)
        up = _request(c, ctx)
        ex = up.exchange
        t.unread = 300_000
        c.pause_writing()
        ex.response_head(200, b"OK", [(b"Content-Length", b"2")], up)
        ex.response_body(b"{}")
        ex.response_done(reusable=True)
        before = value(ctx, REQ, labels)
        t.unread = 40_000          # the client took some: under the low-water mark
        c.resume_writing()
        assert value(ctx, REQ, labels) == before   # 40 kB of the answers are still ours
        if drains:
            t.unread = 0
            loop.now += 1
            ctx.sweep()
            assert value(ctx, REQ, labels) == before + 1 and not t.aborted
            continue
        for _ in range(4):         # it takes nothing more: cut send_timeout (50 s) after the first look
            loop.now += 20
            ctx.sweep()
        assert t.aborted
        assert value(ctx, REQ, labels) == before
        assert value(ctx, REQ, {"model": "digits", "protocol": "v2", "code": "incomplete"}) == 1


def test_a_connection_we_closed_whose_bytes_never_leave_is_aborted_after_the_send_timeout(env):
    """close() waits for our buffer to drain; a client that never reads again held the socket
    and its buffer for good (an outsider-controlled resource with no bound)."""
    loop, ctx, _ = env
    c, t = connect(ctx)
    c.data_received(b"GET /x HTTP/1.1\r\n\r\n")   # no Host: refused 400, then closed after a linger
    assert t.out.startswith(b"HTTP/1.1 400 ")
    t.unread = 5_000                 # ... with bytes the client does not take
    for _, fn in loop.later:
        fn()                         # the linger's close()
    assert t.closed and not t.aborted
    for _ in range(2):               # progress restarts the clock
        loop.now += 30
        t.unread -= 1_000
        ctx.sweep()
    assert not t.aborted
    loop.now += 30
    ctx.sweep()
    assert not t.aborted
    loop.now += 30
    ctx.sweep()
    assert t.aborted and c in ctx.connections   # connection_lost (not called by the fake) removes it
    assert value(ctx, ERR, {"reason": "downstream_send_timeout"}) == 1
