"""The gRPC side of the sidecar: OIP v2 over gRPC passed through unchanged, measured and sampled.

Every method is forwarded to the model server's gRPC port as raw bytes (no protobuf
decoding here): request and response messages, metadata (less the transport's own
keys), the client's deadline (the remaining time, capped by `grpc.upstream_timeout_s`),
status code, details and trailing metadata.

- `inference.GRPCInferenceService/ModelInfer` is an inference request: it is counted in
  `sentinel_requests_total` / `sentinel_request_duration_seconds` with `protocol="grpc"`,
  its model label read from field 1 (`model_name`) of the request bytes, and sampled
  (request and response bytes, protocol `oip_v2_grpc`) for the analysis worker.
- `ModelStreamInfer` (Triton's bidirectional stream) is passed through; every response
  message is counted as one inference with `protocol="grpc_stream"`, its latency taken
  from the oldest request message not yet answered. Stream messages are not sampled.
- Every other method (health, metadata, repository, unknown services) is passed through
  and not counted as an inference. Methods of unknown shape are relayed as bidirectional
  streams (right on the wire for every shape); see KNOWN_UNARY for the one caveat.

The code label is the HTTP status gRPC's own mapping gives each status (`CODE_LABELS`,
as grpc-gateway and Envoy translate them), so the availability SLI (`code=~"5.."`)
counts UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, DATA_LOSS and UNIMPLEMENTED
as bad, and client-side statuses (INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429,
CANCELLED 499...) as not. Imports neither the decoders nor numpy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import CancelledError
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from sentinel.protocols.varint import VarintError, read_varint
from sentinel.proxy import tracing
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.sampling import Sample, Sampler

log = logging.getLogger("sentinel.proxy.grpc")

SERVICE = "/inference.GRPCInferenceService/"
INFER = SERVICE + "ModelInfer"
STREAM_INFER = SERVICE + "ModelStreamInfer"
SAMPLE_PROTOCOL = "oip_v2_grpc"    # the protocol name analysis decodes samples with
PROTOCOL_LABEL = "grpc"
STREAM_PROTOCOL_LABEL = "grpc_stream"
CANARY_KEY = "x-sentinel-canary"
# Unary methods of other services: relayed as unary calls. Methods of unknown shape go as
# streams, which is right on the wire for every shape, but grpcio reports a stream call whose
# server answered before reading the request (UNIMPLEMENTED) as INTERNAL.
KNOWN_UNARY = frozenset({"/grpc.health.v1.Health/Check"})
MAX_CACHED_METHODS = 64   # method names come from clients: cache handlers for this many only
# The upstream is the model server in the same pod. grpcio's default reconnect back-off
# grows to 120 s while it is down, so calls kept failing UNAVAILABLE for up to two minutes
# after the model server was back; reconnecting over loopback is cheap, so it is capped.
RECONNECT_BACKOFF_MS = 1000
UPSTREAM_CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
]

# gRPC status → HTTP status label (google.rpc.Code's documented HTTP mapping).
CODE_LABELS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "200",
    grpc.StatusCode.CANCELLED: "499",
    grpc.StatusCode.UNKNOWN: "500",
    grpc.StatusCode.INVALID_ARGUMENT: "400",
    grpc.StatusCode.DEADLINE_EXCEEDED: "504",
    grpc.StatusCode.NOT_FOUND: "404",
    grpc.StatusCode.ALREADY_EXISTS: "409",
    grpc.StatusCode.PERMISSION_DENIED: "403",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "429",
    grpc.StatusCode.FAILED_PRECONDITION: "400",
    grpc.StatusCode.ABORTED: "409",
    grpc.StatusCode.OUT_OF_RANGE: "400",
    grpc.StatusCode.UNIMPLEMENTED: "501",
    grpc.StatusCode.INTERNAL: "500",
    grpc.StatusCode.UNAVAILABLE: "503",
    grpc.StatusCode.DATA_LOSS: "500",
    grpc.StatusCode.UNAUTHENTICATED: "401",
}

# Metadata the transport sets itself; forwarding them would duplicate or contradict it.
_DROP_METADATA = frozenset({
    "user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
    "grpc-message-type", "host", "connection", "keep-alive", "proxy-connection", "transfer-encoding",
    "upgrade", "traceparent", "grpc-status", "grpc-message", "content-length",
})


# The client's deadline passing reaches the sidecar as the client's cancel, a few ms before
# the sidecar's own copy of that deadline (grpc-timeout is rounded up in transit): a cancel
# this close to the deadline is DEADLINE_EXCEEDED (504, as the client sees it), not 499.
DEADLINE_SLACK_S = 0.05
DEADLINE_SLACK_SHARE = 0.01   # ... plus this share of the call's whole deadline
UPSTREAM_CANCELLED = "502"    # CANCELLED sent by the upstream: the client did not go away
EOF_SETTLE_YIELDS = 3   # extra loop turns after the round trip below, for the cancel to land


def cancel_code(left: float | None, elapsed: float) -> grpc.StatusCode:
    """Why a call was cancelled on the client's side: its deadline (`left` s remained) or the client going away."""
    if left is not None and left <= DEADLINE_SLACK_S + DEADLINE_SLACK_SHARE * (left + elapsed):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def code_label(code: grpc.StatusCode | None) -> str:
    """The `code` label of a gRPC status (see CODE_LABELS); an unknown status counts as 500."""
    return CODE_LABELS.get(code, "500") if code is not None else "500"


def peek_model_name(body: bytes) -> str | None:
    """Field 1 (`model_name`) of a ModelInferRequest, reading only the fields before it; None if absent."""
    pos, n = 0, len(body)
    for _ in range(16):   # model_name is field 1, written first; give up after a few other fields
        if pos >= n:
            return None
        key, pos = _varint(body, pos)
        if key is None:
            return None
        wt = key & 7
        if wt == 2:
            size, pos = _varint(body, pos)
            if size is None or pos + size > n:
                return None
            if key >> 3 == 1:
                try:
                    return body[pos:pos + size].decode("utf-8")
                except UnicodeDecodeError:
                    return None
            pos += size
        elif wt == 0:
            _, pos = _varint(body, pos)
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        else:
            return None
    return None


def _varint(buf: bytes, pos: int) -> tuple[int | None, int]:
    try:
        return read_varint(buf, pos)
    except VarintError:
        return None, pos


def _forwardable(md: Any) -> tuple[tuple[str, Any], ...]:
    if not md:
        return ()
    return tuple((k, v) for k, v in md if not k.startswith(":") and k not in _DROP_METADATA)


class GrpcProxy:
    """A `grpc.aio` server whose generic handler forwards every method to one upstream channel."""

    def __init__(self, *, upstream: str, metrics: ProxyMetrics, samplers: dict[str, tuple[str, Sampler]],
                 submit: Callable[[Sample], None], count_sample: Callable[[str | None, str], None],
                 max_message_bytes: int, upstream_timeout_s: float, max_concurrent: int,
                 tracer: tracing.SpanExporter | None = None, request_timeout_s: float = 60.0):
        self.upstream = upstream
        self.metrics = metrics
        self.samplers = samplers
        self.submit = submit
        self.count_sample = count_sample
        self.max_message = max_message_bytes
        self.upstream_timeout = upstream_timeout_s
        self.max_concurrent = max_concurrent
        self.request_timeout = request_timeout_s   # a unary call's message must arrive within this
        self.tracer = tracer
        self.inflight = 0
        self.server: Any = None
        self.channel: Any = None
        self.port = 0
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._logged: set[str] = set()

    # --- lifecycle ------------------------------------------------------------------
    async def start(self, listen: str) -> int:
        """Bind `listen` (host:port) and start serving; returns the bound port (0 when binding failed)."""
        limits = [("grpc.max_receive_message_length", self.max_message),
                  ("grpc.max_send_message_length", self.max_message)]
        self.channel = aio.insecure_channel(self.upstream, options=limits + UPSTREAM_CHANNEL_OPTIONS)
        self.server = aio.server(options=limits + [("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((_Router(self),))
        self.port = self.server.add_insecure_port(listen)
        if self.port:
            await self.server.start()
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those in flight finish for up to `grace_s`, then close the channel."""
        if self.server is not None:
            await self.server.stop(grace_s)
        if self.channel is not None:
            await self.channel.close()

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("%s: %s (further occurrences are only counted)", kind, message)

    def handler(self, method: str) -> grpc.RpcMethodHandler:
        h = self._handlers.get(method)
        if h is None:
            if method == STREAM_INFER or not (method.startswith(SERVICE) or method in KNOWN_UNARY):
                # Unknown shapes (server-streaming health Watch...) are all stream-stream on the wire.
                h = grpc.stream_stream_rpc_method_handler(self._stream_fn(method))
            else:
                # Unary methods are served as stream-unary: the handler then runs before the
                # message is read, so a message the transport refused as too large is counted.
                h = grpc.stream_unary_rpc_method_handler(self._unary_fn(method))
            if len(self._handlers) < MAX_CACHED_METHODS:
                self._handlers[method] = h
        return h

    # --- call plumbing ----------------------------------------------------------------
    def _outgoing(self, context: Any, method: str) -> tuple[list[tuple[str, Any]], str | None, str, bool,
                                                            float | None, Any]:
        """Metadata to forward (with a new traceparent), the exemplar's trace id (None: not sampled), the
        trace id, canary flag, timeout, and span (or None)."""
        md = context.invocation_metadata() or ()
        incoming_tp = None
        canary = False
        fwd = []
        for k, v in md:
            if k == "traceparent":
                # (grpc-core hands over only the last of two traceparent entries: no duplicate to see here)
                incoming_tp = v.encode("latin-1") if isinstance(v, str) else v
            elif k == CANARY_KEY and v.strip() == "1":
                canary = True
            if not k.startswith(":") and k not in _DROP_METADATA:
                fwd.append((k, v))
        parsed = tracing.parse_traceparent(incoming_tp) if incoming_tp else None
        if parsed is None:   # a new trace: a tracestate without a valid traceparent is discarded (W3C)
            fwd = [(k, v) for k, v in fwd if k != "tracestate"]
        span = None
        # the caller's sampled flag is passed on (a 00 must not become 01 at the model server)
        if self.tracer is not None:
            span, trace_id, span_id = self.tracer.start(method.lstrip("/"), incoming_tp if parsed else None)
            flags = self.tracer.span_flags(span)
        else:
            trace_id = parsed[0] if parsed else tracing.new_trace_id()
            span_id = tracing.new_span_id()
            flags = tracing.sampled_flags(parsed[2]) if parsed else "01"
        fwd.append(("traceparent", tracing.traceparent(trace_id, span_id, flags).decode()))
        remaining = context.time_remaining()
        timeout = self.upstream_timeout if remaining is None else min(max(remaining, 0.0), self.upstream_timeout)
        # the exemplar's trace id: none for a trace nobody records (not sampled), as OTel's trace-based filter
        return fwd, (trace_id if flags == "01" else None), trace_id, canary, timeout, span

    def _end_span(self, span: Any, method: str, code: grpc.StatusCode, model: str) -> None:
        if span is not None:
            service, _, name = method.lstrip("/").partition("/")
            self.tracer.end(span, {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,  # type: ignore[union-attr]
                                   "rpc.grpc.status_code": code.value[0], "sentinel.model": model,
                                   "sentinel.protocol": PROTOCOL_LABEL})

    def _unary_fn(self, method: str):
        is_infer = method == INFER
        mc = self.channel.unary_unary(method)
        proxy = self

        async def call(request_iterator: AsyncIterator[bytes], context: Any) -> bytes:
            t0 = time.perf_counter()
            fwd, exemplar_id, trace_id, canary, timeout, span = proxy._outgoing(context, method)
            model = "none"
            name: str | None = None
            code = grpc.StatusCode.OK
            label: str | None = None   # when the code label is not code_label(code)
            proxy.inflight += 1
            if is_infer:
                proxy.metrics.inflight_count += 1
            try:
                try:
                    # Bounded as an HTTP request body is (proxy.body_idle_timeout_s): a client with no
                    # deadline that never sends its message held a max_concurrent_rpcs slot forever.
                    request = await asyncio.wait_for(context.read(), proxy.request_timeout)
                except TimeoutError:
                    code, label = grpc.StatusCode.DEADLINE_EXCEEDED, "408"   # the client's delay, as HTTP's 408
                    proxy.metrics.proxy_errors.labels("request_body_timeout").inc()
                    await context.abort(code, f"no request message within {proxy.request_timeout:g} s "
                                              "(proxy.body_idle_timeout_s)")
                if request is aio.EOF:
                    # No message: either the transport refused it as larger than max_message_bytes
                    # (it has already answered RESOURCE_EXHAUSTED and cancels this handler) or the
                    # client half-closed without sending one. Counting loop turns alone misread
                    # the first as the second when the poller thread was slow to deliver that
                    # cancel (a loaded machine). So make a round trip through the transport:
                    # sending the (empty) initial metadata completes after the cancel of a call
                    # the transport has already ended, which arrives first and cancels this task
                    # (or fails the send); on a live call it succeeds.
                    # A call whose deadline passed before its message arrived ends the same way
                    # (the client saw DEADLINE_EXCEEDED): that is a 504, not a message too large.
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED
                    try:
                        await context.send_initial_metadata(())
                        for _ in range(EOF_SETTLE_YIELDS):
                            await asyncio.sleep(0)
                    except Exception as exc:
                        code = proxy._refused_or_late(context, t0)
                        raise CancelledError() from exc
                    except CancelledError:
                        code = proxy._refused_or_late(context, t0)
                        raise
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    proxy.metrics.proxy_errors.labels("grpc_empty_request").inc()
                    await context.abort(code, f"{method} is unary but the call carried no request message")
                if is_infer:
                    name = peek_model_name(request)
                    if name is not None:
                        model = proxy.metrics.model_label(name)
                if proxy.inflight > proxy.max_concurrent:
                    # The sidecar shedding load is the service being unavailable (as HTTP's 503 +
                    # Retry-After): UNAVAILABLE, which clients retry and the availability SLI counts.
                    code = grpc.StatusCode.UNAVAILABLE
                    proxy.metrics.proxy_errors.labels("concurrency_limit").inc()
                    await context.abort(code, f"the sidecar has {proxy.max_concurrent} calls in flight "
                                              "(grpc.max_concurrent_rpcs)")
                sampler = None
                if is_infer and not canary and name is not None:
                    sampled = proxy.samplers.get(name)
                    if sampled is not None:
                        decision = sampled[1].decide(len(request))
                        if decision == "sample":
                            sampler = sampled
                        elif decision is not None:
                            proxy.count_sample(sampled[0], decision)
                ucall = mc(request, timeout=timeout, metadata=tuple(fwd))
                try:
                    response = await ucall
                except aio.AioRpcError as exc:
                    code = exc.code()
                    label = proxy._upstream_error(code, exc.details())
                    initial = _forwardable(exc.initial_metadata())
                    if initial:
                        await context.send_initial_metadata(initial)
                    await context.abort(code, exc.details() or "", _forwardable(exc.trailing_metadata()))
                initial = _forwardable(await ucall.initial_metadata())
                if initial:
                    await context.send_initial_metadata(initial)
                trailing = _forwardable(await ucall.trailing_metadata())
                if trailing:
                    context.set_trailing_metadata(trailing)
                if sampler is not None:
                    if len(response) > sampler[1].max_bytes:
                        proxy.count_sample(sampler[0], "oversize")
                    else:
                        proxy._submit(Sample(sampler[0], SAMPLE_PROTOCOL, {}, request, {}, response,
                                             "proxy", trace_id, time.time()))
                return response
            except BaseException as exc:
                if isinstance(exc, CancelledError) and code in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                grpc.StatusCode.DEADLINE_EXCEEDED):
                    label = None   # the transport refused the message, or the deadline passed first (see above)
                elif isinstance(exc, CancelledError):
                    # the client went away or its deadline passed
                    code = cancel_code(context.time_remaining(), time.perf_counter() - t0)
                    label = None
                elif code == grpc.StatusCode.OK:
                    code = grpc.StatusCode.INTERNAL
                    proxy._log_once("internal_error", f"relaying {method} failed: {exc!r}")
                raise
            finally:
                proxy.inflight -= 1
                proxy._end_span(span, method, code, model)
                if is_infer:
                    proxy.metrics.inflight_count -= 1
                    if not canary:
                        proxy.metrics.observe_request(model, PROTOCOL_LABEL, label or code_label(code),
                                                      time.perf_counter() - t0, exemplar_id)

        return call

    def _submit(self, sample: Sample) -> None:
        """Hand a sample to the analysis side; the model's answer is sent whatever becomes of it."""
        try:
            self.submit(sample)
        except Exception as exc:   # e.g. the analysis worker could not be started (fork failed)
            self.count_sample(sample.model, "dropped")
            self._log_once("sample_submit_failed", f"a gRPC sample was dropped: {exc!r}")

    def _refused_or_late(self, context: Any, t0: float) -> grpc.StatusCode:
        """A unary call ended by the transport before its message was read: too large, or past its deadline."""
        if cancel_code(context.time_remaining(), time.perf_counter() - t0) == grpc.StatusCode.DEADLINE_EXCEEDED:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        self.metrics.proxy_errors.labels("message_too_large").inc()
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def _upstream_error(self, code: grpc.StatusCode, details: str | None) -> str:
        """Count a failed upstream call; returns its code label."""
        if code == grpc.StatusCode.CANCELLED:
            self.metrics.proxy_errors.labels("grpc_upstream_cancelled").inc()
            return UPSTREAM_CANCELLED
        if code == grpc.StatusCode.UNAVAILABLE:
            self.metrics.proxy_errors.labels("grpc_upstream_unavailable").inc()
            # bounded: a model server's error text may quote the request (no payload in the logs)
            self._log_once("grpc_upstream_unavailable", f"gRPC upstream {self.upstream}: {(details or '')[:200]!r}")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.metrics.proxy_errors.labels("grpc_upstream_deadline").inc()
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.metrics.proxy_errors.labels("grpc_resource_exhausted").inc()
        return code_label(code)

    def _stream_fn(self, method: str):
        counted = method == STREAM_INFER
        mc = self.channel.stream_stream(method)
        proxy = self

        async def call(request_iterator: AsyncIterator[bytes], context: Any) -> None:
            t0 = time.perf_counter()
            fwd, exemplar_id, _, canary, _, span = proxy._outgoing(context, method)
            sent: deque[float] = deque()   # arrival times of request messages not yet answered
            last = time.perf_counter()
            model = "none"

            def observe(code_: str) -> None:
                if counted and not canary:
                    t = sent.popleft() if sent else last
                    proxy.metrics.observe_request(model, STREAM_PROTOCOL_LABEL, code_,
                                                  time.perf_counter() - t, exemplar_id)

            def fail_pending(code_: str, at_least: int) -> None:
                """The stream ended in failure: every request message not answered failed with it."""
                for _ in range(max(len(sent), at_least)):
                    observe(code_)

            # A stream lasts as long as the client wants (only the client's deadline bounds it),
            # so it holds its slot of grpc.max_concurrent_rpcs as a unary call does, and is shed
            # the same way: before anything is opened upstream.
            proxy.inflight += 1
            code = grpc.StatusCode.OK
            try:
                if proxy.inflight > proxy.max_concurrent:
                    code = grpc.StatusCode.UNAVAILABLE
                    proxy.metrics.proxy_errors.labels("concurrency_limit").inc()
                    if counted:
                        fail_pending(code_label(code), 1)
                    await context.abort(code, f"the sidecar has {proxy.max_concurrent} calls in flight "
                                              "(grpc.max_concurrent_rpcs)")
                # Its first message must come within proxy.body_idle_timeout_s, as a unary call's
                # must: streams opened with no deadline that never sent held their slots for good,
                # and max_concurrent_rpcs of them had every other call shed UNAVAILABLE.
                try:
                    first = await asyncio.wait_for(context.read(), proxy.request_timeout)
                except CancelledError:   # the client went away or its deadline passed, before any message
                    code = cancel_code(context.time_remaining(), time.perf_counter() - t0)
                    raise
                except TimeoutError:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    proxy.metrics.proxy_errors.labels("request_body_timeout").inc()
                    if counted:
                        fail_pending("408", 1)   # the client's delay, as HTTP's 408 and a unary call's
                    await context.abort(code, f"no request message within {proxy.request_timeout:g} s "
                                              "(proxy.body_idle_timeout_s)")
                left = context.time_remaining()
                if first is aio.EOF and (context.cancelled() or (left is not None and left <= 0)):
                    # the client went away, or its deadline passed, before any message: the read ends
                    # as a half-close would (the call is not yet marked cancelled), and no upstream
                    # call is opened for it
                    code = cancel_code(left, time.perf_counter() - t0)
                    raise CancelledError()
            except BaseException:
                proxy.inflight -= 1
                proxy._end_span(span, method, code, model)
                raise

            ucall = mc(timeout=context.time_remaining(), metadata=tuple(fwd))

            async def pump() -> None:
                """Client → upstream; ends quietly when the upstream call is over (its status says why)."""
                nonlocal last, model
                msg = first
                try:
                    while msg is not aio.EOF:
                        if counted:
                            last = time.perf_counter()
                            sent.append(last)
                            if model == "none":
                                name = peek_model_name(msg)
                                if name is not None:
                                    model = proxy.metrics.model_label(name)
                        await ucall.write(msg)
                        msg = await context.read()
                    await ucall.done_writing()
                except (aio.AioRpcError, asyncio.InvalidStateError, grpc.RpcError):
                    return

            async def send_initial() -> None:
                """The upstream's initial metadata, once: before the first message, or with the status."""
                nonlocal initial_sent
                if not initial_sent:
                    initial_sent = True
                    initial = _forwardable(await ucall.initial_metadata())
                    if initial:
                        await context.send_initial_metadata(initial)

            pump_task = asyncio.ensure_future(pump())
            initial_sent = False
            try:
                while True:
                    resp = await ucall.read()
                    if resp is aio.EOF:
                        break
                    await send_initial()
                    if counted:
                        observe("500" if _stream_error(resp) else "200")
                    await context.write(resp)
                code = await ucall.code()
                trailing = _forwardable(await ucall.trailing_metadata())
                if code != grpc.StatusCode.OK:
                    raise aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), await ucall.details())
                await send_initial()   # a stream answered with no message still has its metadata
                if trailing:
                    context.set_trailing_metadata(trailing)
            except aio.AioRpcError as exc:
                code = exc.code()
                label = proxy._upstream_error(code, exc.details())
                if counted:
                    fail_pending(label, 1)
                trailing = _forwardable(await ucall.trailing_metadata())
                await send_initial()
                await context.abort(code, exc.details() or "", trailing)
            except CancelledError:
                code = cancel_code(context.time_remaining(), time.perf_counter() - t0)
                ucall.cancel()
                if counted:
                    fail_pending(code_label(code), 0)
                raise
            finally:
                proxy.inflight -= 1
                pump_task.cancel()
                proxy._end_span(span, method, code, model)

        return call


def _stream_error(msg: bytes) -> bool:
    """Whether a ModelStreamInferResponse carries `error_message` (field 1) set."""
    return len(msg) > 1 and msg[0] == 0x0A and msg[1] != 0


class _Router(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcProxy):
        self.proxy = proxy

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        return self.proxy.handler(handler_call_details.method)
