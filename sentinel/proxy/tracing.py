"""W3C trace context: parse or create `traceparent`; optional OTLP span export."""

from __future__ import annotations

import logging
import random
from typing import Any

log = logging.getLogger(__name__)

_HEX = frozenset(b"0123456789abcdef")
_rand = random.getrandbits  # ids need uniqueness, not secrecy


def parse_traceparent(value: bytes) -> tuple[str, str, str] | None:
    """(trace_id, parent_span_id, flags) of a valid version-00 traceparent, else None."""
    v = value.strip().lower()
    if len(v) < 55 or v[2:3] != b"-" or v[35:36] != b"-" or v[52:53] != b"-":
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

    def start(self, name: str, incoming: bytes | None) -> tuple[Any, str, str]:
        """A started span and the (trace_id, span_id) to forward upstream."""
        ctx = self._propagator.extract({"traceparent": incoming.decode("latin-1")}) if incoming else None
        span = self._tracer.start_span(name, context=ctx, kind=self._kind)
        sc = span.get_span_context()
        return span, f"{sc.trace_id:032x}", f"{sc.span_id:016x}"

    @staticmethod
    def end(span: Any, attributes: dict[str, Any]) -> None:
        span.set_attributes(attributes)
        span.end()

    def shutdown(self) -> None:
        try:
            self._provider.shutdown()
        except Exception as exc:  # exporter errors must not break shutdown
            log.warning("OTLP exporter shutdown failed: %s", exc)
