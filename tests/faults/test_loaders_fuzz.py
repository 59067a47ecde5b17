"""Hypothesis fuzzing of the weight loaders: any bytes either load or raise WeightsError naming the file.

Bounded: SENTINEL_FUZZ_EXAMPLES examples per loader (default 60), the same ones each run unless
HYPOTHESIS_PROFILE=explore (tests/conftest.py). For a timed run of each loader, see
`python tests/faults/fuzz_loaders.py --seconds 60`.
"""

from __future__ import annotations

import io
import os
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loader_seeds import (
    expect_loaded_or_weights_error,
    onnx_file,
    pt_legacy,
    pt_zip,
    safetensors_file,
    safetensors_with_header,
)

from sentinel.reference.weights import read_state_dict

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("SENTINEL_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEEDS = {"zip.pt": pt_zip, "legacy.pt": pt_legacy, "w.safetensors": safetensors_file, "m.onnx": onnx_file}


@cache
def seed(name: str) -> bytes:
    return SEEDS[name]()


@st.composite
def mutated(draw, name: str) -> bytes:
    """The seed with a few edits whose positions and bytes hypothesis chooses (and shrinks)."""
    b = bytearray(seed(name))
    for _ in range(draw(st.integers(1, 4))):
        if not b:
            break
        op = draw(st.sampled_from(["truncate", "flip", "word", "delete", "insert"]))
        p = draw(st.integers(0, len(b) - 1))
        if op == "truncate":
            del b[p:]
        elif op == "flip":
            b[p] ^= 1 << draw(st.integers(0, 7))
        elif op == "word":
            b[p:p + 4] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff" * 4, b"\x00" * 4]))
        elif op == "delete":
            del b[p:p + draw(st.integers(1, 64))]
        else:
            b[p:p] = draw(st.binary(min_size=1, max_size=16))
    return bytes(b)


_DIR = Path(tempfile.mkdtemp(prefix="sentinel-fuzz-"))


def _write(name: str, data: bytes) -> Path:
    p = _DIR / name
    p.write_bytes(data)
    return p


def _onnx(path: Path) -> object:
    from sentinel.verify.runtime import OnnxExport

    return OnnxExport(path, threads=1)


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pt", "w.safetensors"])
def test_mutated_checkpoints(name):
    @FUZZ
    @given(mutated(name))
    def run(data):
        expect_loaded_or_weights_error(read_state_dict, _write(name, data))
    run()


def test_mutated_onnx():
    @FUZZ
    @given(mutated("m.onnx"))
    def run(data):
        expect_loaded_or_weights_error(_onnx, _write("m.onnx", data))
    run()


DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "C64", "F8_E4M3", "F33", "", "int"]
dims = st.one_of(st.integers(0, 8), st.integers(-2, 2 ** 63), st.just(10 ** 30))


@FUZZ
@given(st.dictionaries(st.text(max_size=8), st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES), "shape": st.lists(dims, max_size=4),
    "data_offsets": st.lists(st.one_of(st.integers(0, 64), st.integers(-1, 2 ** 64)), min_size=0, max_size=3)}),
    max_size=3), st.integers(0, 64))
def test_safetensors_headers(header, data_len):
    expect_loaded_or_weights_error(read_state_dict, _write("h.safetensors", safetensors_with_header(header, b"\1" * data_len)))


leaves = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=5),
                   st.builds(torch.zeros, st.integers(0, 3)),
                   st.builds(lambda n: torch.arange(n, dtype=torch.int64), st.integers(0, 3)))
objects = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), inner, max_size=3)),
    max_leaves=8)


@FUZZ
@given(objects, st.booleans())
def test_any_weights_only_object(obj, legacy):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    expect_loaded_or_weights_error(read_state_dict, _write("o.pt", buf.getvalue()))
