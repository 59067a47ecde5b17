"""`sentinel verify` on files nobody had tried: external data in sparse initializers and local
functions, TorchScript archives whose records inflate past any bound, a zipped ONNX model, an
empty file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from servers import REPO

from sentinel.errors import RegistryError, WeightsError
from sentinel.verify import runtime
from sentinel.verify.runtime import OnnxExport, open_export

VALUES = np.arange(4, dtype=np.float32)


def _external_tensor(name: str, location: str) -> onnx.TensorProto:
    """A float tensor [4] whose 16 bytes live in the external file `location`."""
    t = helper.make_tensor(name, TensorProto.FLOAT, [4], vals=[0.0] * 4)
    del t.float_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _io():
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])


def _sparse_model(directory: Path, location: str) -> Path:
    """logits = x + w, w a sparse initializer whose values are external data at `location`."""
    sp = helper.make_sparse_tensor(_external_tensor("w", location),
                                   numpy_helper.from_array(np.arange(4, dtype=np.int64), "w_indices"), [4])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["logits"])], "g", *_io(), sparse_initializer=[sp])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _function_model(directory: Path, location: str) -> Path:
    """logits = AddC(x), a local function adding a Constant whose value is external data at `location`."""
    fn = helper.make_function("local", "AddC", ["X"], ["Y"],
                              [helper.make_node("Constant", [], ["C"], value=_external_tensor("c", location)),
                               helper.make_node("Add", ["X", "C"], ["Y"])],
                              opset_imports=[helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("AddC", ["x"], ["logits"], domain="local")], "g", *_io())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "m.onnx"
    onnx.save(helper.make_model(g, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("local", 1)]), str(path))
    return path


MAKERS = {"sparse initializer": _sparse_model, "function constant": _function_model}


@pytest.mark.unit
@pytest.mark.parametrize("kind", MAKERS)
def test_external_data_outside_the_directory_is_refused_wherever_the_tensor_is(tmp_path: Path, monkeypatch, kind):
    # Only initializers and node attributes were looked at: a sparse initializer's (or a function
    # Constant's) location was never confined, and onnx's checker and onnxruntime, handed bytes,
    # resolved it against the working directory: `w.bin` there was read (sparse) for a model in
    # another directory.
    secret = tmp_path / "secret.bin"
    secret.write_bytes(VALUES.tobytes())
    for location in ("../secret.bin", str(secret)):
        with pytest.raises(RegistryError, match=r"tensor '[wc]' external data location: .* outside"):
            OnnxExport(MAKERS[kind](tmp_path / "up", location))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "w.bin").write_bytes(VALUES.tobytes())
    monkeypatch.chdir(cwd)
    with pytest.raises(WeightsError, match=r"tensor '[wc]': external data file .*w\.bin is missing"):
        OnnxExport(MAKERS[kind](tmp_path / "model", "w.bin"))


@pytest.mark.unit
@pytest.mark.parametrize("kind", MAKERS)
def test_external_data_of_sparse_and_function_tensors_is_read_from_the_model_directory(tmp_path: Path,
                                                                                       monkeypatch, kind):
    # Before, such a model in its own directory failed unless the process ran from that directory
    # ("should be stored in w.bin, but it is not regular file"; "model_path must not be empty").
    path = MAKERS[kind](tmp_path / "model", "w.bin")
    (path.parent / "w.bin").write_bytes(VALUES.tobytes())
    monkeypatch.chdir(tmp_path)
    e = OnnxExport(path, spin=False)
    np.testing.assert_array_equal(e.run(np.ones((1, 4), np.float32))["logits"], [VALUES + 1])


def _torchscript(path: Path, compress: int = zipfile.ZIP_STORED) -> Path:
    import torch

    torch.jit.script(torch.nn.Linear(4, 2)).save(str(path))
    if compress != zipfile.ZIP_STORED:
        src = zipfile.ZipFile(path)
        records = [(i.filename, src.read(i.filename)) for i in src.infolist()]
        src.close()
        with zipfile.ZipFile(path, "w", compress) as z:
            for name, data in records:
                z.writestr(name, data)
    return path


@pytest.mark.unit
def test_torchscript_archive_whose_records_inflate_past_the_bound_is_refused_before_loading(tmp_path: Path,
                                                                                              monkeypatch):
    # torch.jit.load allocates each record's declared size and inflates into it: a 1.6 MB file
    # whose one deflated record declared 1 GiB took 1.4 GB of memory, and nothing bounded it.
    path = _torchscript(tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    assert open_export(path).format == "torchscript"   # a re-zipped archive is still read
    monkeypatch.setattr(runtime, "MAX_INFLATED_BYTES", 64)
    loads = []
    import torch

    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(WeightsError, match=r"deflated\.pt: compressed zip records expand to more than .* "
                                           r"refusing to inflate it"):
        open_export(path)
    assert loads == []


@pytest.mark.unit
def test_torchscript_archive_declaring_more_than_the_total_bound_is_refused(tmp_path: Path, monkeypatch):
    path = _torchscript(tmp_path / "m.pt")
    monkeypatch.setattr(runtime, "MAX_ARCHIVE_BYTES", 100)
    with pytest.raises(WeightsError, match=r"m\.pt: zip records declare more than"):
        open_export(path)


@pytest.mark.unit
def test_stored_record_declaring_bytes_past_the_end_of_the_file_is_refused(tmp_path: Path):
    path = _torchscript(tmp_path / "m.pt")
    raw = bytearray(path.read_bytes())
    cd = raw.index(b"PK\x01\x02")          # the first central directory entry: a stored record
    huge = (1 << 31).to_bytes(4, "little")
    raw[cd + 20:cd + 24] = huge            # compressed size
    raw[cd + 24:cd + 28] = huge            # uncompressed size
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match=r"m\.pt: zip record .* declares 2147483648 bytes .* past the end"):
        open_export(path)


@pytest.mark.unit
def test_a_zipped_onnx_model_and_an_empty_file_are_named(tmp_path: Path):
    # before: "not a loadable TorchScript file (... file in archive is not in a subdirectory: m.onnx)"
    # and "not a valid ONNX model (ValidationError: The model does not have an ir_version set properly.)"
    z = tmp_path / "model.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(REPO / "models/digits/v3/model.onnx", "m.onnx")
    with pytest.raises(WeightsError, match=r"model\.zip: is a zip archive holding 'm\.onnx', not a TorchScript"):
        open_export(z)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty\.onnx: is empty \(0 bytes\)"):
        open_export(empty)


@pytest.mark.slow
def test_cli_exits_2_and_never_reads_the_sparse_external_data_of_the_working_directory(tmp_path: Path):
    # before: the working directory's w.bin was loaded as the model's weights (then the model was
    # refused for its input shape, so the exit code alone did not show it)
    path = _sparse_model(tmp_path / "model", "w.bin")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "w.bin").write_bytes(VALUES.tobytes())
    r = subprocess.run([sys.executable, "-m", "sentinel", "verify", str(path), "--model", "digits:v3",
                        "--registry", str(REPO / "models"), "--golden", str(REPO / "golden_sets/digits/v3")],
                       cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr + r.stdout
    assert f"tensor 'w': external data file {path.parent / 'w.bin'} is missing" in r.stderr, r.stderr


@pytest.mark.unit
def test_a_graph_with_two_inputs_is_refused_naming_both(tmp_path: Path):
    # before: the first input was taken for the images ("takes inputs [1] per sample, but digits:v3
    # takes [1, 32, 32]; is this an export of another model?") and the image input went unnamed
    g = helper.make_graph([helper.make_node("Mul", ["input", "temperature"], ["logits"])], "g",
                          [helper.make_tensor_value_info("temperature", TensorProto.FLOAT, ["n", 1, 1, 1]),
                           helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, 32, 32])])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(WeightsError, match=r"two\.onnx: the graph takes 2 inputs \('temperature' \['n', 1, 1, 1\], "
                                           r"'input' \['n', 1, 32, 32\]\); verify feeds one"):
        open_export(path)
