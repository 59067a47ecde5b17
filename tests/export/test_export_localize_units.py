"""Mapping ONNX nodes to DenseNet module names, on hand-built nodes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from sentinel.verify.localize import (
    LayerError,
    compare_layers,
    first_divergence,
    node_scope,
    onnx_values,
)
from sentinel.verify.stats import error_stats, topk_agreement

pytestmark = pytest.mark.unit


def _node(op, out, scopes=None, name=""):
    n = helper.make_node(op, ["x"], [out], name=name)
    if scopes is not None:
        p = n.metadata_props.add()
        p.key, p.value = "pkg.torch.onnx.name_scopes", repr(scopes)
    return n


def test_scope_from_dynamo_metadata_and_legacy_names():
    dyn = _node("Concat", "cat_1", ["", "features", "features.denseblock1", "features.denseblock1.denselayer2", "cat_1"])
    assert node_scope(dyn) == "features.denseblock1.denselayer2"
    assert node_scope(_node("Gemm", "logits", ["", "classifier", "linear"])) == "classifier"
    assert node_scope(_node("Conv", "o", name="/features/denseblock3/denselayer2/conv2/Conv")) == \
        "features.denseblock3.denselayer2.conv2"
    assert node_scope(_node("Relu", "o", name="node_relu")) is None


def test_module_output_is_the_last_node_in_its_scope_skipping_quantize():
    g = helper.make_graph([
        _node("Conv", "c1", name="/features/denseblock1/denselayer1/conv1/Conv"),
        _node("Conv", "c2", name="/features/denseblock1/denselayer1/conv2/Conv"),
        _node("QuantizeLinear", "q", name="/features/denseblock1/denselayer1/conv2/Conv_output_0_QuantizeLinear"),
        _node("Concat", "blk", name="/features/denseblock1/Concat"),
        _node("Conv", "c10", name="/features/denseblock1/denselayer10/conv2/Conv"),
    ], "g", [], [])
    v = onnx_values(g, ["features.denseblock1.denselayer1", "features.denseblock1", "features.denseblock1.denselayer10",
                        "features.transition1"])
    # denselayer1 must not swallow denselayer10 (prefix plus a dot), and transition1 is absent.
    # The block's last node here is its last layer's: not the block's output (its concatenation
    # lost its scope, as onnxruntime's QLinearConcat does), so the block is left unmeasured.
    assert v == {"features.denseblock1.denselayer1": "c2", "features.denseblock1.denselayer10": "c10"}
    g.node.append(_node("Concat", "blk2", name="/features/denseblock1/Concat_1"))
    v = onnx_values(g, ["features.denseblock1.denselayer1", "features.denseblock1", "features.denseblock1.denselayer10"])
    assert v == {"features.denseblock1.denselayer1": "c2", "features.denseblock1": "blk2",
                 "features.denseblock1.denselayer10": "c10"}


def test_first_divergence_is_the_first_checkpoint_over_the_relative_bound():
    ref = {"a": np.ones(4), "b": np.ones(4) * 10, "c": np.ones(4)}
    got = {"va": np.ones(4), "vb": np.ones(4) * 10.5, "vc": np.ones(4) * 3}
    layers = compare_layers(["a", "b", "c", "d"], {"a": "va", "b": "vb", "c": "vc"}, got, ref, 1e-3)
    assert [l.diverges for l in layers] == [False, True, True, False]
    assert layers[3] == LayerError("d", None, None, None, None, False)
    assert first_divergence(layers) == "b"


def test_error_stats_minimum_tolerances_and_topk():
    ref = np.array([[1.0, 2.0, -4.0]])
    got = np.array([[1.1, 2.0, -4.0]])
    s = error_stats(got, ref, atol=1e-4, rtol=1e-3)
    assert abs(s.max_abs - 0.1) < 1e-12
    assert abs(s.min_atol - (0.1 - 1e-3)) < 1e-9 and not s.passed
    assert abs(s.min_rtol - (0.1 - 1e-4)) < 1e-9
    logits = np.array([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    assert topk_agreement(np.array([[0.0, 2.1, 2.0], [3.0, 2.0, 1.0]]), logits, 1) == 0.5
    assert topk_agreement(np.array([[0.0, 2.1, 2.0], [3.0, 2.0, 1.0]]), logits, 2) == 1.0


def test_a_checkpoint_of_another_shape_is_where_the_export_parts_from_the_reference():
    # Another architecture's export (16 stem channels where the reference has 24): the shape
    # differs from the stem on, so no number can be compared there. That was "not measured"
    # and the first divergence came out as the classifier, the first checkpoint of equal shape.
    from sentinel.verify.verifier import VerifyReport, render_text

    ref = {"stem": np.ones((2, 24, 8, 8)), "block": np.ones((2, 48, 8, 8)), "classifier": np.ones((2, 10))}
    got = {"v0": np.ones((2, 16, 8, 8)), "v1": np.ones((2, 40, 8, 8)), "logits": np.zeros((2, 10))}
    layers = compare_layers(["stem", "block", "classifier"], {"stem": "v0", "block": "v1", "classifier": "logits"},
                            got, ref, 1e-4)
    assert first_divergence(layers) == "stem"
    assert layers[0].diverges and layers[0].max_abs is None
    assert layers[0].as_dict()["problem"] == "shape [2, 16, 8, 8] where the reference has [2, 24, 8, 8]"
    doc = {"export": "m.onnx", "format": "onnx", "precision": "fp32", "model": "digits:v3", "samples": 2,
           "top1_agreement": 0.5, "top5_agreement": 1.0, "outputs": {}, "worst_samples": [],
           "first_divergence": "stem", "localization_note": None, "layers": [l.as_dict() for l in layers],
           "passed": False, "failures": ["top-1 agreement 50.00% is below 100.00%"]}
    assert "first divergence: stem (ONNX value 'v0', shape [2, 16, 8, 8] where the reference has" in \
        render_text(VerifyReport(doc))


def test_nan_in_an_exported_checkpoint_diverges():
    # NaN > bound is False: a checkpoint full of NaN passed as "not diverging" and the note
    # said the error accumulates across layers
    from sentinel.verify.localize import layer_error

    a = np.array([[1.0, np.nan, 2.0], [np.inf, 0.0, 1.0]])
    e = layer_error("classifier", "logits", a, np.ones((2, 3)), 1e-4)
    assert e.diverges and e.problem == "2 NaN or infinite values where the reference's are finite"
    assert not layer_error("x", "v", np.ones(3), np.ones(3), 1e-4).diverges


@pytest.mark.parametrize("kw,msg", [({"atol": -1.0}, "--atol must be a finite number ≥ 0, got -1.0"),
                                    ({"rtol": float("inf")}, "--rtol must be a finite number ≥ 0, got inf"),
                                    ({"atol": float("nan")}, "--atol must be a finite number ≥ 0, got nan"),
                                    ({"min_top1": 1.5}, "--min-top1 must be a fraction between 0 and 1, got 1.5")])
def test_out_of_range_tolerances_are_usage_errors(kw, msg):
    # they were taken as given: a negative or NaN atol failed every export (exit 1), inf passed any
    from sentinel.errors import UsageError
    from sentinel.verify.policy import policy_for

    with pytest.raises(UsageError, match=msg):
        policy_for("fp32", **kw)
    assert policy_for("fp32", atol=0.0, rtol=0.0, min_top1=0.0).atol == 0.0
