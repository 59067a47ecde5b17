"""Tracing as an SRE follows it: exemplar → exported span → the model server's traceparent.

A real OTLP/HTTP receiver on loopback decodes what the sidecar exports.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from proxy_helpers import RunningSidecar, Upstream, make_config

from sentinel.config import TracingConfig
from sentinel.proxy.tracing import SpanExporter, parse_traceparent

SPAN = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP trace receiver keeping every span it is sent."""

    def __init__(self) -> None:
        spans: list[Any] = []
        self.spans = spans

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                req = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                spans.extend(s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"

    def span(self, trace: str) -> Any:
        found = [s for s in self.spans if s.trace_id.hex() == trace]
        assert len(found) == 1, (trace, len(found))
        return found[0]

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def _forwarded(up: Upstream, sc: RunningSidecar, tp: str) -> str:
    httpx.post(sc.url + "/echo", content=b"x", headers={"traceparent": tp})
    return up.seen[-1]["headers"]["traceparent"]


def test_callers_sampled_flag_is_forwarded_without_exporter():
    """A caller that did not sample (flags 00) must not have its trace turned sampled upstream."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        fwd = _forwarded(up, sc, f"00-{trace}-{SPAN}-00")
        assert parse_traceparent(fwd.encode()) == (trace, fwd[36:52], "00") and fwd[36:52] != SPAN
        assert _forwarded(up, sc, f"00-{trace}-{SPAN}-01").endswith("-01")
        assert _forwarded(up, sc, f"00-{trace}-{SPAN}-09").endswith("-01")   # only the sampled bit passes
        assert _forwarded(up, sc, f"00-{trace}-{SPAN}-08").endswith("-00")
        assert _forwarded(up, sc, "garbage").endswith("-01")                  # a trace sentinel starts


def test_unsampled_caller_is_neither_exported_nor_sampled_upstream(collector):
    sampled, unsampled = "5bf92f3577b34da6a3ce929d0e0e4736", "6bf92f3577b34da6a3ce929d0e0e4736"
    with Upstream() as up:
        cfg = dataclasses.replace(make_config(up.url), tracing=TracingConfig(otlp_endpoint=collector.url))
        with RunningSidecar(cfg) as sc:
            fwd_unsampled = _forwarded(up, sc, f"00-{unsampled}-{SPAN}-00")
            fwd_sampled = _forwarded(up, sc, f"00-{sampled}-{SPAN}-01")
    assert fwd_unsampled.startswith(f"00-{unsampled}-") and fwd_unsampled.endswith("-00")
    assert fwd_sampled.endswith("-01")
    span = collector.span(sampled)   # the processor was flushed by stopping
    assert span.parent_span_id.hex() == SPAN and span.span_id.hex() == fwd_sampled[36:52]
    assert not [s for s in collector.spans if s.trace_id.hex() == unsampled]


@pytest.mark.parametrize("tp", [
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",   # HEXDIGLC: uppercase is invalid
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",   # a later version's fields follow a dash
])
def test_invalid_traceparent_starts_a_new_trace_with_or_without_exporter(tp):
    assert parse_traceparent(tp.encode()) is None
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        fwd = _forwarded(up, sc, tp)
    assert parse_traceparent(fwd.encode()) is not None
    assert "4bf92f3577b34da6a3ce929d0e0e4736" not in fwd.lower()


def test_later_version_with_extra_fields_is_continued():
    tp = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds"
    assert parse_traceparent(tp.encode()) == ("4bf92f3577b34da6a3ce929d0e0e4736", SPAN, "01")


def test_span_lasts_as_long_as_the_exemplar_says(collector):
    """A request that waited 0.5 s for an upstream connection: its exemplar says 0.5 s, so must its span."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fill = []
    for _ in range(4):   # a full accept queue: further SYNs go unanswered
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(hole.getsockname())
        except BlockingIOError:
            pass
        fill.append(c)
    trace = "7bf92f3577b34da6a3ce929d0e0e4736"
    try:
        cfg = dataclasses.replace(make_config(f"http://127.0.0.1:{hole.getsockname()[1]}", connect_timeout_s=0.5),
                                  tracing=TracingConfig(otlp_endpoint=collector.url))
        with RunningSidecar(cfg) as sc:
            r = httpx.get(sc.url + "/x", headers={"traceparent": f"00-{trace}-{SPAN}-01"}, timeout=10)
            om = httpx.get(sc.admin_url + "/metrics",
                           headers={"Accept": "application/openmetrics-text; version=1.0.0"}).text
    finally:
        for c in fill:
            c.close()
        hole.close()
    assert r.status_code == 504
    line = next(ln for ln in om.splitlines() if f'trace_id="{trace}"' in ln)
    observed = float(line.split("} ")[-1].split()[0])
    span = collector.span(trace)
    duration = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
    assert observed >= 0.45 and abs(duration - observed) < 0.05, (duration, observed)
    assert span.status.code == Status.STATUS_CODE_ERROR


def test_span_status_is_error_for_5xx_only(collector):
    ok, bad = "8bf92f3577b34da6a3ce929d0e0e4736", "9bf92f3577b34da6a3ce929d0e0e4736"
    with Upstream() as up:
        cfg = dataclasses.replace(make_config(up.url), tracing=TracingConfig(otlp_endpoint=collector.url))
        with RunningSidecar(cfg) as sc:
            assert httpx.get(sc.url + "/status?code=404", headers={"traceparent": f"00-{ok}-{SPAN}-01"}).status_code == 404
            assert httpx.get(sc.url + "/status?code=503", headers={"traceparent": f"00-{bad}-{SPAN}-01"}).status_code == 503
    assert collector.span(ok).status.code == Status.STATUS_CODE_UNSET
    assert collector.span(bad).status.code == Status.STATUS_CODE_ERROR
    attrs = {a.key: a.value.int_value for a in collector.span(bad).attributes}
    assert attrs["http.response.status_code"] == 503


def test_grpc_server_errors_mark_the_span(collector):
    exporter = SpanExporter(collector.url, "t")
    traces = {}
    for code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.DEADLINE_EXCEEDED):
        span, trace, _ = exporter.start("inference.GRPCInferenceService/ModelInfer", None)
        exporter.end(span, {"rpc.system": "grpc", "rpc.grpc.status_code": code.value[0]})
        traces[code] = trace
    exporter.shutdown()
    got = {code: collector.span(t).status.code for code, t in traces.items()}
    assert got == {grpc.StatusCode.OK: Status.STATUS_CODE_UNSET, grpc.StatusCode.NOT_FOUND: Status.STATUS_CODE_UNSET,
                   grpc.StatusCode.UNAVAILABLE: Status.STATUS_CODE_ERROR,
                   grpc.StatusCode.DEADLINE_EXCEEDED: Status.STATUS_CODE_ERROR}


def test_two_traceparent_fields_start_a_new_trace():
    """Two fields name two parents; the W3C spec calls that invalid. The last one silently won."""
    a, b = "4bf92f3577b34da6a3ce929d0e0e4736", "5bf92f3577b34da6a3ce929d0e0e4736"
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        httpx.post(sc.url + "/echo", content=b"x",
                   headers=[("traceparent", f"00-{a}-{SPAN}-01"), ("traceparent", f"00-{b}-{SPAN}-01")])
        fwd = up.seen[-1]["headers"]["traceparent"]
        assert parse_traceparent(fwd.encode()) is not None and a not in fwd and b not in fwd
        assert _forwarded(up, sc, f"00-{a}-{SPAN}-01").startswith(f"00-{a}-")   # one field: continued


def _exemplar_traces(sc: RunningSidecar) -> set[str]:
    om = httpx.get(sc.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}).text
    return {ln.split('trace_id="', 1)[1][:32] for ln in om.splitlines() if 'trace_id="' in ln}


def test_tracestate_is_forwarded_only_with_the_traceparent_it_belongs_to():
    """W3C trace context: a tracestate without a valid traceparent is discarded. It was forwarded beside
    the new trace sentinel started, so the model server read another vendor's state into it."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        for tp in (f"00-{trace}-{SPAN}-01", f"00-{trace}-{SPAN}-00"):   # valid: continued, state kept
            httpx.post(sc.url + "/echo", content=b"x", headers={"traceparent": tp, "tracestate": state})
            assert up.seen[-1]["headers"]["tracestate"] == state
            assert up.seen[-1]["headers"]["traceparent"].startswith(f"00-{trace}-")
        for headers in ({"tracestate": state},                                       # no traceparent
                        {"traceparent": "00-xyz", "tracestate": state},              # an invalid one
                        [("traceparent", f"00-{trace}-{SPAN}-01"), ("traceparent", f"00-{trace}-{SPAN}-01"),
                         ("tracestate", state)]):                                     # two: invalid
            httpx.post(sc.url + "/echo", content=b"x", headers=headers)
            seen = up.seen[-1]["headers"]
            assert "tracestate" not in seen, (headers, seen)
            assert parse_traceparent(seen["traceparent"].encode()) is not None


def test_no_exemplar_points_at_a_trace_the_caller_did_not_sample():
    """OpenTelemetry's trace-based exemplar filter: a not-sampled trace (flags 00) is recorded by
    nobody, so an exemplar naming it leads on-call to a trace that does not exist."""
    unsampled, sampled = "5bf92f3577b34da6a3ce929d0e0e4736", "6bf92f3577b34da6a3ce929d0e0e4736"
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        _forwarded(up, sc, f"00-{sampled}-{SPAN}-01")
        _forwarded(up, sc, f"00-{unsampled}-{SPAN}-00")   # last: a bucket keeps its latest exemplar
        traces = _exemplar_traces(sc)
    assert sampled in traces and unsampled not in traces, traces


def test_a_collector_that_never_answers_does_not_hold_the_sidecar_at_exit():
    """A collector that accepts and never answers held the exporter's last flush for its 10 s
    timeout after the drain was over; stopping now waits at most TRACER_SHUTDOWN_S."""
    import time

    from sentinel.proxy.sidecar import TRACER_SHUTDOWN_S

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:   # take connections, read nothing, answer nothing
        hole.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hole.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        with Upstream() as up:
            cfg = dataclasses.replace(make_config(up.url), tracing=TracingConfig(
                otlp_endpoint=f"http://127.0.0.1:{hole.getsockname()[1]}"))
            sc = RunningSidecar(cfg).__enter__()
            _forwarded(up, sc, f"00-{'ab' * 16}-{SPAN}-01")   # a sampled span waits in the exporter
            t = time.monotonic()
            sc.stop()
            took = time.monotonic() - t
            assert not sc.thread.is_alive()
    finally:
        stop.set()
        for c in held:
            c.close()
        hole.close()
    assert took < TRACER_SHUTDOWN_S + 2.5, took
