"""Malformed weight files raise WeightsError naming the file; `sentinel serve` says so in one line."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loader_seeds import (
    onnx_file,
    pt_legacy,
    pt_zip,
    safetensors_file,
    safetensors_with_header,
    state_dict,
)

from sentinel.errors import WeightsError
from sentinel.reference.weights import load_weights, read_state_dict

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def refused(p: Path, *words: str) -> str:
    with pytest.raises(WeightsError) as info:
        read_state_dict(p)
    msg = str(info.value)
    assert msg.startswith(str(p)), msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.unit
def test_seeds_load(tmp_path):
    for name, data in [("a.pt", pt_zip()), ("b.pt", pt_legacy()), ("c.safetensors", safetensors_file())]:
        got = read_state_dict(write(tmp_path, name, data))
        assert set(got) == set(state_dict()) and torch.equal(got["classifier.bias"], state_dict()["classifier.bias"])


@pytest.mark.unit
@pytest.mark.parametrize("seed", ["zip", "legacy"])
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint(tmp_path, seed, cut):
    data = pt_zip() if seed == "zip" else pt_legacy()
    refused(write(tmp_path, "w.pt", data[:int(len(data) * cut)]), "not a readable torch checkpoint")


@pytest.mark.unit
def test_corrupt_zip_and_legacy_records(tmp_path):
    data = bytearray(pt_zip())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64      # inside the records or the central directory
    with pytest.raises(WeightsError):
        read_state_dict(write(tmp_path, "z.pt", bytes(data)))
    legacy = bytearray(pt_legacy())
    for pos in (20, 60, 300, 600):   # these offsets raised IndexError, struct.error, KeyError before
        bad = bytearray(legacy)
        bad[pos] ^= 0xFF
        try:
            read_state_dict(write(tmp_path, f"l{pos}.pt", bytes(bad)))
        except WeightsError as exc:
            assert str(tmp_path) in str(exc)
    refused(write(tmp_path, "text.pt", b"not a checkpoint at all"), "corrupt")
    refused(write(tmp_path, "empty.pt", b""))


@pytest.mark.unit
def test_non_tensor_objects_and_unsafe_globals(tmp_path):
    cases = [({"a": torch.zeros(2), "b": [1, 2]}, "is a list, not a tensor"),
             ({"a": 3}, "is a int, not a tensor"),
             ([torch.zeros(1)], "found a list"),
             ({1: torch.zeros(1)}, "strings"),
             ({"a": torch.zeros(2, dtype=torch.complex64)}, "complex64"),
             ({"a": torch.zeros(2, dtype=torch.bool)}, "torch.bool"),
             ({"a": torch.zeros(3).to_sparse()}, "not a dense tensor"),
             ({"a": torch.tensor([1.0, float("nan")])}, "NaN"),
             ({"state_dict": {"a": "text"}}, "not a tensor")]
    for i, (obj, words) in enumerate(cases):
        buf = io.BytesIO()
        torch.save(obj, buf)
        refused(write(tmp_path, f"c{i}.pt", buf.getvalue()), words)

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    buf = io.BytesIO()
    torch.save({"a": Payload()}, buf)
    refused(write(tmp_path, "evil.pt", buf.getvalue()), "refused", "unrestricted unpickling", "getcwd")


@pytest.mark.unit
def test_safetensors_header_length_dtype_offsets(tmp_path):
    good = safetensors_file()
    cases = {
        "len_huge": b"\xff" * 8 + good[8:],
        "len_past_end": (len(good)).to_bytes(8, "little") + good[8:],
        "len_short": (5).to_bytes(8, "little") + good[8:],
        "truncated": good[:len(good) - 7],
        "bad_dtype": safetensors_with_header({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "bad_offsets": safetensors_with_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}},
                                               b"\0" * 16),
        "shape_mismatch": safetensors_with_header({"a": {"dtype": "F32", "shape": [10 ** 12, 10 ** 12],
                                                         "data_offsets": [0, 8]}}, b"\0" * 8),
        "not_json": (4).to_bytes(8, "little") + b"{{{{",
        "complex": safetensors_with_header({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    }
    for name, data in cases.items():
        refused(write(tmp_path, f"{name}.safetensors", data))


@pytest.mark.unit
def test_not_a_regular_file(tmp_path):
    refused(tmp_path, "not a regular file")
    fifo = tmp_path / "w.pt"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")   # would block torch.load forever
    refused(tmp_path / "missing.pt", "not found")


@pytest.mark.unit
def test_integer_weights_where_floats_are_expected(tmp_path):
    model = torch.nn.Linear(2, 2)
    p = tmp_path / "w.pt"
    torch.save({"weight": torch.ones(2, 2, dtype=torch.int32), "bias": torch.zeros(2)}, p)
    with pytest.raises(WeightsError, match="expects floating point"):
        load_weights(model, p)


@pytest.mark.unit
def test_malformed_onnx(tmp_path):
    from sentinel.verify.runtime import OnnxExport

    good = onnx_file()
    OnnxExport(write(tmp_path, "ok.onnx", good))
    for name, data in {"truncated": good[:len(good) // 2], "garbage": b"\x08\x07garbage" * 10, "empty": b"",
                       "flipped": good[:40] + bytes([good[40] ^ 0xFF]) + good[41:],
        # a name byte that is not UTF-8 (found by the 60 s fuzz: UnicodeDecodeError from inp.shape)
        "non_utf8_name": good.replace(b"\x12\x01n", b"\x12\x01\x81", 1)}.items():
        p = write(tmp_path, f"{name}.onnx", data)
        try:
            OnnxExport(p)
        except WeightsError as exc:
            assert str(p) in str(exc)


@pytest.mark.unit
@pytest.mark.parametrize("elem, says", [(0, "has no element type"), (7, "is INT64"), (3, "is INT8")])
def test_onnx_input_type_verify_cannot_feed(tmp_path, elem, says):
    """An input typed UNDEFINED (the checker lets it through; found by the CI fuzz) or an integer
    type is a fault of the file, a WeightsError naming file and input, like every other."""
    import onnx

    from sentinel.verify.runtime import OnnxExport

    model = onnx.load_from_string(onnx_file())
    model.graph.input[0].type.tensor_type.elem_type = elem
    p = write(tmp_path, "typed.onnx", model.SerializeToString())
    with pytest.raises(WeightsError) as got:
        OnnxExport(p)
    msg = str(got.value)
    assert str(p) in msg and "input 'x' " + says in msg and "float32, float16 or float64" in msg, msg


@pytest.mark.slow
def test_serve_with_corrupt_weights_exits_with_one_line(tmp_path):
    """The digest matches (the file was corrupted before it was recorded): the loader must still refuse.

    A legacy-format checkpoint with one flipped byte: torch's unpickler raised KeyError here,
    and `serve` used to end in a traceback.
    """
    import re

    from safetensors.torch import load_file

    from sentinel.registry import sha256_file

    reg = tmp_path / "models"
    shutil.copytree(REPO / "models" / "digits" / "v3", reg / "digits" / "v3")
    folder = reg / "digits" / "v3"
    buf = io.BytesIO()
    torch.save(load_file(folder / "model.safetensors"), buf, _use_new_zipfile_serialization=False)
    data = bytearray(buf.getvalue())
    data[455] ^= 0xFF
    weights = folder / "model.pt"
    weights.write_bytes(bytes(data))
    text = (folder / "model.yaml").read_text().replace("file: model.safetensors", "file: model.pt")
    text = re.sub(r"sha256: [0-9a-f]{64}", f"sha256: {sha256_file(weights)}", text, count=1)
    (folder / "model.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "sentinel", "serve", "--registry", str(reg), "--model", "digits:v3",
                        "--port", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: {weights}: ") and "torch checkpoint" in lines[0], lines[0]
