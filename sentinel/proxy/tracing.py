"""W3C trace context: parse or create `traceparent`; optional OTLP span export."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

log = logging.getLogger(__name__)

_HEX = frozenset(b"0123456789abcdef")
_rand = random.getrandbits  # ids need uniqueness, not secrecy


def parse_traceparent(value: bytes) -> tuple[str, str, str] | None:
    """(trace_id, parent_span_id, flags) of a valid traceparent, else None.

    As the W3C spec and OpenTelemetry's propagator: lowercase hex only (`HEXDIGLC`), and a
    later version's extra fields must follow a dash.
    """
    v = value.strip(b" \t")
    if len(v) < 55 or v[2:3] != b"-" or v[35:36] != b"-" or v[52:53] != b"-" or v[55:56] not in (b"", b"-"):
        return None
    version, trace, span, flags = v[0:2], v[3:35], v[36:52], v[53:55]
    if version == b"ff" or not (set(version) | set(trace) | set(span) | set(flags)) <= _HEX:
        return None
    if version == b"00" and len(v) != 55:
        return None
    if trace == b"0" * 32 or span == b"0" * 16:
        return None
    return trace.decode(), span.decode(), flags.decode()


def new_trace_id() -> str:
    return "%032x" % (_rand(128) or 1)


def new_span_id() -> str:
    return "%016x" % (_rand(64) or 1)


def traceparent(trace_id: str, span_id: str, flags: str = "01") -> bytes:
    return f"00-{trace_id}-{span_id}-{flags}".encode()


def sampled_flags(flags: str) -> str:
    """The trace-flags to forward for incoming `flags`: only the sampled bit, as the caller set it."""
    return "01" if int(flags, 16) & 1 else "00"


def epoch_ns(perf_t: float) -> int:
    """Wall-clock nanoseconds of an earlier `time.perf_counter()` reading."""
    return time.time_ns() - int((time.perf_counter() - perf_t) * 1e9)


# gRPC status codes a server span marks as errors (OpenTelemetry semantic conventions)
_GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


class SpanExporter:
    """Exports one SERVER span per proxied request by OTLP/HTTP; built only when configured."""

    def __init__(self, endpoint: str, service_name: str):
        # Lazy imports: with no endpoint configured the SDK is never loaded.
        from urllib.parse import urlsplit

        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if urlsplit(endpoint).path in ("", "/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"   # a collector's base URL, as OTEL_*_ENDPOINT
        self.endpoint = endpoint
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self._provider.get_tracer("sentinel.proxy")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind.SERVER
        from opentelemetry.trace import StatusCode
        self._error = StatusCode.ERROR

    def start(self, name: str, incoming: bytes | None, start_ns: int | None = None) -> tuple[Any, str, str]:
        """A started span and the (trace_id, span_id) to forward upstream.

        `start_ns` (epoch ns) backdates the span to the request's arrival, so that its duration
        is the one the latency histogram observed. `span_flags(span)` gives the flags to forward.
        """
        ctx = self._propagator.extract({"traceparent": incoming.decode("latin-1")}) if incoming else None
        span = self._tracer.start_span(name, context=ctx, kind=self._kind, start_time=start_ns)
        sc = span.get_span_context()
        return span, f"{sc.trace_id:032x}", f"{sc.span_id:016x}"

    @staticmethod
    def span_flags(span: Any) -> str:
        """The trace-flags to forward: the sampling decision (a caller's 00 stays 00)."""
        return "01" if span.get_span_context().trace_flags & 1 else "00"

    def end(self, span: Any, attributes: dict[str, Any], end_ns: int | None = None) -> None:
        span.set_attributes(attributes)
        http_status = attributes.get("http.response.status_code")
        if http_status is not None:   # a server span: 5xx, or no complete answer from the upstream
            error = http_status >= 500 or attributes.get("sentinel.code") == "incomplete"
        else:
            error = attributes.get("rpc.grpc.status_code") in _GRPC_SERVER_ERRORS
        if error:
            span.set_status(self._error)
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        try:
            self._provider.shutdown()
        except Exception as exc:  # exporter errors must not break shutdown
            log.warning("OTLP exporter shutdown failed: %s", exc)

    def shutdown_within(self, seconds: float) -> bool:
        """Flush and stop, waiting at most `seconds`; False (and a warning) when the collector took longer.

        A collector that accepts and never answers holds the last export for the exporter's
        timeout (10 s) and the SDK's shutdown for up to 30 s: the drain was over, and the sidecar
        still did not exit. The flush runs on a daemon thread, so the process can end without it.
        """
        import threading

        t = threading.Thread(target=self.shutdown, name="sentinel-otlp-shutdown", daemon=True)
        t.start()
        t.join(seconds)
        if t.is_alive():
            log.warning("tracing: the OTLP collector at %s did not take the last spans within %g s; "
                        "they are dropped", self.endpoint, seconds)
            return False
        return True
