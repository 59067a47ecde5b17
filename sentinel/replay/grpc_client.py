"""Replay over gRPC: golden samples as OIP v2 `ModelInfer` calls, on the replay runner's schedule.

`GrpcReplayer` is the HTTP `Replayer` with another transport: the same open loop (latency
from the intended send time, coordinated omission corrected), closed loop, comparisons and
report. Calls share one `grpc.aio` channel (HTTP/2 multiplexes them); the runner's
"connections" bound the calls in flight. Requests carry the tensor in
`raw_input_contents`, as `tritonclient.grpc` and perf_analyzer send it. A call that ends
with a non-OK status is an error of kind `grpc_<status>` (e.g. `grpc_unavailable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sentinel import protocols
from sentinel.protocols.base import DecodeHints
from sentinel.protocols.names import GRPC
from sentinel.replay.http import HttpError, Response
from sentinel.replay.runner import LoadPlan, Observer, Progress, Replayer, RunResult, Samples
from sentinel.replay.wire import Decoded, decoded_first

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
READY_METHOD = "/inference.GRPCInferenceService/ServerLive"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.enable_retries", 0)]


@dataclass(frozen=True)
class GrpcTarget:
    """A gRPC endpoint: host and port (`host:port` or `grpc://host:port`; plaintext)."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> GrpcTarget:
        v = value.strip()
        if v.startswith("grpc://"):
            v = v[len("grpc://"):]
        if "://" in v:
            raise ValueError(f"a gRPC target is host:port or grpc://host:port (plaintext), got {value!r}")
        v = v.rstrip("/")
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"a gRPC target is host:port, got {value!r}")
        return cls(host.strip("[]"), int(port))

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class GrpcWire:
    """How to ask one model for one prediction over gRPC, and how to read the answer."""

    model: str
    input_name: str = "input"
    classes: tuple[str, ...] = ()
    protocol: str = "grpc"

    @property
    def path(self) -> str:
        return INFER_METHOD

    def encode(self, x: np.ndarray) -> tuple[dict[str, str], bytes]:
        """No headers and a ModelInferRequest for one sample (sent as a batch of 1, raw contents)."""
        from sentinel.protocols import oip_grpc

        body, _ = oip_grpc.encode_request(np.asarray(x, dtype=np.float32)[None], input_name=self.input_name,
                                          model_name=self.model)
        return {}, body

    def decode(self, headers: dict[str, str], body: bytes) -> Decoded:
        resp = protocols.decode_response(GRPC, body, headers, DecodeHints(classes=self.classes))
        return decoded_first(resp, self.classes)


class GrpcCall:
    """What the runner calls a connection: one ModelInfer call at a time on the shared channel."""

    def __init__(self, owner: GrpcReplayer):
        self.owner = owner

    async def request(self, message: bytes, _body: bytes) -> Response:
        from grpc import aio

        o = self.owner
        try:
            answer = await o.method()(message, timeout=o.timeout_s, metadata=o.metadata)
        except aio.AioRpcError as exc:
            code = exc.code()
            raise HttpError(f"grpc_{code.name.lower()}", f"{code.name}: {exc.details()}") from None
        return Response(200, {}, answer)

    def close(self) -> None:
        """Nothing to close per call; the channel closes when the run ends."""


class GrpcReplayer(Replayer):
    """The replay runner over gRPC (see the module docstring)."""

    def __init__(self, target: GrpcTarget, wire: GrpcWire, samples: Samples, *,
                 headers: dict[str, str] | None = None, observer: Observer | None = None,
                 progress: Progress | None = None):
        self.target = target  # type: ignore[assignment]
        self.wire = wire      # type: ignore[assignment]
        self.samples = samples
        self.observer = observer
        self.progress = progress
        self.metadata = tuple((k.lower(), v) for k, v in (headers or {}).items())
        self._requests = [wire.encode(x)[1] for x in samples.inputs]
        self._channel: Any = None
        self._method: Any = None
        self.timeout_s = 30.0

    def method(self) -> Any:
        if self._method is None:
            from grpc import aio

            self._channel = aio.insecure_channel(self.target.authority, options=CHANNEL_OPTIONS)
            self._method = self._channel.unary_unary(INFER_METHOD)
        return self._method

    def new_connection(self) -> Any:
        return GrpcCall(self)

    async def run_async(self, plan: LoadPlan) -> RunResult:
        self.timeout_s = plan.timeout_s
        try:
            return await super().run_async(plan)
        finally:
            if self._channel is not None:
                await self._channel.close()
            self._channel = self._method = None


async def probe_grpc(target: GrpcTarget, timeout: float = 2.0) -> None:
    """Raise HttpError("connect") unless the target answers ServerLive (any status) within `timeout`."""
    from grpc import StatusCode, aio

    async with aio.insecure_channel(target.authority, options=CHANNEL_OPTIONS) as ch:
        try:
            await ch.unary_unary(READY_METHOD)(b"", timeout=timeout, wait_for_ready=True)
        except aio.AioRpcError as exc:
            if exc.code() in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED):
                raise HttpError("connect", f"no gRPC server at {target.authority}: {exc.details()}") from None
