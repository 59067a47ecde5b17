"""The hand-written OIP gRPC codec against the protobuf runtime's own messages (kserve's and Triton's)."""

from __future__ import annotations

import numpy as np
import pytest

from sentinel.errors import DecodeError
from sentinel.protocols import oip_grpc

pytestmark = pytest.mark.unit

pb = pytest.importorskip("kserve.protocol.grpc.grpc_predict_v2_pb2")

NUMERIC = {
    "BOOL": np.array([[True, False, True]]),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 1, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), -1, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), -1, 2**63 - 1]], dtype=np.int64),
    "UINT8": np.array([[0, 1, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1]], dtype=np.uint64),
    "FP16": np.array([[-1.5, 0.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[-1.5, 0.25, 3.4e38]], dtype=np.float32),
    "FP64": np.array([[-1.5, 0.25, 1e300]], dtype=np.float64),
}


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_round_trip_every_datatype(datatype, raw):
    arr = NUMERIC[datatype]
    body = oip_grpc.encode([("x", arr)], model_name="digits", id="r1", raw=raw)
    msg = oip_grpc.parse(body)
    assert (msg.model_name, msg.id) == ("digits", "r1")
    name, got = msg.tensors[0]
    assert name == "x" and got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)
    # The protobuf runtime reads our bytes as the same message.
    ref = pb.ModelInferRequest.FromString(body)
    assert ref.inputs[0].datatype == datatype and list(ref.inputs[0].shape) == [1, 3]


def test_bytes_tensor_raw_and_typed():
    arr = np.empty(2, dtype=object)
    arr[:] = [b"ab", b""]
    for raw in (True, False):
        (name, got), = oip_grpc.parse(oip_grpc.encode([("s", arr)], raw=raw)).tensors
        assert list(got) == [b"ab", b""]


def test_reads_messages_built_by_the_protobuf_runtime():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    req = pb.ModelInferRequest(model_name="digits", model_version="3", id="a")
    t = req.inputs.add(name="input-0", datatype="FP32", shape=[1, 3, 4])
    t.parameters["k"].int64_param = -7
    req.parameters["binary"].bool_param = True
    req.parameters["note"].string_param = "hi"
    req.outputs.add(name="probabilities")
    req.raw_input_contents.append(x.tobytes())
    msg = oip_grpc.parse(req.SerializeToString())
    assert msg.model_version == "3" and msg.requested_outputs == ("probabilities",)
    assert msg.parameters == {"binary": True, "note": "hi"}
    np.testing.assert_array_equal(msg.tensors[0][1], x)

    resp = pb.ModelInferResponse(model_name="digits", id="a")
    o = resp.outputs.add(name="logits", datatype="FP32", shape=[2, 10])
    o.contents.fp32_contents.extend(np.linspace(-1, 1, 20).tolist())
    i = resp.outputs.add(name="labels", datatype="INT32", shape=[2])
    i.contents.int_contents.extend([-3, 9])
    m = oip_grpc.parse(resp.SerializeToString(), "response")
    assert m.tensors[0][1].shape == (2, 10)
    np.testing.assert_array_equal(m.tensors[1][1], np.array([-3, 9], dtype=np.int32))
    out = oip_grpc.decode_response(resp.SerializeToString(), {})
    assert out.kind == "logits" and out.outputs.shape == (2, 10)


def test_decode_request_and_response_forms():
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    req = oip_grpc.decode_request(oip_grpc.encode([("input-0", x)]), {})
    assert req.form == "network" and req.inputs.shape == (2, 1, 8, 8)
    probs = np.full((1, 10), 0.1, dtype=np.float32)
    resp = oip_grpc.decode_response(oip_grpc.encode([("probabilities", probs)], "response", raw=False), {})
    assert resp.kind == "probabilities"


@pytest.mark.parametrize("body, kind", [
    (b"\x0a\x05dig", "truncated"),                    # model_name claims 5 bytes, 3 remain
    (b"\x2a\x02\x12\x00", "missing_field"),           # an input without datatype... and without name
    (b"\x0b", "unsupported"),                         # wire type 3 (group)
])
def test_malformed_messages_raise_decode_error(body, kind):
    with pytest.raises(DecodeError) as ei:
        oip_grpc.decode_request(body, {})
    assert ei.value.kind == kind


def test_raw_contents_must_match_shape():
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(b"\0" * 12)
    with pytest.raises(DecodeError) as ei:
        oip_grpc.parse(req.SerializeToString())
    assert ei.value.kind == "truncated" and "'x'" in str(ei.value)


def test_dispatch_by_protocol_name_round_trips():
    from sentinel import protocols

    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    for binary in (True, False):
        body, headers = protocols.encode_request("oip_v2_grpc", x, input_name="input-0", binary=binary)
        assert headers == {}
        req = protocols.decode_request("oip_v2_grpc", body, headers)
        np.testing.assert_array_equal(req.inputs, x)
    logits = np.array([[1.0, 2.0, 0.5]], dtype=np.float32)
    probs = np.exp(logits) / np.exp(logits).sum()
    body, _ = protocols.encode_response("oip_v2_grpc", [("probabilities", probs), ("logits", logits)])
    resp = protocols.decode_response("oip_v2_grpc", body, {})
    assert resp.kind == "probabilities" and resp.logits is not None
    np.testing.assert_allclose(resp.logits, logits)


def test_stream_response():
    inner = oip_grpc.encode([("logits", np.zeros((1, 10), np.float32))], "response")
    body = b"\x12" + bytes([len(inner)]) + inner if len(inner) < 128 else None
    assert body is not None
    err, resp = oip_grpc.stream_response(body)
    assert err == "" and bytes(resp) == inner
    err, resp = oip_grpc.stream_response(b"\x0a\x03bad")
    assert err == "bad" and resp is None
