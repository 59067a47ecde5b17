"""`sentinel export --fp16`: half-precision ONNX and TorchScript exports of digits:v3 with float32
inputs and outputs, recorded in model.yaml with their sha256, that `sentinel verify` checks under
its fp16 policy (atol/rtol 1e-2, top-1 ≥ 99.5%) and onnxruntime's CPU provider runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from servers import REPO

from sentinel.errors import InfrastructureError, UsageError
from sentinel.registry import Registry, sha256_file

FP16_ATOL = FP16_RTOL = 1e-2   # sentinel.verify.policy's fp16 row, restated: the test pins it
BUNDLED_FP32 = REPO / "models" / "digits" / "v3" / "model.onnx"


def sentinel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sentinel", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def golden():
    from sentinel.golden import golden_for

    return golden_for(Registry(REPO / "models").resolve("digits:v3"), REPO / "golden_sets")


@pytest.fixture(scope="module")
def fp16_cli(reg_dir) -> subprocess.CompletedProcess:
    """`sentinel export --model digits:v3 --fp16 --dynamic-batch` into a copy of the registry."""
    return sentinel("export", "--model", "digits:v3", "--fp16", "--dynamic-batch", "--registry", str(reg_dir))


def exports_of(reg_dir: Path) -> dict[str, dict]:
    doc = yaml.safe_load((reg_dir / "digits" / "v3" / "model.yaml").read_text())
    return {e["file"]: e for e in doc["exports"]}


def ort_session(path: Path):  # noqa: ANN201 - an onnxruntime InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def within_fp16_policy(got: np.ndarray, ref: np.ndarray) -> bool:
    ref = ref.astype(np.float64)
    return bool(np.all(np.abs(got.astype(np.float64) - ref) <= FP16_ATOL + FP16_RTOL * np.abs(ref)))


@pytest.mark.slow
def test_cli_fp16_onnx_is_recorded_and_runs_on_onnxruntime_cpu_with_float32_io(fp16_cli, reg_dir, golden):
    assert fp16_cli.returncode == 0, fp16_cli.stderr + fp16_cli.stdout
    path = reg_dir / "digits" / "v3" / "model.dyn.fp16.onnx"
    assert fp16_cli.stdout.startswith(f"wrote {path} (onnx fp16, float32 input and output, dynamic batch, sha256 ")
    assert f"recorded in {reg_dir / 'digits' / 'v3' / 'model.yaml'}" in fp16_cli.stdout
    rec = exports_of(reg_dir)["model.dyn.fp16.onnx"]
    assert rec == {"format": "onnx", "file": "model.dyn.fp16.onnx", "sha256": sha256_file(path),
                   "precision": "fp16", "dynamic_batch": True}
    assert Registry(reg_dir).resolve("digits:v3").manifest.exports[-1].precision == "fp16"   # the registry loads it

    m = onnx.load(str(path))
    weights = [t for t in m.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)   # no float32 weight left
    assert path.stat().st_size < 0.7 * BUNDLED_FP32.stat().st_size

    sess = ort_session(path)
    [inp], [out] = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, out.name, out.type) == ("input", "tensor(float)", "logits", "tensor(float)")
    assert inp.shape[0] == "batch" or not isinstance(inp.shape[0], int)    # dynamic batch
    x = np.asarray(golden.inputs, np.float32)
    logits = sess.run(None, {"input": x})[0]                               # all 300 samples in one batch
    assert logits.dtype == np.float32 and logits.shape == golden.logits.shape
    assert (logits.argmax(1) == golden.logits.argmax(1)).all()
    assert within_fp16_policy(logits, golden.logits)
    fp32 = ort_session(BUNDLED_FP32).run(None, {"input": x})[0]
    assert np.abs(logits - fp32).max() > 1e-3   # computed from rounded weights: not the fp32 graph relabelled


@pytest.mark.slow
def test_cli_verify_judges_the_fp16_export_by_the_fp16_policy(fp16_cli, reg_dir):
    assert fp16_cli.returncode == 0, fp16_cli.stderr
    path = reg_dir / "digits" / "v3" / "model.dyn.fp16.onnx"
    r = sentinel("verify", str(path), "--model", "digits:v3", "--registry", str(reg_dir),
                 "--golden-root", str(REPO / "golden_sets"), "--json", "-")
    assert r.returncode == 0, r.stderr + r.stdout
    d = json.loads(r.stdout)
    assert d["passed"] and d["failures"] == []
    assert d["precision"] == "fp16" and d["detected_precision"] == "fp16"   # model.yaml's record and the graph agree
    assert (d["policy"]["atol"], d["policy"]["rtol"], d["policy"]["min_top1"]) == (FP16_ATOL, FP16_RTOL, 0.995)
    assert d["samples"] == 300 and d["top1_agreement"] == 1.0 and d["fed"] == "network"
    assert 1e-3 < d["outputs"]["logits"]["min_atol"] < FP16_ATOL
    # held to fp32's tolerance the same file fails: the fp16 policy is what lets it pass
    strict = sentinel("verify", str(path), "--model", "digits:v3", "--registry", str(reg_dir), "--precision", "fp32",
                      "--localize", "never", "--golden-root", str(REPO / "golden_sets"), "--quiet")
    assert strict.returncode == 1, strict.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "message"), [
    (["--int8"], "--fp16 and --int8 are two precisions for one export; choose one"),
    (["--format", "torchscript", "--int8"], "--fp16 and --int8 are two precisions for one export; choose one"),
    (["--int8-format", "qoperator"], "apply only with --int8"),
    (["--calibration", "golden_sets/digits/v3"], "apply only with --int8"),
])
def test_fp16_with_int8_or_its_options_is_refused_before_anything_is_written(tmp_path, flags, message):
    reg = tmp_path / "reg"
    shutil.copytree(REPO / "models" / "digits" / "v3", reg / "digits" / "v3")
    before = (reg / "digits" / "v3" / "model.yaml").read_bytes()
    r = sentinel("export", "--model", "digits:v3", "--fp16", *flags, "--registry", str(reg))
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)
    assert (reg / "digits" / "v3" / "model.yaml").read_bytes() == before
    assert sorted(p.name for p in (reg / "digits" / "v3").iterdir()) == sorted(
        p.name for p in (REPO / "models" / "digits" / "v3").iterdir())


@pytest.mark.slow
def test_cli_fp16_torchscript_takes_and_returns_float32_and_is_judged_fp16(reg_dir, golden):
    r = sentinel("export", "--model", "digits:v3", "--fp16", "--format", "torchscript", "--registry", str(reg_dir))
    assert r.returncode == 0, r.stderr + r.stdout
    path = reg_dir / "digits" / "v3" / "model.fp16.pt"
    assert r.stdout.startswith(f"wrote {path} (torchscript fp16, float32 input and output")
    rec = exports_of(reg_dir)["model.fp16.pt"]
    assert (rec["format"], rec["precision"], rec["sha256"]) == ("torchscript", "fp16", sha256_file(path))

    import torch

    from sentinel.verify.runtime import TorchScriptExport

    ts = TorchScriptExport(path)
    assert ts.precision == "fp16"                       # what verify reads from its weights
    assert {p.dtype for p in ts.module.parameters()} == {torch.float16}
    x = np.asarray(golden.inputs[:48], np.float32)      # torch's half kernels are slow on CPU: a share of the set
    got = ts.run(x)["logits"]
    assert ts.input_dtype is None                       # took the float32 batch as it was
    assert got.dtype == np.float32
    ref = np.asarray(golden.logits[:48])
    assert (got.argmax(1) == ref.argmax(1)).all() and within_fp16_policy(got, ref)
    assert np.abs(got - ref).max() > 1e-3


@pytest.mark.slow
def test_conversion_keeps_module_scopes_so_a_perturbed_fp16_export_is_localized(tmp_path, golden):
    """The converter works on the bundled fp32 dynamo export (no torch export needed): a perturbed conv
    in denseblock2 makes verify fail and name that block, so the module scopes survived the conversion."""
    from sentinel.export.fp16 import convert_fp16
    from sentinel.verify.localize import node_scope
    from sentinel.verify.verifier import verify_export

    entry = Registry(REPO / "models").resolve("digits:v3")
    a, b = convert_fp16(BUNDLED_FP32, tmp_path / "a.onnx"), convert_fp16(BUNDLED_FP32, tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()             # same fp32 graph, same fp16 bytes

    m = onnx.load(str(BUNDLED_FP32))
    inits = {i.name: i for i in m.graph.initializer}
    conv = next(n for n in m.graph.node if n.op_type == "Conv"
                and (node_scope(n) or "").startswith("features.denseblock2.denselayer3"))
    w = numpy_helper.to_array(inits[conv.input[1]]).copy()
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w * 1.5, conv.input[1]))
    onnx.save(m, str(tmp_path / "bad32.onnx"))
    bad = convert_fp16(tmp_path / "bad32.onnx", tmp_path / "bad16.onnx")
    rep = verify_export(bad, entry, golden)
    assert rep.doc["precision"] == "fp16" and not rep.passed
    assert rep.doc["first_divergence"] is not None
    assert (node_scope(conv) or "").startswith(rep.doc["first_divergence"]), rep.doc["first_divergence"]


@pytest.mark.unit
def test_check_format_and_default_paths_for_fp16(tmp_path):
    from sentinel.export.exporters import check_format, default_path

    check_format("onnx", False, True)
    check_format("torchscript", False, True)
    with pytest.raises(UsageError, match="--fp16 and --int8"):
        check_format("onnx", True, True)
    entry = Registry(REPO / "models").resolve("digits:v3")
    d = entry.directory
    assert default_path(entry, "onnx", False, False, True) == d / "model.fp16.onnx"
    assert default_path(entry, "onnx", False, True, True) == d / "model.dyn.fp16.onnx"
    assert default_path(entry, "torchscript", False, False, True) == d / "model.fp16.pt"
    assert default_path(entry, "onnx", True, True) == d / "model.dyn.int8.onnx"   # unchanged


def _tiny(nodes, inits, out_type=TensorProto.FLOAT) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", out_type, [1, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.unit
def test_converter_casts_at_the_interface_and_refuses_what_it_cannot_convert(tmp_path):
    from sentinel.export.fp16 import convert_fp16

    w = numpy_helper.from_array(np.array([[0.5, -2.0, 3.0, 1e-3]], np.float32), "w")
    ok = _tiny([helper.make_node("Mul", ["x", "w"], ["m"]),
                helper.make_node("Constant", [], ["c"], value_float=0.25),
                helper.make_node("Add", ["m", "c"], ["y"])], [w])
    onnx.save(ok, str(tmp_path / "ok32.onnx"))
    half = onnx.load(str(convert_fp16(tmp_path / "ok32.onnx", tmp_path / "ok16.onnx")))
    assert [n.op_type for n in half.graph.node] == ["Cast", "Mul", "Constant", "Add", "Cast"]
    assert half.graph.initializer[0].data_type == TensorProto.FLOAT16
    sess = ort_session(tmp_path / "ok16.onnx")
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    y = sess.run(None, {"x": x})[0]
    assert y.dtype == np.float32 and np.allclose(y, x * numpy_helper.to_array(w) + 0.25, rtol=1e-3)

    big = numpy_helper.from_array(np.array([[1e5, 1, 1, 1]], np.float32), "w")
    onnx.save(_tiny([helper.make_node("Mul", ["x", "w"], ["y"])], [big]), str(tmp_path / "big.onnx"))
    with pytest.raises(InfrastructureError, match="beyond float16's range"):
        convert_fp16(tmp_path / "big.onnx", tmp_path / "big16.onnx")

    odd = _tiny([helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Round", ["m"], ["y"])], [w])
    onnx.save(odd, str(tmp_path / "odd.onnx"))
    with pytest.raises(InfrastructureError, match="no fp16 rule for operator.*Round"):
        convert_fp16(tmp_path / "odd.onnx", tmp_path / "odd16.onnx")
    assert not (tmp_path / "big16.onnx").exists() and not (tmp_path / "odd16.onnx").exists()
