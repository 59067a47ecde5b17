"""Test helpers: a scriptable gRPC upstream on its own thread, and the sidecar with its gRPC listener."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_helpers import RunningSidecar, make_config  # noqa: E402

from sentinel.config import Config, GrpcConfig  # noqa: E402
from sentinel.protocols import oip_grpc  # noqa: E402

__all__ = ["GrpcUpstream", "RunningSidecar", "grpc_config", "infer_request"]

LOGITS = np.array([[0.1, 2.0, -1.0, 0.3, 0.0, 0.5, -0.2, 1.1, 0.9, -3.0]], dtype=np.float32)


def infer_request(model: str = "digits", n: int = 64, request_id: str = "r") -> bytes:
    x = np.random.default_rng(0).random((1, n), dtype=np.float32)
    return oip_grpc.encode([("input-0", x)], model_name=model, id=request_id)


def grpc_config(http_upstream: str, grpc_upstream: str, *, rate: float = 0.0, **grpc_kw: Any) -> Config:
    cfg = make_config(http_upstream, rate=rate)
    return dataclasses.replace(cfg, grpc_listen="127.0.0.1:0", grpc_upstream=grpc_upstream,
                               grpc=GrpcConfig(**grpc_kw))


class ThreadedGrpcServer:
    """A grpc.aio server on loopback, on its own thread and loop; subclasses name their handlers."""

    server_options: tuple[tuple[str, Any], ...] = ()

    def __init__(self, port: int = 0) -> None:
        self.port = port   # 0: any free port
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Method name → handler, of inference.GRPCInferenceService."""
        raise NotImplementedError

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            server = aio.server(options=list(self.server_options))
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", self.handlers()),))
            self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
            await server.start()
            self._ready.set()
            await self._stop.wait()
            await server.stop(0)

        asyncio.run(main())

    def __enter__(self):  # type: ignore[no-untyped-def]
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class GrpcUpstream(ThreadedGrpcServer):
    """A real grpc.aio server on loopback whose ModelInfer answers by the request's model_name.

    model_name "slow:S" sleeps S seconds, "fail" answers INTERNAL with trailing metadata,
    "cancelled" answers CANCELLED,
    "big:N" answers N bytes; anything else gets a ModelInferResponse with LOGITS, and the
    request's metadata echoed back as initial metadata `x-seen-<key>`. ModelStreamInfer answers
    each message in order; "fail" gets an error_message, "slow:S" is answered after S seconds.
    """

    server_options = (("grpc.max_send_message_length", 64 << 20),)

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.seen: list[tuple[str, dict[str, Any], float | None]] = []
        self.seen_stream: list[str] = []   # model_name of every ModelStreamInfer message read

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {"ModelInfer": grpc.unary_unary_rpc_method_handler(self._infer),
                "ServerLive": grpc.unary_unary_rpc_method_handler(self._live),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._stream)}

    async def _infer(self, request: bytes, context: Any) -> bytes:
        md = {k: v for k, v in context.invocation_metadata()}
        msg = oip_grpc.parse(request)
        self.seen.append((msg.model_name, md, context.time_remaining()))
        name = msg.model_name
        if name.startswith("slow:"):
            await asyncio.sleep(float(name[5:]))
        elif name == "fail":
            await context.abort(grpc.StatusCode.INTERNAL, "model exploded", (("x-why", "test"),))
        elif name == "cancelled":   # the server gives up on the call itself
            await context.abort(grpc.StatusCode.CANCELLED, "server cancelled")
        elif name.startswith("big:"):
            return b"\0" * int(name[4:])
        await context.send_initial_metadata(tuple((f"x-seen-{k}", v) for k, v in md.items()
                                                  if k in ("x-client", "traceparent")))
        context.set_trailing_metadata((("x-trailer", "t1"),))
        return oip_grpc.encode([("logits", LOGITS)], "response", model_name=name, id=msg.id)

    async def _live(self, request: bytes, context: Any) -> bytes:
        return b"\x08\x01"   # ServerLiveResponse{live: true}

    async def _stream(self, requests: Any, context: Any) -> Any:
        async for req in requests:
            msg = oip_grpc.parse(req)
            self.seen_stream.append(msg.model_name)
            if msg.model_name == "fail":
                yield b"\x0a\x04oops"   # ModelStreamInferResponse{error_message: "oops"}
                continue
            if msg.model_name.startswith("slow:"):
                await asyncio.sleep(float(msg.model_name[5:]))
            inner = oip_grpc.encode([("logits", LOGITS)], "response", model_name=msg.model_name, id=msg.id)
            out = bytearray()
            oip_grpc._bytes_field(out, 2, inner)   # ModelStreamInferResponse{infer_response: ...}
            yield bytes(out)
