"""Paths in a model.yaml or a golden manifest stay inside their directory (symlinks included)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from sentinel.errors import ConfigError, RegistryError
from sentinel.golden import check_golden, load_golden
from sentinel.registry import Registry, confined, load_manifest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _entry_copy(tmp_path: Path, **weights) -> Path:
    """A copy of models/digits/v2 under tmp_path/models with weights fields replaced."""
    d = tmp_path / "models/digits/v2"
    shutil.copytree(REPO / "models/digits/v2", d)
    doc = yaml.safe_load((d / "model.yaml").read_text())
    doc["weights"].update(weights)
    (d / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return d


@pytest.mark.parametrize("bad", ["../../../outside.safetensors", "/etc/passwd", "sub/../../x"])
def test_weights_file_leaving_the_directory_is_a_config_error(tmp_path, bad):
    d = _entry_copy(tmp_path, file=bad)
    with pytest.raises(ConfigError) as err:
        load_manifest(d / "model.yaml")
    assert "weights.file" in str(err.value) and "inside the model's directory" in str(err.value)


def test_export_file_leaving_the_directory_is_a_config_error(tmp_path):
    d = _entry_copy(tmp_path)
    doc = yaml.safe_load((d / "model.yaml").read_text())
    doc["exports"] = [{"format": "onnx", "file": "../../../../x.onnx", "sha256": "0" * 64}]
    (d / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError, match=r"exports\[0\]\.file"):
        load_manifest(d / "model.yaml")


def test_weights_symlink_pointing_out_is_refused(tmp_path):
    outside = tmp_path / "secret.safetensors"
    shutil.copy2(REPO / "models/digits/v2/model.safetensors", outside)
    d = _entry_copy(tmp_path, file="link.safetensors")
    os.symlink(outside, d / "link.safetensors")
    entry = Registry(tmp_path / "models").resolve("digits:v2")
    with pytest.raises(RegistryError, match=r"weights\.file: 'link\.safetensors' resolves to .*outside"):
        entry.check_weights()


def test_symlink_inside_the_directory_is_fine(tmp_path):
    d = _entry_copy(tmp_path, file="link.safetensors")
    os.symlink("model.safetensors", d / "link.safetensors")
    Registry(tmp_path / "models").resolve("digits:v2").check_weights()


def test_confined_names_where():
    with pytest.raises(RegistryError, match=r"^m\.yaml: weights\.file: '/etc/passwd'"):
        confined("/tmp", "/etc/passwd", "m.yaml: weights.file")


def _golden_copy(tmp_path: Path) -> Path:
    g = tmp_path / "g"
    shutil.copytree(REPO / "golden_sets/digits/v3", g)
    return g


def test_golden_manifest_entry_outside_is_a_problem(tmp_path):
    g = _golden_copy(tmp_path)
    (tmp_path / "evil.npy").write_bytes((g / "ids.npy").read_bytes())
    m = json.loads((g / "manifest.json").read_text())
    m["files"]["../evil.npy"] = m["files"]["ids.npy"]
    (g / "manifest.json").write_text(json.dumps(m))
    problems = check_golden(g)
    assert any("'../evil.npy'" in p and "outside" in p for p in problems), problems


def test_golden_array_symlinked_out_is_refused(tmp_path):
    g = _golden_copy(tmp_path)
    outside = tmp_path / "inputs.npy"
    (g / "inputs.npy").rename(outside)
    os.symlink(outside, g / "inputs.npy")
    problems = check_golden(g)
    assert any("inputs.npy" in p and "outside" in p for p in problems), problems
    gs = load_golden(g, check=False)
    with pytest.raises(RegistryError, match="outside"):
        gs.inputs  # noqa: B018 - the property read is the test


def test_bundled_golden_set_is_clean():
    assert check_golden(REPO / "golden_sets/digits/v3") == []
