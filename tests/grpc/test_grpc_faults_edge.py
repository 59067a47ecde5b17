"""The gRPC listener under faults a client team meets: bounds on streams, deadlines before the
request arrives, and metadata of streams the upstream answers without a message."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_helpers import (
    GrpcUpstream,
    RunningSidecar,
    ThreadedGrpcServer,
    grpc_config,
    infer_request,
)

from sentinel import metricnames as mn
from sentinel.proxy.grpc_proxy import INFER, STREAM_INFER

pytestmark = pytest.mark.slow   # starts gRPC upstreams and sidecars

REQ = mn.REQUESTS.sample_name
ERR = mn.PROXY_ERRORS.sample_name
HTTP_UP = "http://127.0.0.1:9"   # the HTTP side is not used here


def _labels(model: str, code: str, protocol: str = "grpc") -> dict[str, str]:
    return {"model": model, "protocol": protocol, "code": code}


def _channel(sc: RunningSidecar) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{sc.sc.grpc_address[1]}")  # type: ignore[index]


@pytest.fixture(scope="module")
def upstream():
    with GrpcUpstream() as up:
        yield up


def test_streams_count_against_max_concurrent_rpcs(upstream):
    """Open ModelStreamInfer streams held no slot: any number of them could be held open upstream."""
    with RunningSidecar(grpc_config(HTTP_UP, upstream.address, max_concurrent_rpcs=2)) as sc, _channel(sc) as ch:
        release = threading.Event()

        def held():
            yield infer_request("digits")
            release.wait(10)   # the stream stays open

        streams = [ch.stream_stream(STREAM_INFER)(held(), timeout=20) for _ in range(2)]
        try:
            for s in streams:
                next(s)   # both are open and answered
            with pytest.raises(grpc.RpcError) as ei:
                next(ch.stream_stream(STREAM_INFER)(held(), timeout=10))
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "max_concurrent_rpcs" in (ei.value.details() or "")
            with pytest.raises(grpc.RpcError) as ei:   # unary calls share the budget
                ch.unary_unary(INFER)(infer_request("digits"), timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            release.set()
            for s in streams:
                s.cancel()
        assert sc.wait_for(REQ, _labels("none", "503", "grpc_stream"), 1, timeout=5) == 1
        assert sc.value(ERR, {"reason": "concurrency_limit"}) == 2
        # the slots come back when the streams end
        deadline = time.monotonic() + 5
        while sc.sc.grpc_proxy.inflight and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        assert sc.sc.grpc_proxy.inflight == 0  # type: ignore[union-attr]
        out = list(ch.stream_stream(STREAM_INFER)(iter([infer_request("digits")]), timeout=10))
        assert len(out) == 1


def test_a_deadline_passing_before_the_request_message_is_504_not_message_too_large(upstream):
    """The transport ends such a call as it ends one whose message was too large; the client saw DEADLINE_EXCEEDED."""
    with RunningSidecar(grpc_config(HTTP_UP, upstream.address, max_message_bytes=16384)) as sc, _channel(sc) as ch:
        def late():
            time.sleep(1.5)
            yield infer_request("digits")

        for _ in range(2):
            with pytest.raises(grpc.RpcError) as ei:
                ch.stream_unary(INFER)(late(), timeout=0.5)
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert sc.wait_for(REQ, _labels("none", "504"), 2, timeout=5) == 2
        assert sc.value(REQ, _labels("none", "429")) == 0
        assert sc.value(ERR, {"reason": "message_too_large"}) == 0
        # ... and an oversize message is still what it was
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(INFER)(infer_request("digits", n=8192), timeout=10)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_unary_call_whose_message_never_comes_is_cut_at_the_body_timeout_not_held(upstream):
    """No deadline and no message: the call held a max_concurrent_rpcs slot forever."""
    cfg = grpc_config(HTTP_UP, upstream.address, max_concurrent_rpcs=1)
    cfg = dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, body_idle_timeout_s=0.5))
    with RunningSidecar(cfg) as sc, _channel(sc) as ch:
        stop = threading.Event()

        def never():
            stop.wait(10)
            return
            yield   # a generator that sends nothing

        t = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as ei:
                ch.stream_unary(INFER)(never())   # no deadline
        finally:
            stop.set()
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "body_idle_timeout_s" in ei.value.details()
        assert time.monotonic() - t < 5
        assert sc.wait_for(REQ, _labels("none", "408"), 1, timeout=5) == 1
        assert sc.value(ERR, {"reason": "request_body_timeout"}) == 1
        assert sc.sc.grpc_proxy.inflight == 0  # type: ignore[union-attr]
        assert len(ch.unary_unary(INFER)(infer_request("digits"), timeout=10)) > 0   # the slot is free


class QuietUpstream(ThreadedGrpcServer):
    """ModelStreamInfer that sends initial metadata and trailers but no message: OK, or FAILED_PRECONDITION
    when the first request's model_name is "refuse" (as a server that rejects a stream before answering)."""

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._stream)}

    async def _stream(self, requests: Any, context: Any) -> Any:
        await context.send_initial_metadata((("x-init", "s"), ("x-init-bin", b"\x00\xff")))
        first = await context.read()
        if first is not aio.EOF and b"refuse" in first:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now", (("x-why", "refused"),))
        while await context.read() is not aio.EOF:
            pass
        context.set_trailing_metadata((("x-trailer", "t"),))


def _stream_outcome(addr: str, model: str) -> tuple[Any, ...]:
    with grpc.insecure_channel(addr) as ch:
        call = ch.stream_stream(STREAM_INFER)(iter([infer_request(model)]), timeout=10)
        try:
            out = list(call)
        except grpc.RpcError:
            out = None
        return (out, call.code(), call.details(), tuple(call.initial_metadata() or ()),
                tuple(call.trailing_metadata() or ()))


@pytest.mark.parametrize("model", ["digits", "refuse"])
def test_a_stream_answered_without_a_message_keeps_its_initial_metadata(model):
    with QuietUpstream() as up, RunningSidecar(grpc_config(HTTP_UP, f"127.0.0.1:{up.port}")) as sc:
        direct = _stream_outcome(f"127.0.0.1:{up.port}", model)
        proxied = _stream_outcome(f"127.0.0.1:{sc.sc.grpc_address[1]}", model)  # type: ignore[index]
    assert ("x-init", "s") in direct[3]   # what the upstream sent, called directly
    assert proxied == direct


def test_a_sample_that_cannot_be_queued_does_not_fail_the_call(upstream):
    """The analysis side failing (its worker cannot start...) turned the model's answer into INTERNAL."""
    with RunningSidecar(grpc_config(HTTP_UP, upstream.address, rate=1.0)) as sc, _channel(sc) as ch:
        def broken(sample: Any) -> None:
            raise OSError(11, "Resource temporarily unavailable")   # fork failing under a pids limit

        sc.sc.grpc_proxy.submit = broken  # type: ignore[union-attr]
        body = infer_request("digits")
        with grpc.insecure_channel(upstream.address) as direct:
            want = direct.unary_unary(INFER)(body, timeout=10)
        assert ch.unary_unary(INFER)(body, timeout=10) == want
        assert sc.wait_for(REQ, _labels("digits", "200"), 1, timeout=5) == 1
        assert sc.value(REQ, _labels("digits", "500")) == 0
        assert sc.value(mn.SAMPLES.sample_name, {"model": "digits", "outcome": "dropped"}) == 1


def test_a_callers_not_sampled_flag_reaches_the_model_server_unchanged(upstream):
    """traceparent ...-00 was forwarded as ...-01: the model server sampled a trace whose parent
    nobody exported (W3C trace context passes the sampled flag on)."""
    trace = "6bf92f3577b34da6a3ce929d0e0e4736"
    with RunningSidecar(grpc_config(HTTP_UP, upstream.address)) as sc, _channel(sc) as ch:
        for flags in ("00", "01"):
            _, call = ch.unary_unary(INFER).with_call(
                infer_request("digits"), timeout=10, metadata=(("traceparent", f"00-{trace}-00f067aa0ba902b7-{flags}"),))
            fwd = dict(call.initial_metadata())["x-seen-traceparent"]
            assert fwd.startswith(f"00-{trace}-") and fwd.endswith(f"-{flags}") and "00f067aa0ba902b7" not in fwd


def test_tracestate_and_exemplars_follow_the_traceparent(upstream):
    """As over HTTP: a tracestate without a valid traceparent is discarded, and a not-sampled trace
    gets no exemplar (there was one for every call)."""
    import httpx

    a, b = "6bf92f3577b34da6a3ce929d0e0e4736", "7bf92f3577b34da6a3ce929d0e0e4736"
    state = ("tracestate", "congo=t61rcWkgMzE")
    with RunningSidecar(grpc_config(HTTP_UP, upstream.address)) as sc, _channel(sc) as ch:
        def send(*md: tuple[str, str]) -> tuple[dict, str]:
            _, call = ch.unary_unary(INFER).with_call(infer_request("digits"), timeout=10, metadata=md)
            return upstream.seen[-1][1], dict(call.initial_metadata())["x-seen-traceparent"]

        seen, fwd = send(("traceparent", "00-nonsense"), state)
        assert "tracestate" not in seen and "nonsense" not in fwd
        seen, fwd = send(state)
        assert "tracestate" not in seen
        seen, fwd = send(("traceparent", f"00-{a}-00f067aa0ba902b7-01"), state)
        assert seen.get("tracestate") == state[1] and fwd.startswith(f"00-{a}-")
        send(("traceparent", f"00-{b}-00f067aa0ba902b7-00"))   # last: a bucket keeps its latest exemplar
        assert sc.wait_for(REQ, _labels("digits", "200"), 4, timeout=5) == 4
        om = httpx.get(sc.admin_url + "/metrics",
                       headers={"Accept": "application/openmetrics-text; version=1.0.0"}).text
    exemplars = {ln.split('trace_id="', 1)[1][:32] for ln in om.splitlines() if 'trace_id="' in ln}
    assert a in exemplars and b not in exemplars, exemplars


def test_a_stream_whose_deadline_passes_before_its_first_message_ends_with_that_code(upstream):
    """The wait for a stream's first message, cancelled by the client's deadline, ended its span as OK."""
    with RunningSidecar(grpc_config(HTTP_UP, upstream.address)) as sc, _channel(sc) as ch:
        ended: list = []
        proxy = sc.sc.grpc_proxy
        real = proxy._end_span

        def spy(span, method, code, model):   # noqa: ANN001
            ended.append(code)
            real(span, method, code, model)

        proxy._end_span = spy  # type: ignore[method-assign]
        release = threading.Event()

        def silent():
            release.wait(5)
            return
            yield  # a generator that never sends

        with pytest.raises(grpc.RpcError) as ei:
            next(ch.stream_stream(STREAM_INFER)(silent(), timeout=0.5))
        release.set()
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5
        while not ended and time.monotonic() < deadline:
            time.sleep(0.05)
    assert ended == [grpc.StatusCode.DEADLINE_EXCEEDED], ended
