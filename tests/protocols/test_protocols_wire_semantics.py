"""Bodies the specs allow (or servers read one way) that no client of ours sends: sentinel must
read them as the model server's own parser does, or refuse them by kind, never allocate what
a few bytes claim, never read a different tensor.

gRPC messages are parsed here by KServe's generated protobuf (`grpc_predict_v2_pb2`, what its
gRPC server reads with) as the truth; the bytes are built field by field, since no client
emits them (protobuf itself merges, skips and keeps unknown fields as below).
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import numpy as np
import pytest

from sentinel.errors import DecodeError
from sentinel.protocols import decode_request, oip_grpc, oip_v2, tensors
from sentinel.protocols.oip_grpc import (
    FIXED64,
    VARINT,
    _bytes_field,
    _key,
    _str_field,
    _write_varint,
)

pytestmark = pytest.mark.unit

GRPC = "oip_v2_grpc"


def _pb() -> Any:
    return pytest.importorskip("kserve.protocol.grpc.grpc_predict_v2_pb2")


def _tensor(name: str, datatype: str, shape: list[int], contents: list[bytes]) -> bytes:
    """An InferInputTensor with each of `contents` as one occurrence of field 5."""
    t = bytearray()
    _str_field(t, 1, name)
    _str_field(t, 2, datatype)
    packed = bytearray()
    for d in shape:
        _write_varint(packed, d)
    _bytes_field(t, 3, bytes(packed))
    for c in contents:
        _bytes_field(t, 5, c)
    return bytes(t)


def _request(*tensors: bytes) -> bytes:
    out = bytearray()
    _str_field(out, 1, "m")
    for t in tensors:
        _bytes_field(out, 5, t)
    return bytes(out)


def test_grpc_bytes_contents_sent_as_a_varint_are_not_allocated_as_that_many_bytes() -> None:
    # bytes_contents (field 8) with wire type varint, value 2**26: 14 bytes of message. Protobuf keeps
    # it as an unknown field (the server reads no element); `bytes(2**26)` allocated 64 MiB of zeros
    # (2**31: 8 GB and 28 s of the analysis worker) and read them as one BYTES element
    contents = bytearray()
    _key(contents, 8, VARINT)
    _write_varint(contents, 1 << 26)
    body = _request(_tensor("x", "BYTES", [1], [bytes(contents)]))
    msg = _pb().ModelInferRequest()
    msg.ParseFromString(body)
    assert list(msg.inputs[0].contents.bytes_contents) == []
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as err:
            decode_request(GRPC, body, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.kind == "bad_shape" and "contents have 0" in str(err.value)
    assert peak < 8 << 20


@pytest.mark.parametrize("field, wire_type, payload, datatype", [
    (6, FIXED64, np.array([1.0, 2.0], "<f4").tobytes(), "FP32"),   # two fp32 values as one fixed64
    (7, VARINT, None, "FP64"),                                      # fp64_contents as a varint
    (2, FIXED64, np.array([7, 9], "<i4").tobytes(), "INT32"),      # int_contents as a fixed64
])
def test_grpc_typed_contents_of_another_wire_type_are_not_read_as_values(
        field: int, wire_type: int, payload: bytes | None, datatype: str) -> None:
    contents = bytearray()
    _key(contents, field, wire_type)
    if payload is None:
        _write_varint(contents, 1 << 40)
    else:
        contents += payload
    body = _request(_tensor("x", datatype, [1, 2], [bytes(contents)]))
    msg = _pb().ModelInferRequest()
    msg.ParseFromString(body)
    c = msg.inputs[0].contents
    assert not (c.fp32_contents or c.fp64_contents or c.int_contents)   # the server reads no value
    with pytest.raises(DecodeError) as err:
        decode_request(GRPC, body, {})
    assert err.value.kind == "bad_shape" and "contents have 0" in str(err.value)


def test_grpc_contents_sent_in_two_occurrences_are_merged_as_protobuf_does() -> None:
    x = np.arange(6, dtype="<f4").reshape(1, 6)
    first, second = bytearray(), bytearray()
    _bytes_field(first, 6, x[0, :4].tobytes())
    _bytes_field(second, 6, x[0, 4:].tobytes())
    body = _request(_tensor("x", "FP32", [1, 6], [bytes(first), bytes(second)]))
    msg = _pb().ModelInferRequest()
    msg.ParseFromString(body)
    truth = np.array(msg.inputs[0].contents.fp32_contents, dtype=np.float32).reshape(1, 6)
    assert np.array_equal(truth, x)
    got = oip_grpc.parse(body).tensors[0][1]
    assert got.dtype == np.float32 and np.array_equal(got, truth)
    assert np.array_equal(decode_request(GRPC, body, {}).inputs, truth)


def test_grpc_a_requested_output_name_of_another_wire_type_is_skipped_not_fatal() -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    out = bytearray(oip_grpc.encode([("x", x)], model_name="m"))
    requested = bytearray()
    _key(requested, 1, VARINT)   # name as a varint: an unknown field to protobuf
    _write_varint(requested, 3)
    _bytes_field(out, 6, bytes(requested))
    msg = _pb().ModelInferRequest()
    msg.ParseFromString(bytes(out))
    assert [o.name for o in msg.outputs] == [""]
    assert np.array_equal(decode_request(GRPC, bytes(out), {}).inputs, x)


def test_v2_tensor_with_both_json_data_and_binary_data_size_is_refused_as_servers_differ() -> None:
    from kserve import InferRequest  # type: ignore[import-untyped]

    binary = np.array([[9, 9, 9, 9]], np.float32)
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4],
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    body = head + binary.tobytes()
    # KServe's REST server reads `data` (and never the binary bytes); Triton reads the binary bytes
    kserve_reads = InferRequest.from_bytes(body, len(head), "m").inputs[0].as_numpy()
    assert np.array_equal(kserve_reads, [[1, 2, 3, 4]])
    for headers in ({oip_v2.HEADER_LENGTH: str(len(head))}, {}):
        with pytest.raises(DecodeError) as err:
            decode_request("v2", body, headers)
        assert err.value.kind == "bad_header"
        assert "'x'" in str(err.value) and "binary_data_size" in str(err.value)
    # either alone still decodes
    alone = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 16}}]}).encode()
    assert np.array_equal(decode_request("v2", alone + binary.tobytes(),
                                         {oip_v2.HEADER_LENGTH: str(len(alone))}).inputs, binary)


def _varint_bytes(v: int) -> bytes:
    """A varint of exactly the bits of `v` (up to 70), not masked to 64 as `_write_varint` does."""
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


@pytest.mark.parametrize("datatype, field, values", [
    ("INT32", 2, [0xFFFFFFFF, 5, (1 << 32) + 7]),   # -1 in 5 bytes; high bits beyond the int32
    ("INT8", 2, [0xFFFFFFFF, 1, 2]),
    ("UINT32", 4, [(1 << 32) + 3, 1, 2]),
    ("UINT8", 4, [(1 << 32) + 3, 1, 2]),
    ("BOOL", 1, [2, 0, 1]),                           # any non-zero varint is true
])
def test_grpc_typed_varints_are_read_at_the_width_of_their_protobuf_field(
        datatype: str, field: int, values: list[int]) -> None:
    contents = bytearray()
    _bytes_field(contents, field, b"".join(_varint_bytes(v) for v in values))
    body = _request(_tensor("x", datatype, [1, 3], [bytes(contents)]))
    msg = _pb().ModelInferRequest()
    msg.ParseFromString(body)
    c = msg.inputs[0].contents
    truth = list(c.int_contents) or list(c.uint_contents) or list(c.bool_contents)
    got = decode_request(GRPC, body, {}).inputs
    assert got.tolist() == [truth]
    assert got.dtype == tensors.DTYPES[datatype]


def test_grpc_an_unpacked_ten_byte_varint_keeps_its_low_64_bits() -> None:
    contents = bytearray()
    for v in ((1 << 70) - 1, 5):   # a 10-byte varint of 70 bits set, then 5, each unpacked
        _key(contents, 3, VARINT)
        contents += _varint_bytes(v)
    body = _request(_tensor("x", "INT64", [1, 2], [bytes(contents)]))
    msg = _pb().ModelInferRequest()
    msg.ParseFromString(body)
    assert list(msg.inputs[0].contents.int64_contents) == [-1, 5]
    assert decode_request(GRPC, body, {}).inputs.tolist() == [[-1, 5]]


def test_v2_bytes_data_with_a_lone_surrogate_escape_is_malformed_json_not_a_decoder_bug() -> None:
    orjson = pytest.importorskip("orjson")
    body = b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["\\ud800abc"]}]}'
    with pytest.raises(orjson.JSONDecodeError):   # KServe's parser refuses the body
        orjson.loads(body)
    with pytest.raises(DecodeError) as err:
        decode_request("v2", body, {})
    assert err.value.kind == "malformed_json" and "'x'" in str(err.value)
    # a surrogate pair (an emoji) is UTF-8 text: read as its bytes
    pair = b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["\\ud83d\\ude00"]}]}'
    assert oip_v2.parse_message(pair, {}, "inputs")[0][1].tolist() == ["\U0001F600".encode()]
