"""`sentinel serve`: a kserve ModelServer for one registry model, with fault injection.

Endpoints (kserve's own, plus one route for TorchServe-style clients):
    GET  /v2/health/ready, /v2/health/live, /v2/models/{name}, /v1/models/{name}
    POST /v1/models/{name}:predict   {"instances": [...]} → {"predictions": [[p0..p9], ...]}
    POST /v2/models/{name}/infer     JSON or binary tensor extension; outputs
                                     "probabilities" and "logits" (N×classes FP32), or
                                     only those listed in the request's "outputs"
    POST /predictions/{name}         JSON body (one instance or a batch) → probabilities
Inputs are raw (model.yaml raw_input, preprocessed here) or already network-shaped.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the route's string annotations here

from sentinel.errors import DecodeError, InfrastructureError
from sentinel.protocols.base import numeric_array
from sentinel.registry import ModelEntry
from sentinel.serve.faults import FaultInjector, FaultPlan
from sentinel.serve.inference import BadInput, Prediction, Predictor

log = logging.getLogger("sentinel.serve")

OUTPUTS = ("probabilities", "logits")


@dataclass(frozen=True)
class ServeOptions:
    """How to serve: where, under which name, with which faults."""

    host: str = "127.0.0.1"
    port: int = 8081
    name: str | None = None          # path name; default: model.yaml served.name
    faults: FaultPlan = FaultPlan()
    access_log: bool = False
    threads: int = 1                 # torch intra-op threads (tests share few cores)
    grace_period_s: int = 5
    fault_admin: bool = False        # POST /sentinel/faults changes delay and error ratio at run time
    grpc_port: int | None = None     # also serve OIP v2 over gRPC on this port (kserve's servicer)
    grpc_max_message_bytes: int = 64 * 1024 * 1024


def _import_kserve() -> Any:
    """Import kserve without letting its import-time argparse read our command line."""
    saved = sys.argv
    # kserve.model_server parses sys.argv when imported; `--model v3` would be taken as
    # an abbreviation of its `--model_name`, and `--protocol` clashes with its own flag.
    sys.argv = saved[:1]
    try:
        import kserve
        import kserve.model_server
    finally:
        sys.argv = saved
    return kserve


class _Engine:
    """Predictor plus faults; shared by the v1/v2 model and the TorchServe route."""

    def __init__(self, predictor: Predictor, faults: FaultInjector):
        self.predictor = predictor
        self.faults = faults

    async def run(self, x: np.ndarray) -> Prediction:
        from kserve.errors import InferenceError, InvalidInput

        d = self.faults.next()
        if d.stall_s:
            log.warning("request %d: stalling the server for %.3f s (--stall-after)", d.number, d.stall_s)
            time.sleep(d.stall_s)  # blocks the event loop on purpose: every request waits
        if d.delay_s:
            await asyncio.sleep(d.delay_s)
        if d.fail:
            raise InferenceError(f"injected fault on request {d.number} (--error-ratio)")
        try:
            return self.predictor.predict(x)
        except BadInput as exc:
            raise InvalidInput(str(exc)) from None


def _model_class(kserve: Any) -> type:
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class RegistryModel(kserve.Model):
        """A registry model behind kserve's v1 and v2 endpoints."""

        def __init__(self, name: str, engine: _Engine):
            super().__init__(name)
            self.engine = engine
            self.ready = True

        async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> Any:
            from kserve.errors import InvalidInput

            if isinstance(payload, InferRequest):
                pred = await self.engine.run(_v2_input(payload))
                outs = []
                for name in OUTPUTS:
                    arr = getattr(pred, name)
                    o = InferOutput(name=name, shape=list(arr.shape), datatype="FP32")
                    o.set_data_from_numpy(arr, binary_data=False)
                    outs.append(o)
                return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outs,
                                     use_binary_outputs=payload.use_binary_outputs,
                                     requested_outputs=payload.request_outputs)
            if not isinstance(payload, dict) or "instances" not in payload:
                raise InvalidInput('v1 requests need {"instances": [...]}')
            try:   # kserve parsed the JSON; the array rules are the wire layer's
                x = numeric_array(payload["instances"], "instances").astype(np.float32)
            except DecodeError as exc:
                raise InvalidInput(str(exc)) from None
            pred = await self.engine.run(x)
            return {"predictions": pred.probabilities.tolist()}

    return RegistryModel


def _v2_input(payload: Any) -> np.ndarray:
    """The one input tensor of an OIP v2 request, or InvalidInput (HTTP 400, gRPC INVALID_ARGUMENT).

    kserve's `as_numpy` raises a bare ValueError when the data do not fill the declared shape
    or datatype, which kserve answers with 500: a client's mistake counted as a server error
    (and against the availability SLO of the sidecar in front).
    """
    from kserve.errors import InvalidInput

    if not payload.inputs:
        raise InvalidInput("request has no inputs")
    if len(payload.inputs) != 1:
        names = ", ".join(repr(i.name) for i in payload.inputs)
        raise InvalidInput(f"the model takes one input, the request has {len(payload.inputs)}: {names}")
    inp = payload.inputs[0]
    try:
        x = inp.as_numpy()
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {inp.name!r} ({inp.datatype}, shape {list(inp.shape)}): {exc}") from None
    if x.dtype.kind not in "biuf":
        raise InvalidInput(f"input {inp.name!r} is {inp.datatype}; the model takes a numeric tensor "
                           "(FP16/32/64, INT, UINT or BOOL)")
    return x


def _add_torchserve_route(app: Any, name: str, engine: _Engine) -> None:
    """POST /predictions/{name}[/{version}]: JSON instance(s) in, probabilities out."""
    from fastapi.responses import JSONResponse, Response

    from sentinel.protocols import torchserve
    from sentinel.protocols.base import DecodeHints

    async def handler(request: Request, model: str, version: str | None = None) -> Any:
        from kserve.errors import InferenceError, InvalidInput

        if model != name:
            return JSONResponse({"code": 404, "type": "ModelNotFoundException",
                                 "message": f"Model not found: {model}"}, status_code=404)
        body = await request.body()
        headers = {"content-type": request.headers.get("content-type", "")}
        octet = headers["content-type"].startswith(torchserve.OCTET_STREAM)
        # Raw float32 bytes are shaped by the model's raw input (else its network input); JSON says its shape.
        hints = DecodeHints(raw_shape=engine.predictor.raw_shape or engine.predictor.net_shape) if octet \
            else DecodeHints()
        try:
            x = torchserve.decode_request(body, headers, hints).inputs
            pred = await engine.run(x.astype(np.float32, copy=False))
        except (DecodeError, InvalidInput) as exc:
            return JSONResponse({"code": 400, "type": "BadRequest", "message": str(exc)}, status_code=400)
        except InferenceError as exc:
            return JSONResponse({"code": 503, "type": "InternalServerException", "message": str(exc)},
                                status_code=503)
        # TorchServe answers a single instance with one object, a batch with a list.
        single = not octet and tuple(x.shape) in (engine.predictor.raw_shape, engine.predictor.net_shape)
        out, out_headers = torchserve.encode_response(pred.probabilities, single=single)
        return Response(out, media_type=out_headers["content-type"])

    app.add_api_route("/predictions/{model}", handler, methods=["POST"])
    app.add_api_route("/predictions/{model}/{version}", handler, methods=["POST"])


def _add_fault_route(app: Any, engine: _Engine) -> None:
    """POST /sentinel/faults {"delay_ms": D, "error_ratio": R}: swap the fault plan (drills only)."""
    from dataclasses import replace

    from fastapi.responses import JSONResponse

    async def handler(request: Request) -> Any:
        import json

        try:
            body = json.loads(await request.body() or b"{}")
            if not isinstance(body, dict) or set(body) - {"delay_ms", "error_ratio"}:
                raise ValueError('expected {"delay_ms": D, "error_ratio": R}')
            plan = replace(engine.faults.plan, delay_ms=float(body.get("delay_ms", 0.0)),
                           error_ratio=float(body.get("error_ratio", 0.0)))
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        problems = plan.validate()
        if problems:
            return JSONResponse({"error": "; ".join(problems)}, status_code=400)
        engine.faults.plan = plan
        log.warning("faults changed at run time: delay %.0f ms, error ratio %.2f", plan.delay_ms, plan.error_ratio)
        return JSONResponse({"delay_ms": plan.delay_ms, "error_ratio": plan.error_ratio})

    app.add_api_route("/sentinel/faults", handler, methods=["POST"])


class _GrpcServing:
    """kserve's gRPC inference servicer (OIP v2: ModelInfer, health, metadata) on options.host:grpc_port."""

    def __init__(self, dataplane: Any, repository: Any, options: ServeOptions):
        self.dataplane = dataplane
        self.repository = repository
        self.options = options
        self.server: Any = None

    async def run(self) -> None:
        from grpc import aio
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
        from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
        from kserve.protocol.grpc.servicer import InferenceServicer

        o = self.options
        limit = o.grpc_max_message_bytes
        # grpc sets SO_REUSEPORT by default: a second server on the same port would bind
        # without error and take half the calls of the first. Off, a taken port fails here.
        self.server = aio.server(interceptors=(ExceptionToStatusInterceptor(),),
                                 options=[("grpc.max_send_message_length", limit),
                                          ("grpc.max_receive_message_length", limit),
                                          ("grpc.so_reuseport", 0)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane, self.repository), self.server)
        host = f"[{o.host}]" if ":" in o.host else o.host
        try:   # grpc returns 0 or, in newer releases, raises RuntimeError
            bound = self.server.add_insecure_port(f"{host}:{o.grpc_port}")
        except RuntimeError:
            bound = 0
        if not bound:
            raise InfrastructureError(f"cannot bind gRPC port {host}:{o.grpc_port}: address already in use, "
                                      "or not an address of this machine")
        await self.server.start()
        await self.server.wait_for_termination()

    def stop(self) -> None:
        """Called from the signal handler, on the running loop: in-flight calls get the grace period."""
        if self.server is not None:
            asyncio.get_running_loop().create_task(self.server.stop(self.options.grace_period_s))


def serve(entry: ModelEntry, options: ServeOptions) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (graceful: in-flight requests finish)."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(max(1, options.threads))
    predictor = Predictor(entry, skip_normalization=options.faults.skip_normalization)
    t_model = time.perf_counter()
    kserve = _import_kserve()
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.server import RESTServer

    t_kserve = time.perf_counter()
    if not options.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    name = options.name or entry.manifest.served.name
    engine = _Engine(predictor, FaultInjector(options.faults))
    model = _model_class(kserve)(name, engine)
    _add_torchserve_route(kserve.model_server.app, name, engine)
    if options.fault_admin:
        _add_fault_route(kserve.model_server.app, engine)

    class _Server(kserve.ModelServer):
        """kserve's ModelServer bound to the host we are told (kserve hard-codes 0.0.0.0 and [::])."""

        def start(self, models: list[Any]) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(
                FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                self.http_port, grace_period=self.grace_period, event_loop=self.event_loop,
                timeout_keep_alive=self.timeout_keep_alive)
            self._rest_server.config.host = options.host
            if options.grpc_port is not None:
                # first: a gRPC port that cannot be bound fails before uvicorn starts (one error line)
                self._sentinel_grpc = _GrpcServing(self.dataplane, self.model_repository_extension, options)
                self.servers.append(self._sentinel_grpc.run())
            self.servers.append(self._rest_server.start())
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

        def stop(self, sig: int) -> None:
            super().stop(sig)
            grpc_serving = getattr(self, "_sentinel_grpc", None)
            if grpc_serving is not None:
                grpc_serving.stop()

    server = _Server(http_port=options.port, enable_grpc=False, enable_latency_logging=False,
                     grace_period=options.grace_period_s)
    host = f"[{options.host}]" if ":" in options.host else options.host   # IPv6 in URLs
    log.info("sentinel serve: %s as %r on http://%s:%d (model %.2f s, kserve import %.2f s)%s%s",
             entry.spec, name, host, options.port, t_model - t0, t_kserve - t_model,
             f"; gRPC on {host}:{options.grpc_port}" if options.grpc_port is not None else "",
             f"; faults: {options.faults}" if options.faults.active else "")
    server.start([model])
