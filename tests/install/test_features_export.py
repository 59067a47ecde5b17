"""The registry's features export (ONNX: logits, embeddings) drives the shadow without torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sentinel.analysis.shadow import ReferenceRunner
from sentinel.registry import Registry, sha256_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def private_v3(tmp_path):
    shutil.copytree(REPO / "models/digits/v3", tmp_path / "models/digits/v3")
    return tmp_path / "models/digits/v3"


def test_v3_records_a_features_export_that_matches_its_file(digits_v3):
    ref = digits_v3.features_export()
    assert ref is not None and ref.outputs == ("logits", "embeddings") and ref.file == "model.features.onnx"
    assert sha256_file(digits_v3.directory / ref.file) == ref.sha256


@pytest.mark.slow
def test_runner_uses_the_registered_export_and_reproduces_the_golden_outputs(digits_v3, digits_golden):
    g = digits_golden
    r = ReferenceRunner(digits_v3, check_inputs=g.inputs[:8], check_outputs=(g.logits[:8], g.embeddings[:8]))
    assert r.backend == "onnxruntime" and r.model is None        # no torch model was built
    out = r.run(g.inputs[:64])
    assert np.abs(out.logits - g.logits[:64]).max() < 1e-4
    assert np.abs(out.embeddings - g.embeddings[:64]).max() < 1e-4
    assert r.run(g.inputs[:0]).embeddings.shape == (0, g.embeddings.shape[1])


@pytest.mark.slow
def test_tampered_features_export_falls_back_to_torch_with_a_note(private_v3, digits_golden):
    f = private_v3 / "model.features.onnx"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    entry = Registry(private_v3.parents[1]).resolve("digits:v3")
    g = digits_golden
    r = ReferenceRunner(entry, check_inputs=g.inputs[:8], check_outputs=(g.logits[:8], g.embeddings[:8]),
                        cache_dir=private_v3.parent / "cache")
    assert "sha256" in r.note and "model.features.onnx" in r.note
    assert r.model is not None                                  # torch built the reference instead


@pytest.mark.slow
def test_features_export_that_disagrees_with_the_golden_set_is_not_used(digits_v3, digits_golden, tmp_path):
    g = digits_golden
    wrong = (g.logits[:8] + 1.0, g.embeddings[:8])
    r = ReferenceRunner(digits_v3, check_inputs=g.inputs[:8], check_outputs=wrong, cache_dir=tmp_path)
    assert "differs from the golden set" in r.note and r.model is not None
