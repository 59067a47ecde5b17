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
    assert v == {"features.denseblock1.denselayer1": "c2", "features.denseblock1": "c10",
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
