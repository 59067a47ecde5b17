"""verify's fast paths keep their answers: stored reference outputs (digest-checked, no torch
on a pass), localization that stops at the first divergence, and the early failure watch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from servers import REPO

from sentinel.errors import UsageError
from sentinel.registry import Registry
from sentinel.verify.localize import checkpoint_names, node_scope
from sentinel.verify.policy import policy_for
from sentinel.verify.verifier import _failure_watch, verify_export

GOLDEN = REPO / "golden_sets" / "digits" / "v3"


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

    return export_onnx(entry, reg_dir / "exports" / "model.onnx", dynamic_batch=True, exporter="legacy")


def _perturb(src: Path, dst: Path, scope: str) -> str:
    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv" and (node_scope(n) or "").startswith(scope + ".")
             and n.input[1] in inits]
    node = convs[len(convs) // 2]
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    w += np.random.default_rng(0).normal(0, float(w.std()) * 0.5, w.shape).astype(w.dtype)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    onnx.save(m, str(dst))
    return node_scope(node) or ""


@pytest.mark.parametrize("arch", ["densenet121", "densenet_digits"])
def test_checkpoint_names_from_the_config_match_the_torch_modules(arch):
    from sentinel.reference.arch import ARCHS
    from sentinel.reference.densenet import DenseNet
    from sentinel.verify.localize import checkpoint_modules

    cfg = ARCHS[arch]
    assert checkpoint_names(cfg) == checkpoint_modules(DenseNet(cfg))


@pytest.mark.unit
def test_failure_watch_is_true_only_once_failure_is_certain():
    ref = np.tile(np.array([[3.0, 1.0, 0.0]]), (100, 1))
    fp32 = policy_for("fp32")
    watch = _failure_watch(fp32, ref)
    assert not watch(0, {"logits": ref[:50] + 1e-5})                        # within atol + rtol·|ref|
    bumped = ref[50:].copy()
    bumped[7, 2] += 0.01
    assert watch(50, {"logits": bumped})                                    # one logit out: fp32 fails
    assert not _failure_watch(fp32, ref)(0, {"probabilities": ref[:50] + 1})  # not the logits: no claim
    # int8 is judged by top-1 (99% of 100 samples: one miss allowed, two fail)
    int8 = _failure_watch(policy_for("int8"), ref)
    swapped = ref[:50].copy()
    swapped[0] = [0.0, 1.0, 3.0]
    assert not int8(0, {"logits": swapped})
    assert int8(50, {"logits": swapped})


@pytest.mark.slow
def test_auto_localization_stops_at_the_same_first_divergence_as_always(fp32_onnx, entry, golden, tmp_path):
    bad = tmp_path / "bad.onnx"
    perturbed = _perturb(fp32_onnx, bad, "features.denseblock2")
    auto = verify_export(bad, entry, golden, localize="auto").doc
    full = verify_export(bad, entry, golden, localize="always").doc
    assert not auto["passed"] and not full["passed"]
    assert auto["first_divergence"] == full["first_divergence"]
    assert perturbed.startswith(auto["first_divergence"])
    by_module = {l["module"]: l for l in full["layers"]}
    measured = [l for l in auto["layers"] if l["max_abs"] is not None]
    assert measured and all(l == by_module[l["module"]] for l in measured)   # same numbers where measured
    assert measured[-1]["module"] == auto["first_divergence"]                # and nothing after it
    assert all(l["max_abs"] is not None for l in full["layers"])
    assert "stopped at the first divergence" in auto["localization_note"]
    assert {k: v for k, v in auto.items() if k not in ("layers", "localization_note", "timings_s")} == \
        {k: v for k, v in full.items() if k not in ("layers", "localization_note", "timings_s")}


@pytest.mark.slow
def test_passing_verify_uses_the_stored_reference_and_never_imports_torch(fp32_onnx, reg_dir):
    code = ("import sys, json; from pathlib import Path\n"
            "from sentinel.registry import Registry\nfrom sentinel.golden import golden_for\n"
            "from sentinel.verify.verifier import verify_export\n"
            f"e = Registry({str(reg_dir)!r}).resolve('digits:v3')\n"
            f"r = verify_export(Path({str(fp32_onnx)!r}), e, golden_for(e, {str(REPO / 'golden_sets')!r}))\n"
            "print(json.dumps({'passed': r.passed, 'torch': 'torch' in sys.modules}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"passed": True, "torch": False}


@pytest.mark.slow
def test_tampered_stored_reference_outputs_exit_2_naming_the_file(fp32_onnx, reg_dir, tmp_path):
    g = tmp_path / "golden"
    shutil.copytree(GOLDEN, g)
    logits = np.load(g / "logits.npy")
    logits[0, 0] += 1.0    # a reference that would make a good export look bad (or a bad one good)
    np.save(g / "logits.npy", logits)
    r = subprocess.run([sys.executable, "-m", "sentinel", "verify", str(fp32_onnx), "--model", "digits:v3",
                        "--registry", str(reg_dir), "--golden", str(g)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "logits.npy" in r.stderr and "sha256" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_watched_run_splits_batches_differently_but_gives_identical_outputs(fp32_onnx, golden):
    from sentinel.verify.runtime import OnnxExport

    e = OnnxExport(fp32_onnx)
    x = golden.inputs[:40]
    seen: list[tuple[int, int]] = []
    watched = e.run(x, on_chunk=lambda start, chunk: seen.append((start, len(chunk["logits"]))))
    assert seen == [(0, 4), (4, 16), (20, 16), (36, 4)]
    plain = e.run(x)
    assert all(np.array_equal(watched[k], plain[k]) for k in plain)   # the verdict cannot depend on the split


def _reshape_outputs(src: Path, dst: Path, classes: int | None = None) -> None:
    """The bundled export with the embeddings as a first output "out0" and the scores renamed
    "out1" (or, with `classes`, only the first `classes` scores)."""
    from onnx import helper

    m = onnx.load(str(src))
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    tail = [helper.make_node("Identity", [gemm.input[0]], ["out0"])]
    if classes is None:
        tail.append(helper.make_node("Identity", ["logits"], ["out1"]))
    else:
        m.graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                                    (("s0", [0]), ("s1", [classes]), ("ax", [1]))])
        tail.append(helper.make_node("Slice", ["logits", "s0", "s1", "ax"], ["out1"]))
    m.graph.node.extend(tail)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info("out0", onnx.TensorProto.FLOAT, ["n", None]),
                           helper.make_tensor_value_info("out1", onnx.TensorProto.FLOAT, ["n", None])])
    onnx.save(m, str(dst))


def test_scores_are_found_by_shape_when_another_output_comes_first(entry, golden, tmp_path):
    # embeddings first and no output named "logits": the first output was taken as the scores
    # and the export refused as "another model"
    src = REPO / "models" / "digits" / "v3" / "model.onnx"
    _reshape_outputs(src, tmp_path / "two.onnx")
    report = verify_export(tmp_path / "two.onnx", entry, golden, localize="never")
    assert report.passed and report.doc["output"] == "out1"
    _reshape_outputs(src, tmp_path / "seven.onnx", classes=7)
    with pytest.raises(UsageError, match=r"no output has the reference's shape \[300, 10\] \(outputs: 'out0' "
                                         r"\[300, \d+\], 'out1' \[300, 7\]\)"):
        verify_export(tmp_path / "seven.onnx", entry, golden, localize="never")


def test_a_channels_last_export_is_named_as_such(entry, golden, tmp_path):
    from onnx import helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 32, 32, 1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 32, 32, 1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "nhwc.onnx"))
    with pytest.raises(UsageError, match=r"takes inputs \[32, 32, 1\] per sample, .* \[1, 32, 32\]; a channels-last"):
        verify_export(tmp_path / "nhwc.onnx", entry, golden, localize="never")


def test_nan_scores_fail_by_name_and_the_json_report_stays_json(entry, golden, tmp_path):
    from onnx import helper

    from sentinel.commands._common import write_json_report

    m = onnx.load(str(REPO / "models" / "digits" / "v3" / "model.onnx"))
    gemm = [n for n in m.graph.node if n.op_type == "Gemm"][-1]
    gemm.output[0] = "pre"
    m.graph.node.append(helper.make_node("Sqrt", ["pre"], ["logits"], name="/classifier/Sqrt"))  # NaN where < 0
    onnx.save(m, str(tmp_path / "nan.onnx"))
    report = verify_export(tmp_path / "nan.onnx", entry, golden, localize="never")
    assert report.doc["nonfinite_samples"] > 0
    assert report.failures[0].startswith(f"logits holds NaN or infinite values for {report.doc['nonfinite_samples']} of 300")
    write_json_report(report.doc, tmp_path / "r.json")

    def refuse(token):
        raise ValueError(f"{token} in the JSON report")

    doc = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)   # bare NaN tokens were written
    assert doc["outputs"]["logits"]["max_abs"] is None


def test_a_failure_on_one_of_several_outputs_of_the_scores_shape_names_the_others(entry, golden, tmp_path):
    # out0 (an auxiliary head of the same shape) first, the real scores in out1: verify
    # compared out0 and failed without a word about out1
    from onnx import helper

    from sentinel.verify.verifier import render_text

    m = onnx.load(str(REPO / "models" / "digits" / "v3" / "model.onnx"))
    m.graph.node.extend([helper.make_node("Relu", ["logits"], ["out0"]),
                         helper.make_node("Identity", ["logits"], ["out1"])])
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["n", 10]) for n in ("out0", "out1")])
    onnx.save(m, str(tmp_path / "aux.onnx"))
    report = verify_export(tmp_path / "aux.onnx", entry, golden, localize="never")
    assert not report.passed and report.doc["output"] == "out0" and report.doc["same_shape_outputs"] == ["out1"]
    assert "compared output 'out0'; also of the reference's shape: 'out1'" in render_text(report)
