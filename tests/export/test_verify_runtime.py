"""OnnxExport hands the file's own bytes to the checker and onnxruntime, and instruments by
appending a serialized fragment: the graphs it runs must be the ones a full re-serialization
would give, with tensors in the file or in external data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from servers import REPO

from sentinel.verify.runtime import CAST_SUFFIX, OnnxExport


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/features/block/MatMul"),
             helper.make_node("Relu", ["h"], ["r"], name="/features/block/Relu"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="/classifier/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _reference(m: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    w1, w2 = (numpy_helper.to_array(i) for i in m.graph.initializer)
    r = np.maximum(x @ w1, 0)
    return {"r": r, "logits": r @ w2}


@pytest.mark.unit
@pytest.mark.parametrize("external", [False, True])
def test_plain_and_instrumented_runs_from_file_bytes_or_external_data(tmp_path: Path, external: bool):
    m = _model()
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    want = _reference(m, x)   # before saving: saving as external data rewrites m's tensors
    path = tmp_path / "m.onnx"
    if external:
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="m.weights", size_threshold=0)
        assert (tmp_path / "m.weights").stat().st_size >= (8 * 16 + 16 * 4) * 4
    else:
        onnx.save_model(m, str(path))

    e = OnnxExport(path, spin=False)
    assert (e._raw is None) == external          # external data: the loaded model is serialized instead
    np.testing.assert_allclose(e.run(x)["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    names = e.instrument(["r"])
    assert names == {"r": "r" + CAST_SUFFIX} and e.sessions_built == 2
    got = e.run(x, names=["logits", names["r"]])
    np.testing.assert_allclose(got[names["r"]], want["r"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    assert [o.name for o in e.model.graph.output] == ["logits"]   # the parsed graph is left as it was


@pytest.mark.unit
def test_missing_external_data_file_is_a_weights_error(tmp_path: Path):
    from sentinel.errors import WeightsError

    path = tmp_path / "m.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=True, location="m.weights", size_threshold=0)
    (tmp_path / "m.weights").unlink()
    with pytest.raises(WeightsError, match="m.onnx"):
        OnnxExport(path)


@pytest.mark.slow
def test_reference_torch_import_restores_the_environment_and_freezes_its_objects():
    code = ("import gc, json, os, sys\n"
            "from sentinel.verify.verifier import _import_torch\n"
            "assert 'torch' not in sys.modules\n"
            "_import_torch()\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'policy': os.environ.get('OMP_WAIT_POLICY'),\n"
            "                  'gc': gc.isenabled(), 'frozen': gc.get_freeze_count()}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["torch"] and got["policy"] is None and got["gc"]   # children see the user's environment
    assert got["frozen"] > 100_000                                  # torch's objects skip later collections


@pytest.mark.unit
def test_quantized_intermediate_values_are_dequantized_with_their_own_scale(tmp_path: Path):
    # A QOperator int8 graph carries activations as uint8 between ops: exposing them through
    # a Cast compared raw integers (0..255) with the reference's floats, so every quantized
    # checkpoint "diverged" by orders of magnitude. MaxPool keeps its input's scale.
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="/features/quant"),
             helper.make_node("MaxPool", ["q"], ["m"], kernel_shape=[2, 2], name="/features/pool/MaxPool"),
             helper.make_node("DequantizeLinear", ["m", "s", "zp"], ["y"], name="/classifier/dq")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 1, 1])], inits)
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    e = OnnxExport(path)
    names = e.instrument(["q", "m"])
    x = np.array([[[[0.5, -1.0], [2.0, 0.25]]]], np.float32)
    got = e.run(x, names=[names["q"], names["m"]])
    np.testing.assert_allclose(got[names["q"]], x, atol=0.025)
    np.testing.assert_allclose(got[names["m"]], [[[[2.0]]]], atol=0.025)


@pytest.mark.unit
@pytest.mark.parametrize("members,error", [
    (["ckpt/data.pkl", "ckpt/version", "ckpt/byteorder"], "is a torch.save checkpoint .* never unpickles"),
    (["model/archive_format", "model/models/model.json"], r"is a torch.export archive \(.pt2\)"),
])
def test_pytorch_archives_that_are_not_torchscript_are_named(tmp_path: Path, members, error):
    # both went to torch.jit.load and came back as "PytorchStreamReader failed locating file
    # constants.pkl ... your checkpoint file is corrupted"
    import zipfile

    from sentinel.errors import SentinelError
    from sentinel.verify.runtime import open_export

    path = tmp_path / "m.pt"
    with zipfile.ZipFile(path, "w") as z:
        for m in members:
            z.writestr(m, b"\x80\x02cposix\nsystem\nq\x00." if m.endswith(".pkl") else b"1")
    with pytest.raises(SentinelError, match=error):
        open_export(path)


def _external(tmp_path: Path, location: str, length: int | None = None) -> Path:
    """`_model()` saved with w1 in external data, then its location (and length) rewritten."""
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    path = d / "m.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=True, location="m.weights", size_threshold=0)
    m = onnx.load_model(str(path), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
        if e.key == "length" and length is not None:
            e.value = str(length)
    onnx.save_model(m, str(path))
    return path


@pytest.mark.unit
def test_external_data_outside_the_model_directory_is_refused_naming_the_path(tmp_path: Path):
    from sentinel.errors import RegistryError

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 512)   # w1: 8×16 float32
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "link.bin").symlink_to(secret)
    for location in ("../secret.bin", str(secret), "link.bin"):
        with pytest.raises(RegistryError, match=r"m\.onnx: tensor 'w1' external data location: .* outside"):
            OnnxExport(_external(tmp_path, location))


@pytest.mark.unit
def test_external_data_sizes_are_checked_before_anything_is_read(tmp_path: Path, monkeypatch):
    from sentinel.errors import WeightsError
    from sentinel.verify import runtime

    with pytest.raises(WeightsError, match=r"tensor 'w1' declares 4096 bytes at offset 0 of .*m\.weights"):
        OnnxExport(_external(tmp_path, "m.weights", length=4096))
    path = _external(tmp_path, "m.weights")
    monkeypatch.setattr(runtime, "MAX_EXTERNAL_DATA_BYTES", 600)   # w1 512 B + w2 256 B
    with pytest.raises(WeightsError, match=r"external data exceeds 0 GiB \(at tensor 'w2'\)"):
        OnnxExport(path)
    monkeypatch.setattr(runtime, "MAX_ONNX_FILE_BYTES", 100)
    with pytest.raises(WeightsError, match="at most 2 GiB"):
        OnnxExport(path)


@pytest.mark.unit
def test_an_export_that_fails_at_run_time_is_a_weights_error(tmp_path: Path):
    # a Reshape that cannot hold the input: onnxruntime's Fail escaped as a traceback (exit 1,
    # the code of "the export differs") instead of a clear exit-2 error
    from sentinel.errors import WeightsError

    shape = numpy_helper.from_array(np.array([-1, 7], np.int64), "shp")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shp"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 7])], [shape])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(WeightsError, match=r"bad\.onnx: onnxruntime failed running it on a batch of 3 \(Fail: "):
        OnnxExport(path).run(np.zeros((3, 8), np.float32))


@pytest.mark.unit
def test_a_fixed_batch_export_runs_any_number_of_rows(tmp_path: Path):
    # batch 3 fixed in the graph: 5 rows (300 golden samples with batch 7, or the 4
    # localization samples with batch 8) were refused ("cannot run a batch of 2")
    m = _model()
    for vi in (m.graph.input[0], m.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 3
    path = tmp_path / "fixed.onnx"
    onnx.save(m, str(path))
    e = OnnxExport(path)
    assert e.fixed_batch == 3
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    got = e.run(x)["logits"]
    assert got.shape == (5, 4)
    np.testing.assert_allclose(got, _reference(m, x)["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_the_protobuf_walk_finds_every_external_tensor_the_onnx_package_finds(tmp_path: Path):
    # check_onnx_file (the sidecar's shadow, no onnx package there) walks the protobuf itself:
    # initializers, Constant values, subgraph initializers, packed and negative dims
    from sentinel.verify.runtime import _all_tensors, external_tensors

    rng = np.random.default_rng(1)
    then_w = numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "then_w")
    then_g = helper.make_graph([helper.make_node("Add", ["then_w", "then_w"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])], [then_w])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
        rng.normal(size=(2, 2)).astype(np.float64).reshape(4), "else_c"))], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.DOUBLE, [4])])
    m = _model()
    m.graph.node.append(helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g))
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="m.weights", size_threshold=0)
    raw = path.read_bytes()
    mine = {t.name: (t.dims, t.data_type, t.info) for t in external_tensors(raw)}
    parsed = onnx.load_model(str(path), load_external_data=False)
    theirs = {t.name: (tuple(t.dims), t.data_type, {e.key: e.value for e in t.external_data})
              for t in _all_tensors(parsed.graph) if t.data_location == TensorProto.EXTERNAL}
    assert mine == theirs and {"w1", "w2", "then_w"} <= set(mine)
    assert list(external_tensors((REPO / "models/digits/v3/model.features.onnx").read_bytes())) == []
    with pytest.raises(ValueError, match="past the end"):
        list(external_tensors(raw[:len(raw) // 2]))


@pytest.mark.unit
def test_the_shadow_loads_onnx_through_the_same_checks_as_verify(tmp_path: Path):
    # The sidecar's shadow handed the path straight to onnxruntime: external data outside the
    # model's directory or of another size than declared was left to the installed version.
    from sentinel.analysis.shadow import ReferenceRunner
    from sentinel.errors import RegistryError, WeightsError

    runner = object.__new__(ReferenceRunner)   # only the loader: no entry, no golden check
    runner.threads = 1
    (tmp_path / "secret.bin").write_bytes(b"\0" * 512)
    with pytest.raises(RegistryError, match=r"m\.onnx: tensor 'w1' external data location: .* outside"):
        runner._ort_session(_external(tmp_path, "../secret.bin"))
    with pytest.raises(WeightsError, match=r"tensor 'w1' declares 4096 bytes"):
        runner._ort_session(_external(tmp_path, "m.weights", length=4096))
    sess = runner._ort_session(_external(tmp_path, "m.weights"))
    assert sess.get_outputs()[0].name == "logits"


@pytest.mark.unit
@pytest.mark.parametrize("head,error", [
    (b"\x80\x02cposix\nsystem\nq\x00.", "is a pickle .* never unpickles"),   # torch.save's legacy format
    (len(b'{"w":{}}').to_bytes(8, "little") + b'{"w":{}}', "is a safetensors weights file"),
])
def test_weights_files_that_are_not_exports_are_named_not_read_as_onnx(tmp_path: Path, head, error):
    # both read "not a valid ONNX model (DecodeError ...)", which named no cause
    from sentinel.errors import WeightsError
    from sentinel.verify.runtime import open_export

    path = tmp_path / "m.bin"
    path.write_bytes(head)
    with pytest.raises(WeightsError, match=error):
        open_export(path)
