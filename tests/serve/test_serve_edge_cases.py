"""`sentinel serve` edge cases: malformed v2 tensors are 400s, non-finite fault values are refused,
a taken gRPC port is an error (not a shared one), NaN inputs are refused."""

from __future__ import annotations

import asyncio
import math
import socket

import numpy as np
import pytest

from sentinel.serve.faults import FaultPlan

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("field, value, flag", [
    ("delay_ms", math.inf, "--delay-ms"),
    ("delay_ms", math.nan, "--delay-ms"),
    ("delay_ms", -math.inf, "--delay-ms"),
    ("stall_seconds", math.inf, "--stall-seconds"),
])
def test_non_finite_fault_values_are_refused_by_name(field, value, flag):
    # inf delayed every request forever; NaN was accepted and logged as "delay nan ms"
    kwargs = {field: value, "stall_after": 1 if field == "stall_seconds" else None}
    problems = FaultPlan(**kwargs).validate()
    assert problems == [f"{flag} must be a finite number, got {value}"]


def _kserve():
    from sentinel.serve.server import _import_kserve

    return _import_kserve()


class _Engine:
    """Records what reaches the model; a malformed request must never get here."""

    def __init__(self):
        self.seen: list[np.ndarray] = []

    async def run(self, x):
        self.seen.append(x)
        from sentinel.serve.inference import Prediction

        z = np.zeros((x.shape[0], 10), np.float32)
        return Prediction(z, z)


def _v2(*inputs):
    from kserve.protocol.infer_type import InferInput, InferRequest

    return InferRequest(model_name="digits", infer_inputs=[InferInput(**i) for i in inputs])


@pytest.mark.parametrize("inputs, says", [
    # data that do not fill the declared shape: kserve's as_numpy raised ValueError -> HTTP 500
    ([{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}],
     "input 'input' (FP32, shape [1, 8, 8])"),
    ([{"name": "input", "shape": [100000, 100000], "datatype": "FP32", "data": [1.0]}], "cannot reshape"),
    # strings where numbers belong: float conversion raised ValueError -> HTTP 500
    ([{"name": "input", "shape": [1, 8, 8], "datatype": "BYTES", "data": ["a"] * 64}],
     "input 'input' is BYTES"),
    # a second input was silently ignored
    ([{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": [1.0] * 64},
      {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1.0]}], "one input, the request has 2"),
])
def test_malformed_v2_tensors_are_invalid_input_not_server_errors(inputs, says):
    kserve = _kserve()
    from kserve.errors import InvalidInput

    from sentinel.serve.server import _model_class

    engine = _Engine()
    model = _model_class(kserve)("digits", engine)
    with pytest.raises(InvalidInput) as exc:
        asyncio.run(model.predict(_v2(*inputs)))
    assert says in str(exc.value)
    assert engine.seen == []


def test_a_well_formed_v2_tensor_still_reaches_the_model():
    kserve = _kserve()
    from sentinel.serve.server import _model_class

    engine = _Engine()
    model = _model_class(kserve)("digits", engine)
    asyncio.run(model.predict(_v2({"name": "input", "shape": [2, 8, 8], "datatype": "INT32",
                                   "data": list(range(128))})))
    assert [x.shape for x in engine.seen] == [(2, 8, 8)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_are_bad_input(registry, bad):
    # answered before with HTTP 200 and `null` probabilities in an FP32 tensor
    from sentinel.serve.inference import BadInput, Predictor

    pred = Predictor(registry.resolve("digits:v3"))
    x = np.ones((1, 8, 8), np.float32)
    assert pred.predict(x).probabilities.shape == (1, 10)
    x[0, 3, 3] = bad
    with pytest.raises(BadInput, match="NaN or infinite"):
        pred.predict(x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_grpc_port_another_server_holds_is_an_error_not_a_shared_port():
    """grpc's default SO_REUSEPORT let a second `sentinel serve --grpc-port N` bind N beside the
    first and answer half of its calls (with whatever model it served)."""
    _kserve()
    from sentinel.errors import InfrastructureError
    from sentinel.serve.server import ServeOptions, _GrpcServing

    opts = ServeOptions(host="127.0.0.1", grpc_port=_free_port(), grace_period_s=0)

    async def main() -> str:
        first = _GrpcServing(None, None, opts)
        task = asyncio.create_task(first.run())
        for _ in range(100):
            await asyncio.sleep(0.05)
            if first.server is not None:
                break
        await asyncio.sleep(0.3)
        second = _GrpcServing(None, None, opts)
        try:
            await asyncio.wait_for(second.run(), 5)
            outcome = "second server bound the same port"
        except InfrastructureError as exc:   # `error: ...`, exit 2, no traceback
            outcome = str(exc)
        finally:
            if second.server is not None:
                await second.server.stop(0)
            await first.server.stop(0)
            await task
        return outcome

    outcome = asyncio.run(main())
    assert f"cannot bind gRPC port 127.0.0.1:{opts.grpc_port}" in outcome
