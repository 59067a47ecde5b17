"""The registry, the bundled digits models and their golden set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_config_cli import run_cli

from sentinel.errors import IntegrityError, RegistryError, UsageError
from sentinel.golden import build_golden, check_golden, golden_for, load_golden
from sentinel.registry import Registry


def test_resolve_specs(registry):
    assert registry.resolve("v3").spec == "digits:v3"
    assert registry.resolve("digits:v2").spec == "digits:v2"
    assert registry.resolve("digits").spec == "digits:v3"  # newest


def test_unknown_version_lists_known_ones(registry):
    with pytest.raises(RegistryError, match=r"unknown version 'v9' of model 'digits'; known versions: v2, v3"):
        registry.resolve("v9")
    with pytest.raises(RegistryError, match=r"unknown model 'cats'; known models: (.*, )?digits"):
        registry.resolve("cats:v1")


def test_bundled_model_meets_its_accuracy_and_split_is_disjoint(digits_v3):
    m = digits_v3.manifest
    assert m.metrics["holdout_accuracy"] >= 0.98
    train, golden, hold = set(m.split.train), set(m.split.golden), set(m.split.holdout)
    assert not (train & golden) and not (train & hold) and not (golden & hold)
    assert len(train) + len(golden) + len(hold) == 1797
    assert digits_v3.weights_ok()


def test_models_list_json():
    res = run_cli("models", "list", "--json")
    assert res.returncode == 0, res.stderr
    rows = {f"{r['name']}:{r['version']}": r for r in json.loads(res.stdout)}
    assert {"digits:v2", "digits:v3"} <= set(rows)
    assert rows["digits:v3"]["weights_ok"] is True
    assert rows["digits:v3"]["parameters"] > 10_000


def _copy_entry(tmp_path, digits_v3):
    dst = tmp_path / "models" / "digits" / "v3"
    shutil.copytree(digits_v3.directory, dst)
    return Registry(tmp_path / "models").resolve("digits:v3")


def test_wrong_weights_digest_is_caught(tmp_path, digits_v3):
    entry = _copy_entry(tmp_path, digits_v3)
    data = bytearray(entry.weights_path.read_bytes())
    data[-1] ^= 0xFF
    entry.weights_path.write_bytes(bytes(data))
    assert not entry.weights_ok()
    with pytest.raises(IntegrityError, match="does not match model.yaml weights.sha256"):
        entry.build_model()
    res = run_cli("models", "list", "--registry", str(tmp_path / "models"))
    assert "MISMATCH" in res.stdout


def test_class_count_mismatch_is_named(tmp_path, digits_v3):
    entry = _copy_entry(tmp_path, digits_v3)
    text = entry.manifest_path.read_text().replace("num_classes: 10", "num_classes: 12")
    entry.manifest_path.write_text(text)
    entry = Registry(tmp_path / "models").resolve("digits:v3")
    with pytest.raises(UsageError, match="classes: lists 10 classes but architecture has num_classes=12"):
        entry.build_model()


def test_golden_set_is_intact_and_from_the_golden_split(digits_v3, digits_golden):
    assert check_golden(digits_golden.path) == []
    assert set(digits_golden.ids.tolist()) <= set(digits_v3.manifest.split.golden)
    assert digits_golden.raw.shape[1:] == (8, 8)
    assert digits_golden.inputs.shape[1:] == (1, 32, 32)


def test_reference_reproduces_stored_outputs(digits_v3, digits_golden):
    out = digits_v3.reference(device="cpu").run(digits_golden.inputs)
    np.testing.assert_allclose(out.logits, digits_golden.logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.probabilities, digits_golden.probabilities, atol=1e-5)
    np.testing.assert_allclose(out.embeddings, digits_golden.embeddings, atol=1e-4, rtol=1e-4)
    assert (out.probabilities.argmax(1) == digits_golden.labels).mean() >= 0.97
    # preprocessing of the raw form gives the stored network inputs
    np.testing.assert_allclose(digits_v3.manifest.preprocessing.apply(digits_golden.raw), digits_golden.inputs,
                               atol=1e-6)


def test_flipped_byte_is_caught_by_golden_check(tmp_path, digits_golden):
    dst = tmp_path / "g"
    shutil.copytree(digits_golden.path, dst)
    p = dst / "inputs.npy"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    res = run_cli("golden", "check", str(dst))
    assert res.returncode == 1
    assert f"{p}: sha256" in res.stderr
    with pytest.raises(IntegrityError, match="inputs.npy"):
        load_golden(dst)
    ok = run_cli("golden", "check", str(digits_golden.path))
    assert ok.returncode == 0, ok.stderr


def test_writing_into_a_golden_array_never_changes_the_file(tmp_path, digits_golden):
    """The arrays are memory-mapped copy-on-write: callers may scale them in place (torch needs
    writable arrays), the golden set stays what its manifest's digests say."""
    dst = tmp_path / "g"
    shutil.copytree(digits_golden.path, dst)
    g = load_golden(dst)
    before = (dst / "inputs.npy").read_bytes()
    x = g.inputs
    assert x.flags.writeable and x.shape[0] == len(g)
    x[:] = 0.0
    x.flush()                                          # copy-on-write: nothing reaches the file
    assert (dst / "inputs.npy").read_bytes() == before
    assert float(np.abs(g.inputs).sum()) > 0          # a fresh access sees the file, not the write
    assert check_golden(dst) == []


def test_golden_set_of_another_model_is_refused(registry, digits_golden):
    v2 = registry.resolve("digits:v2")
    with pytest.raises(UsageError, match="golden set is for digits:v3, not digits:v2"):
        golden_for(v2, path=digits_golden.path)


def test_golden_build_from_npz_and_show(tmp_path, digits_v3, digits_golden):
    src = tmp_path / "in.npz"
    np.savez(src, raw=digits_golden.raw[:20], labels=digits_golden.labels[:20])
    out = tmp_path / "built"
    res = run_cli("golden", "build", "--model", "digits:v3", "--from", str(src), "--count", "12", "-o", str(out))
    assert res.returncode == 0, res.stderr
    g = load_golden(out)
    assert len(g) == 12
    np.testing.assert_allclose(g.probabilities, digits_golden.probabilities[:12], atol=1e-5)
    show = run_cli("golden", "show", str(out), "--json")
    info = json.loads(show.stdout)
    assert info["intact"] is True and info["count"] == 12


def test_golden_build_refuses_training_split():
    res = run_cli("golden", "build", "--model", "v3", "--from", "sklearn-digits", "--split", "train",
                  "-o", "/tmp/never")
    assert res.returncode == 2
    assert "never use training data" in res.stderr


def test_build_golden_rejects_wrong_input_shape(tmp_path, digits_v3):
    with pytest.raises(UsageError, match=r"inputs have shape \(3, 8, 8\) per sample; digits:v3 expects \(1, 32, 32\)"):
        build_golden(digits_v3, tmp_path / "x", ids=np.arange(2), inputs=np.zeros((2, 3, 8, 8), np.float32))


def test_bundled_onnx_export_matches_its_record_and_verifies(digits_v3):
    ref = digits_v3.export("onnx")
    assert ref is not None
    from sentinel.registry import sha256_file

    assert sha256_file(digits_v3.directory / ref.file) == ref.sha256
    res = run_cli("verify", str(digits_v3.directory / ref.file), "--model", "digits:v3", "--quiet")
    assert res.returncode == 0, res.stderr + res.stdout


def test_example_datas_default_model_applies_without_a_config(tmp_path, monkeypatch):
    """From a directory without sentinel.yaml, `--model v3` resolves through the example data's
    own config (default_model: digits), even when its registry holds another model too."""
    from sentinel import registry as reg

    home = tmp_path / "home"
    shutil.copytree(reg.source_checkout() / "models" / "digits", home / "models" / "digits",
                    ignore=shutil.ignore_patterns("*.onnx"))
    shutil.copytree(home / "models" / "digits", home / "models" / "other")
    for y in (home / "models" / "other").glob("*/model.yaml"):
        y.write_text(y.read_text().replace("name: digits", "name: other"))
    assert sorted(m.name for m in reg.Registry(home / "models").entries()) == ["digits", "digits", "other", "other"]
    (home / "sentinel.yaml").write_text("default_model: digits\nmodels:\n  - name: digits\n    version: v3\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(reg, "data_home", lambda cwd=None: home)
    assert reg.open_registry().resolve("v3").spec == "digits:v3"
