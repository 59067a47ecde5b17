"""Verify by the graph's real types: fp16 weights with fp32 I/O is fp16, and localization works on it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from servers import REPO

from sentinel.registry import Registry
from sentinel.verify.localize import node_scope
from sentinel.verify.runtime import OnnxExport, graph_precision
from sentinel.verify.verifier import verify_export


@pytest.fixture(scope="module")
def entry(reg_dir):
    return Registry(reg_dir).resolve("digits:v3")


@pytest.fixture(scope="module")
def golden(entry):
    from sentinel.golden import golden_for

    return golden_for(entry, REPO / "golden_sets")


@pytest.fixture(scope="module")
def fp32_onnx(entry, reg_dir) -> Path:
    from sentinel.export.exporters import export_onnx

    return export_onnx(entry, reg_dir / "exports" / "model.onnx", dynamic_batch=True)


def to_fp16(src: Path, dst: Path) -> Path:
    from onnxconverter_common import float16

    m = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(m, str(dst))
    return dst


@pytest.fixture(scope="module")
def fp16_onnx(fp32_onnx, reg_dir) -> Path:
    return to_fp16(fp32_onnx, reg_dir / "exports" / "model.fp16.onnx")


@pytest.mark.slow
def test_fp16_weights_with_fp32_io_verify_as_fp16_and_pass_its_policy(fp16_onnx, entry, golden):
    m = onnx.load(str(fp16_onnx))
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT   # the I/O stayed fp32
    assert graph_precision(m) == "fp16"
    rep = verify_export(fp16_onnx, entry, golden, localize="never")
    assert rep.doc["precision"] == "fp16" and rep.doc["detected_precision"] == "fp16"
    assert rep.doc["policy"]["atol"] == 1e-2          # the fp16 policy, applied without a flag
    assert rep.passed, rep.doc["failures"]


@pytest.mark.slow
def test_fp16_localization_runs_in_one_session_and_measures_every_checkpoint(fp16_onnx, entry, golden):
    t0 = time.perf_counter()
    plain = verify_export(fp16_onnx, entry, golden, localize="never")
    t_plain = time.perf_counter() - t0
    export_sessions = []
    import sentinel.verify.verifier as verifier

    real_open = verifier.open_export

    def spy(path, threads=None, spin=True):
        e = real_open(path, threads, spin)
        export_sessions.append(e)
        return e

    verifier.open_export = spy
    try:
        t0 = time.perf_counter()
        rep = verify_export(fp16_onnx, entry, golden, precision="fp16", localize="always")
        t_loc = time.perf_counter() - t0
    finally:
        verifier.open_export = real_open
    assert export_sessions[0].sessions_built == 1      # the instrumented session served the plain run too
    layers = rep.doc["layers"]
    assert layers and all(l["max_abs"] is not None for l in layers), [l for l in layers if l["max_abs"] is None]
    assert rep.doc["first_divergence"] is None and rep.passed
    assert rep.doc["top1_agreement"] == plain.doc["top1_agreement"]
    print(f"digits fp16 verify: plain {t_plain:.2f} s, with localization {t_loc:.2f} s")


@pytest.mark.slow
def test_perturbed_fp16_export_is_localized_to_the_perturbed_block(fp32_onnx, entry, golden, tmp_path):
    m = onnx.load(str(fp32_onnx))
    inits = {i.name: i for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv" and (node_scope(n) or "").startswith("features.denseblock2.")
             and n.input[1] in inits]
    node = convs[len(convs) // 2]
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    w += np.random.default_rng(0).normal(0, float(w.std()), w.shape).astype(w.dtype)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    onnx.save(m, str(tmp_path / "bad32.onnx"))
    bad = to_fp16(tmp_path / "bad32.onnx", tmp_path / "bad16.onnx")
    rep = verify_export(bad, entry, golden)
    assert rep.doc["precision"] == "fp16" and not rep.passed
    assert rep.doc["first_divergence"] is not None
    assert (node_scope(node) or "").startswith(rep.doc["first_divergence"]), rep.doc["first_divergence"]


@pytest.mark.slow
def test_cli_precision_fp16_localize_always_does_not_crash(fp16_onnx, reg_dir, tmp_path):
    out = tmp_path / "v.json"
    r = subprocess.run([sys.executable, "-m", "sentinel", "verify", str(fp16_onnx), "--model", "digits:v3",
                        "--registry", str(reg_dir), "--precision", "fp16", "--localize", "always",
                        "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    d = json.loads(out.read_text())
    assert d["precision"] == "fp16" and d["layers"]


@pytest.mark.unit
def test_graph_precision_reads_initializers_not_inputs():
    def graph(dtype: int) -> onnx.ModelProto:
        w = helper.make_tensor("w", dtype, [4], [1.0, 2.0, 3.0, 4.0] if dtype != TensorProto.INT8 else [1, 2, 3, 4])
        n = [helper.make_node("Cast", ["x"], ["xc"], to=dtype), helper.make_node("Add", ["xc", "w"], ["y0"]),
             helper.make_node("Cast", ["y0"], ["y"], to=TensorProto.FLOAT)]
        g = helper.make_graph(n, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
        return helper.make_model(g)

    assert graph_precision(graph(TensorProto.FLOAT)) == "fp32"
    assert graph_precision(graph(TensorProto.FLOAT16)) == "fp16"
    assert graph_precision(graph(TensorProto.BFLOAT16)) == "bf16"


@pytest.mark.unit
def test_instrumented_values_are_cast_to_float32(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT16, [2], [1.0, 2.0])
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16, name="/a/Cast"),
             helper.make_node("Add", ["h", "w"], ["s"], name="/a/Add"),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT, name="/b/Cast")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [w])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    e = OnnxExport(path)
    assert e.precision == "fp16" and e.input_dtype == np.float32 and e.input_shape == ("n", 2)
    names = e.instrument(["s"])
    got = e.run(np.array([[1.0, 1.0]], np.float32), names=[names["s"], "y"])
    np.testing.assert_array_equal(got[names["s"]], [[2.0, 3.0]])
    np.testing.assert_array_equal(e.run(np.array([[0.5, 0.5]], np.float32))["y"], [[1.5, 2.5]])
    assert e.sessions_built == 1
