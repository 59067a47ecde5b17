"""The sidecar's gRPC listener against a real grpc.aio upstream: passthrough, metrics, bounds."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_helpers import GrpcUpstream, RunningSidecar, grpc_config, infer_request

from sentinel import metricnames as mn
from sentinel.proxy.grpc_proxy import CODE_LABELS, INFER, STREAM_INFER, code_label, peek_model_name

pytestmark = pytest.mark.slow   # starts a gRPC upstream and sidecars

REQ = mn.REQUESTS.sample_name
ERR = mn.PROXY_ERRORS.sample_name
LIVE = "/inference.GRPCInferenceService/ServerLive"
HTTP_UP = "http://127.0.0.1:9"   # the HTTP side is not used here


def _labels(model: str, code: str, protocol: str = "grpc") -> dict[str, str]:
    return {"model": model, "protocol": protocol, "code": code}


@pytest.fixture(scope="module")
def upstream():
    with GrpcUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def sidecar(upstream):
    with RunningSidecar(grpc_config(HTTP_UP, upstream.address, max_message_bytes=16384,
                                    max_concurrent_rpcs=64)) as sc:
        yield sc


def _channel(sc) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{sc.sc.grpc_address[1]}")


def test_code_labels_cover_every_status_and_failures_are_5xx():
    assert set(CODE_LABELS) == set(grpc.StatusCode)
    bad = {c for c in grpc.StatusCode if code_label(c).startswith("5")}
    assert bad == {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
                   grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED}


def test_peek_model_name():
    assert peek_model_name(infer_request("digits")) == "digits"
    assert peek_model_name(b"\x12\x01v\x0a\x02ab") == "ab"     # model_version before model_name
    assert peek_model_name(b"\x0a\x09ab") is None               # cut short
    assert peek_model_name(b"") is None


def test_passthrough_bytes_metadata_trailers_trace(sidecar, upstream):
    body = infer_request("digits", request_id="p1")
    direct = grpc.insecure_channel(upstream.address)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    before = sidecar.value(REQ, _labels("digits", "200"))
    with _channel(sidecar) as ch:
        resp, call = ch.unary_unary(INFER).with_call(body, metadata=(("x-client", "c1"), ("traceparent", tp)),
                                                     timeout=10)
    want = direct.unary_unary(INFER)(body, timeout=10)
    direct.close()
    assert resp == want
    initial = dict(call.initial_metadata())
    assert initial["x-seen-x-client"] == "c1"
    fwd_tp = initial["x-seen-traceparent"]
    assert fwd_tp.split("-")[1] == "0af7651916cd43dd8448eb211c80319c" and fwd_tp != tp   # same trace, new span
    assert dict(call.trailing_metadata())["x-trailer"] == "t1"
    assert sidecar.wait_for(REQ, _labels("digits", "200"), before + 1, timeout=5) == before + 1
    # The client's deadline went upstream, not the sidecar's 30 s cap (grpc.upstream_timeout_s).
    # gRPC's grpc-timeout encoding rounds up: a server called directly with timeout=10 reads up
    # to 10.0997 s, and a CI run read 10.099 s here. The bound allows 2% over the client's 10 s
    # and still tells the two apart.
    assert upstream.seen[-1][2] is not None and upstream.seen[-1][2] <= 10 * 1.02


def test_error_status_details_and_trailers_pass_through(sidecar):
    with _channel(sidecar) as ch, pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary(INFER)(infer_request("fail"), timeout=10)
    err = ei.value
    assert err.code() == grpc.StatusCode.INTERNAL and err.details() == "model exploded"
    assert dict(err.trailing_metadata())["x-why"] == "test"
    assert sidecar.wait_for(REQ, _labels("fail", "500"), 1, timeout=5) == 1


def test_health_passes_through_and_is_not_an_inference(sidecar):
    total = sum(s.value for m in sidecar.sc.metrics.registry.collect() if m.name == mn.REQUESTS.name
                for s in m.samples if s.name == REQ)
    with _channel(sidecar) as ch:
        assert ch.unary_unary(LIVE)(b"", timeout=10) == b"\x08\x01"
    after = sum(s.value for m in sidecar.sc.metrics.registry.collect() if m.name == mn.REQUESTS.name
                for s in m.samples if s.name == REQ)
    assert after == total


def test_deadline_exceeded_is_counted(sidecar, upstream):
    with _channel(sidecar) as ch, pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary(INFER)(infer_request("slow:3"), timeout=0.5)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert sidecar.wait_for(REQ, _labels("slow:3", "504"), 1, timeout=5) == 1
    # the remaining time went upstream as the deadline (not grpc.upstream_timeout_s); grpc-timeout
    # is sent in whole units, so the server may read a few hundred microseconds more than 0.5 s
    assert upstream.seen[-1][2] <= 0.51


def test_a_client_deadline_passing_is_504_and_a_cancel_from_the_upstream_is_not_499(sidecar):
    # The client's deadline reaches the sidecar as the client's cancel, a few ms before the
    # sidecar's own copy of it: that must count as the DEADLINE_EXCEEDED the client saw.
    with _channel(sidecar) as ch, pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary(INFER)(infer_request("slow:2.5"), timeout=1.5)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert sidecar.wait_for(REQ, _labels("slow:2.5", "504"), 1, timeout=5) == 1
    assert sidecar.value(REQ, _labels("slow:2.5", "499")) == 0
    # CANCELLED from the upstream reaches the client as is, but nobody went away: 502, not 499.
    with _channel(sidecar) as ch, pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary(INFER)(infer_request("cancelled"), timeout=5)
    assert ei.value.code() == grpc.StatusCode.CANCELLED
    assert sidecar.wait_for(REQ, _labels("cancelled", "502"), 1, timeout=5) == 1
    assert sidecar.value(REQ, _labels("cancelled", "499")) == 0
    assert sidecar.value(ERR, {"reason": "grpc_upstream_cancelled"}) == 1


def test_oversize_request_and_response_are_resource_exhausted(sidecar):
    with _channel(sidecar) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(INFER)(infer_request("digits", n=8192), timeout=10)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(INFER)(infer_request("big:40000"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sidecar.wait_for(REQ, _labels("none", "429"), 1, timeout=5) == 1
    assert sidecar.value(ERR, {"reason": "message_too_large"}) >= 1
    assert sidecar.wait_for(REQ, _labels("big:40000", "429"), 1, timeout=5) == 1


def test_unary_call_without_a_message_is_invalid_argument_not_too_large(sidecar):
    # A client that half-closes a unary call without sending its message: the transport
    # reports end-of-stream as it does for an oversize message, but this one is the client's error.
    too_large = sidecar.value(ERR, {"reason": "message_too_large"})
    with _channel(sidecar) as ch, pytest.raises(grpc.RpcError) as ei:
        ch.stream_unary(INFER)(iter(()), timeout=5)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no request message" in (ei.value.details() or "")
    assert sidecar.wait_for(ERR, {"reason": "grpc_empty_request"}, 1, timeout=5) == 1
    assert sidecar.wait_for(REQ, _labels("none", "400"), 1, timeout=5) == 1
    assert sidecar.value(ERR, {"reason": "message_too_large"}) == too_large


def test_canary_calls_are_not_counted(sidecar):
    with _channel(sidecar) as ch:
        ch.unary_unary(INFER)(infer_request("canary-model"), metadata=(("x-sentinel-canary", "1"),), timeout=10)
    assert sidecar.value(REQ, _labels("canary-model", "200")) == 0


def test_stream_infer_counted_per_message(sidecar):
    msgs = [infer_request("digits", request_id="s1"), infer_request("fail"), infer_request("digits", request_id="s2")]
    before = sidecar.value(REQ, _labels("digits", "200", "grpc_stream"))
    with _channel(sidecar) as ch:
        out = list(ch.stream_stream(STREAM_INFER)(iter(msgs), timeout=10))
    assert len(out) == 3 and out[1] == b"\x0a\x04oops"
    assert sidecar.wait_for(REQ, _labels("digits", "200", "grpc_stream"), before + 2, timeout=5) == before + 2
    assert sidecar.wait_for(REQ, _labels("digits", "500", "grpc_stream"), 1, timeout=5) == 1


def test_stream_messages_left_unanswered_count_with_how_the_stream_ended(sidecar, upstream):
    def requests(hold_s: float):
        yield infer_request("digits")
        yield infer_request("slow:3")
        yield infer_request("digits")
        time.sleep(hold_s)   # the request stream stays open

    stream = _labels("digits", "200", "grpc_stream")
    ok, late, gone = (sidecar.value(REQ, {**stream, "code": c}) for c in ("200", "504", "499"))
    with _channel(sidecar) as ch, pytest.raises(grpc.RpcError) as ei:
        list(ch.stream_stream(STREAM_INFER)(requests(2), timeout=1))
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert sidecar.wait_for(REQ, {**stream, "code": "504"}, late + 2, timeout=5) == late + 2   # both unanswered
    seen = len(upstream.seen_stream)
    with _channel(sidecar) as ch:
        call = ch.stream_stream(STREAM_INFER)(requests(2), timeout=10)
        next(call)
        deadline = time.monotonic() + 5
        while len(upstream.seen_stream) < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)   # the third request is in the sidecar too (the upstream reads it after the slow one)
        call.cancel()   # the client goes away with two requests unanswered
    assert sidecar.wait_for(REQ, {**stream, "code": "499"}, gone + 2, timeout=5) == gone + 2
    assert sidecar.value(REQ, stream) == ok + 2


def test_upstream_down_is_unavailable_and_counted():
    with RunningSidecar(grpc_config(HTTP_UP, "127.0.0.1:9")) as sc:   # nothing listens on port 9
        with _channel(sc) as ch, pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(INFER)(infer_request("digits"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sc.wait_for(REQ, _labels("digits", "503"), 1, timeout=5) == 1
        assert sc.value(ERR, {"reason": "grpc_upstream_unavailable"}) == 1


def test_a_model_server_back_after_an_outage_is_reached_within_a_second_or_so():
    """grpcio's default reconnect back-off (up to 120 s) kept calls failing after the upstream was back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with RunningSidecar(grpc_config(HTTP_UP, f"127.0.0.1:{port}")) as sc, _channel(sc) as ch:
        infer = ch.unary_unary(INFER)
        t = time.monotonic()
        while time.monotonic() - t < 10:   # 5 failed connects: the default back-off is then 6.5 s ± 20%
            with pytest.raises(grpc.RpcError):
                infer(infer_request("digits"), timeout=2)
            time.sleep(0.2)
        with GrpcUpstream(port):
            up_at = time.monotonic()
            while True:
                try:
                    infer(infer_request("digits"), timeout=2)
                    break
                except grpc.RpcError:
                    assert time.monotonic() - up_at < 10
                    time.sleep(0.05)
            assert time.monotonic() - up_at < 2.5   # the capped back-off: 1 s ± 20%


def test_concurrency_cap(upstream):
    with RunningSidecar(grpc_config(HTTP_UP, upstream.address, max_concurrent_rpcs=1)) as sc:
        codes: list[grpc.StatusCode] = []

        def call() -> None:
            with _channel(sc) as ch:
                try:
                    ch.unary_unary(INFER)(infer_request("slow:1"), timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert codes.count(grpc.StatusCode.OK) >= 1
        assert grpc.StatusCode.UNAVAILABLE in codes   # shed: retryable, and bad in the availability SLI
        assert sc.value(ERR, {"reason": "concurrency_limit"}) >= 1
        shed = codes.count(grpc.StatusCode.UNAVAILABLE)
        counted = sum(smp.value for m in sc.sc.metrics.registry.collect() for smp in m.samples
                      if smp.name == REQ and smp.labels.get("code") == "503")
        assert counted == shed


def test_bad_listen_address_is_a_clear_error(upstream):
    import dataclasses

    cfg = dataclasses.replace(grpc_config(HTTP_UP, upstream.address), grpc_listen="192.0.2.1:1")
    with pytest.raises(Exception, match="grpc_listen"):
        with RunningSidecar(cfg):
            pass


@pytest.mark.parametrize("module, banned", [
    # the gRPC relay itself: not even numpy or the message codec
    ("sentinel.proxy.grpc_proxy", ("torch", "scipy", "onnxruntime", "numpy", "sentinel.analysis",
                                   "sentinel.protocols.oip_grpc")),
    # the daemon: the gRPC relay is imported only when grpc_listen is set, and no decoder either way
    ("sentinel.proxy.sidecar", ("torch", "scipy", "onnxruntime", "numpy", "sentinel.analysis",
                                "sentinel.protocols.oip_grpc", "grpc")),
])
def test_grpc_proxy_keeps_heavy_imports_out(module, banned):
    code = (f"import sys, {module}; bad = [m for m in {banned!r} if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sentinel_run_with_grpc_flags(upstream, tmp_path):
    import os
    import signal
    import socket
    import urllib.request

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    gport, admin = free(), free()
    cfg = tmp_path / "sentinel.yaml"
    cfg.write_text(f"listen: 127.0.0.1:0\nadmin: 127.0.0.1:{admin}\nupstream: {HTTP_UP}\nlog_level: warning\n"
                   "replay: {canary_interval_s: 0}\nmodels: [{name: digits, version: v3}]\n")
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-m", "sentinel", "run", "-c", str(cfg), "--grpc-listen",
                             f"127.0.0.1:{gport}", "--grpc-upstream", upstream.address],
                            env=dict(os.environ, PYTHONPATH=repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            assert ch.unary_unary(INFER)(infer_request("digits"), timeout=10)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
        assert 'sentinel_requests_total{code="200",model="digits",protocol="grpc"} 1.0' in scrape
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_sentinel_run_grpc_listen_without_upstream_exits_2(tmp_path):
    cfg = tmp_path / "sentinel.yaml"
    cfg.write_text("models: [{name: digits, version: v3}]\n")
    r = subprocess.run([sys.executable, "-m", "sentinel", "run", "-c", str(cfg), "--grpc-listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "grpc_upstream" in r.stderr


def test_otlp_span_per_call_when_configured(upstream):
    import dataclasses

    from proxy_helpers import Upstream

    from sentinel.config import TracingConfig

    trace = "6bf92f3577b34da6a3ce929d0e0e4736"
    with Upstream() as collector:
        cfg = dataclasses.replace(grpc_config(HTTP_UP, upstream.address),
                                  tracing=TracingConfig(otlp_endpoint=collector.url))
        with RunningSidecar(cfg) as sc, _channel(sc) as ch:
            _, call = ch.unary_unary(INFER).with_call(
                infer_request("digits"), timeout=10,
                metadata=(("traceparent", f"00-{trace}-00f067aa0ba902b7-01"), ("x-client", "c")))
            forwarded = dict(call.initial_metadata())["x-seen-traceparent"]
        posts = b"".join(s["body"] for s in collector.seen if s["path"] == "/v1/traces")   # flushed on stop
    assert bytes.fromhex(trace) in posts
    assert bytes.fromhex(forwarded.split("-")[2]) in posts   # our span is the upstream call's parent
    assert b"ModelInfer" in posts


def test_other_services_pass_through(sidecar):
    with _channel(sidecar) as ch, pytest.raises(grpc.RpcError) as ei:
        ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED   # the upstream's answer, relayed


def test_running_daemon_with_grpc_loads_no_heavy_modules():
    """A started sidecar with its gRPC listener relaying a ModelInfer call: still no decoder, torch or scipy."""
    code = """
import asyncio, sys
import grpc
from sentinel.config import Config, ModelConfig
from sentinel.proxy.sidecar import Sidecar
BODY = b"\\x0a\\x01m"   # ModelInferRequest{model_name: "m"}
async def main():
    sc = Sidecar(Config(models=(ModelConfig(name="m", version="1"),), listen="127.0.0.1:0", admin="127.0.0.1:0",
                        upstream="http://127.0.0.1:9", grpc_listen="127.0.0.1:0", grpc_upstream="127.0.0.1:9"))
    await sc.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.grpc_address[1]}") as ch:
        try:
            await ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(BODY, timeout=10)
        except grpc.aio.AioRpcError as exc:
            print(exc.code().name)
    await sc.stop()
asyncio.run(main())
bad = [m for m in ("torch", "onnxruntime", "scipy", "sentinel.analysis", "sentinel.protocols.oip_grpc")
       if m in sys.modules]
assert not bad, bad
"""
    repo = str(Path(__file__).resolve().parents[2])
    p = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "UNAVAILABLE" in p.stdout


def _readyz(sc) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(sc.admin_url + "/readyz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_readyz_reports_the_grpc_upstream(sidecar, upstream):
    _, doc = _readyz(sidecar)
    assert doc["grpc_upstream"] == f"{upstream.address} reachable"
    with RunningSidecar(grpc_config(HTTP_UP, "127.0.0.1:9")) as sc:
        status, doc = _readyz(sc)
        assert status == 503 and not doc["ready"] and doc["grpc_upstream"].startswith("127.0.0.1:9 unreachable")
