"""Hypothesis strategies that produce hostile payloads for the decoders (tests and scripts/fuzz_decoders.py).

Random bytes, mutations of valid bodies (flipped, cut, spliced), and JSON documents built from
the protocols' own vocabulary, so the fuzzer reaches past the first parse. Imported only by
tests and the fuzz script (hypothesis is a test dependency).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import strategies as st

from sentinel.protocols import oip_v2
from sentinel.protocols.tensors import DATATYPES

KEYS = ["inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "binary_data_size",
        "instances", "predictions", "b64", "probabilities", "logits", "scores", "input", "id"]
_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                     "3a7e9b550000000a49444154789c6360000000020001e221bc330000000049454e44ae426082")

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(DATATYPES),
                    st.sampled_from(KEYS), st.text(max_size=8))
json_docs = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)),
    max_leaves=40)


def _tensor_entry() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "name": st.text(max_size=4),
        "shape": st.lists(st.one_of(st.integers(-2, 6), st.sampled_from([0, 2**31, 2**62, 2**64 + 1])), max_size=5),
        "datatype": st.sampled_from([*DATATYPES, "FP99", 7]),
    }, optional={
        "data": json_docs,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-4, 64), st.booleans(),
                                                                           st.text(max_size=3))}),
    })


v2_docs = st.fixed_dictionaries({}, optional={"inputs": st.lists(_tensor_entry(), max_size=3),
                                              "outputs": st.lists(_tensor_entry(), max_size=3),
                                              "parameters": json_docs})


def _valid_bodies() -> list[bytes]:
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    out = [oip_v2.encode([("x", x)], "inputs", binary=b)[0] for b in (False, True)]
    out += [oip_v2.encode([("p", np.full((1, 4), 0.25, np.float32))], "outputs", binary=b)[0] for b in (False, True)]
    out += [json.dumps({"instances": x.tolist()}).encode(), json.dumps({"predictions": [[0.1, 0.9]]}).encode(),
            json.dumps({"instances": [{"b64": "iVBORw0KGgo="}]}).encode(), _PNG, x.tobytes()]
    return out


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid body, then a few flips, cuts, insertions and splices."""
    body = bytearray(draw(st.sampled_from(_valid_bodies())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        if not body:
            break
        i = draw(st.integers(0, len(body) - 1))
        if op == "flip":
            body[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del body[i:i + draw(st.integers(1, 16))]
        elif op == "insert":
            body[i:i] = draw(st.sampled_from([b"[", b"{", b'"', b"\\", b"]]]", b"[" * 200, b"9" * 30, b"-", b"\x00"]))
        else:
            body[i:i] = body[i:i + draw(st.integers(1, 32))]
    return bytes(body)


bodies = st.one_of(st.binary(max_size=256), mutated(),
                   json_docs.map(lambda d: json.dumps(d).encode()),
                   v2_docs.map(lambda d: json.dumps(d).encode()),
                   st.tuples(v2_docs.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)).map(
                       lambda t: t[0] + t[1]))
headers = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "application/octet-stream", "image/png", "text/plain"]),
    "inference-header-content-length": st.one_of(st.integers(-5, 400).map(str), st.text(max_size=4)),
})
