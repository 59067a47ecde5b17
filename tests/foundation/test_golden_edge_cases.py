"""Golden sets and model entries handed over by someone else: broken, forged or for another model.

Each case must end in a clear error naming the file (no traceback, no hang, no huge allocation),
and a `golden build` given bad input must leave what was there untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_config_cli import run_cli

from sentinel.errors import ConfigError, RegistryError, UsageError, WeightsError
from sentinel.golden import build_golden, check_golden, golden_for, load_contract, load_golden
from sentinel.registry import Registry, confined, sha256_file

pytestmark = pytest.mark.unit


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _relist(g: Path) -> None:
    """Rewrite manifest.json so every digest, shape and dtype matches the files (a self-consistent forgery)."""
    m = json.loads((g / "manifest.json").read_text())
    for name in m["files"]:
        a = np.load(g / name, mmap_mode="r")
        m["files"][name] = {"sha256": sha256_file(g / name), "shape": list(a.shape), "dtype": str(a.dtype)}
    m["golden.yaml"] = sha256_file(g / "golden.yaml")
    (g / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(g: Path, fn) -> None:
    m = json.loads((g / "manifest.json").read_text())
    fn(m)
    (g / "manifest.json").write_text(json.dumps(m))


# --- golden check: the manifest itself ---------------------------------------------------------

def test_manifest_entry_that_is_not_a_mapping_is_a_problem(tmp_path, digits_golden):
    g = _copy(digits_golden.path, tmp_path / "g")
    _edit_manifest(g, lambda m: m["files"].__setitem__("ids.npy", "abc"))
    problems = check_golden(g)            # was: AttributeError 'str' object has no attribute 'get'
    assert any("'ids.npy' needs a sha256" in p for p in problems), problems


def test_nul_byte_in_a_manifest_name_is_a_problem(tmp_path, digits_golden):
    g = _copy(digits_golden.path, tmp_path / "g")
    _edit_manifest(g, lambda m: m["files"].__setitem__("a\x00b.npy", m["files"]["ids.npy"]))
    problems = check_golden(g)            # was: ValueError embedded null byte
    assert any("not a usable path" in p for p in problems), problems
    with pytest.raises(RegistryError, match="not a usable path"):
        confined(g, "x\x00y", "where")


def test_manifest_and_contract_symlinked_out_are_refused(tmp_path, digits_golden):
    g = _copy(digits_golden.path, tmp_path / "g")
    outside = tmp_path / "outside.json"
    (g / "manifest.json").rename(outside)
    os.symlink(outside, g / "manifest.json")
    problems = check_golden(g)            # was: the file outside was read as the manifest
    assert any("'manifest.json' resolves to" in p and "outside" in p for p in problems), problems

    g2 = _copy(digits_golden.path, tmp_path / "g2")
    outside2 = tmp_path / "contract.json"
    (g2 / "contract.json").rename(outside2)
    os.symlink(outside2, g2 / "contract.json")
    assert any("'contract.json' resolves to" in p for p in check_golden(g2))
    with pytest.raises(RegistryError, match="outside"):
        load_contract(load_golden(g2, check=False))


def test_missing_digests_of_golden_yaml_and_contract_are_problems(tmp_path, digits_golden):
    g = _copy(digits_golden.path, tmp_path / "g")
    _edit_manifest(g, lambda m: m.pop("golden.yaml"))
    text = (g / "golden.yaml").read_text().replace("prob_atol: 0.001", "prob_atol: 1000.0")
    (g / "golden.yaml").write_text(text)
    problems = check_golden(g)            # was: [] (the edited tolerance passed unverified)
    assert any("no sha256 for golden.yaml" in p for p in problems), problems

    g2 = _copy(digits_golden.path, tmp_path / "g2")
    (g2 / "contract.json").write_text((g2 / "contract.json").read_text().replace("0", "1"))
    assert any("contract.json: sha256 does not match" in p for p in check_golden(g2))


def test_an_unlisted_array_file_is_a_problem_not_used_unverified(tmp_path, digits_golden):
    g = _copy(digits_golden.path, tmp_path / "g")
    _edit_manifest(g, lambda m: m["files"].pop("labels.npy"))
    np.save(g / "labels.npy", np.zeros(7, np.int64))
    problems = check_golden(g)            # was: [] and the 7 labels were loaded
    assert any("labels.npy: present but not listed" in p for p in problems), problems
    res = run_cli("golden", "show", str(g))   # was: a broadcast ValueError traceback
    assert res.returncode == 0 and "FAILS CHECK" in res.stdout and "Traceback" not in res.stderr, res.stderr


def test_golden_show_of_an_unreadable_manifest_reports_it(tmp_path, digits_golden):
    g = _copy(digits_golden.path, tmp_path / "g")
    (g / "manifest.json").write_text("[1, 2]")
    res = run_cli("golden", "show", str(g))   # was: TypeError traceback
    assert res.returncode == 0, res.stderr
    assert "FAILS CHECK" in res.stdout and "unreadable manifest" in res.stdout


# --- golden check: contents that match their (forged) manifest ----------------------------------

def _zero_d(g):
    np.save(g / "embeddings.npy", np.float32(1))


def _empty(g):
    for n in ("ids", "raw", "inputs", "labels", "logits", "probabilities", "embeddings"):
        np.save(g / f"{n}.npy", np.load(g / f"{n}.npy")[:0])


def _bad_label(g):
    a = np.load(g / "labels.npy")
    a[0] = 42
    np.save(g / "labels.npy", a)


def _dup_ids(g):
    a = np.load(g / "ids.npy")
    a[1] = a[0]
    np.save(g / "ids.npy", a)


def _nan_inputs(g):
    a = np.load(g / "inputs.npy")
    a[3, 0, 0, 0] = np.nan
    np.save(g / "inputs.npy", a)


def _strings(g):
    np.save(g / "probabilities.npy", np.full((300, 10), "x"))


def _twelve_classes(g):
    for n in ("logits", "probabilities"):
        a = np.load(g / f"{n}.npy")
        np.save(g / f"{n}.npy", np.concatenate([a, a[:, :2]], 1))


def _count(g):
    (g / "golden.yaml").write_text((g / "golden.yaml").read_text().replace("count: 300", "count: 5"))


@pytest.mark.parametrize("corrupt, expect", [
    (_zero_d, "embeddings.npy: holds a single value"),
    (_empty, "has 0 rows; golden.yaml says count: 300"),
    (_bad_label, "labels.npy: label 42 of sample 0 is not a class index"),
    (_dup_ids, "ids.npy: 1 duplicated sample ids"),
    (_nan_inputs, "inputs.npy: contains NaN or infinite values"),
    (_strings, "probabilities.npy: dtype <U1; probabilities must be floating point"),
    (_twelve_classes, "logits.npy: 12 columns; golden.yaml lists 10 classes"),
    (_count, "has 300 rows; golden.yaml says count: 5"),
])
def test_contents_that_match_a_forged_manifest_are_still_checked(tmp_path, digits_golden, corrupt, expect):
    g = _copy(digits_golden.path, tmp_path / "g")
    corrupt(g)
    _relist(g)
    problems = check_golden(g)            # was: [] for every case (drift check then crashed, or counted wrong)
    assert any(expect in p for p in problems), problems


def test_golden_set_shaped_for_another_network_is_refused(tmp_path, digits_v3, digits_golden):
    """No weights digest in golden.yaml, model and version right, inputs 16×16: refused by name."""
    g = _copy(digits_golden.path, tmp_path / "g")
    text = (g / "golden.yaml").read_text()
    (g / "golden.yaml").write_text("\n".join("weights_sha256: ''" if line.startswith("weights_sha256:") else line
                                             for line in text.splitlines()) + "\n")
    np.save(g / "inputs.npy", np.load(g / "inputs.npy")[:, :, :16, :16].copy())
    _relist(g)
    assert check_golden(g) == []
    with pytest.raises(UsageError, match=r"inputs have shape \(1, 16, 16\) per sample; digits:v3 expects"):
        golden_for(digits_v3, path=g)     # was: accepted; drift check died in a matmul


# --- golden build ---------------------------------------------------------------------------------

def test_build_never_deletes_files_in_a_folder_that_is_not_a_golden_set(tmp_path, digits_v3, digits_golden):
    out = tmp_path / "data"
    out.mkdir()
    np.save(out / "precious.npy", np.arange(10))
    with pytest.raises(UsageError, match="not empty and not a golden set"):
        build_golden(digits_v3, out, ids=np.arange(5), raw=np.asarray(digits_golden.raw[:5]))
    assert (out / "precious.npy").is_file()   # was: deleted with every other *.npy there
    assert sorted(p.name for p in out.iterdir()) == ["precious.npy"]


def _labels_short(raw, labels):
    return {"raw": raw, "labels": labels[:5]}


def _labels_float(raw, labels):
    return {"raw": raw, "labels": labels + 0.7}


def _labels_range(raw, labels):
    return {"raw": raw, "labels": labels + 5}


def _raw_nan(raw, labels):
    return {"raw": np.full_like(raw, np.nan), "labels": labels}


def _ids_dup(raw, labels):
    return {"raw": raw, "labels": labels, "ids": np.zeros(len(raw), np.int64)}


def _ids_2d(raw, labels):
    return {"raw": raw, "labels": labels, "ids": np.zeros((len(raw), 3))}


def _labels_shuffled(raw, labels):
    return {"raw": raw, "labels": np.random.default_rng(0).permutation(labels)}


@pytest.mark.parametrize("make, expect", [
    (_labels_short, r"labels: \(5,\) labels for 100 inputs"),
    (_labels_float, "labels are float64, not integer class indices"),
    (_labels_range, "is not a class index of this model"),
    (_raw_nan, "inputs: sample 0 contains NaN or infinite values"),
    (_ids_dup, "ids: 99 duplicated"),
    (_ids_2d, r"ids: shape \(100, 3\)"),
    (_labels_shuffled, "are the labels in the same order as the inputs"),
])
def test_bad_build_input_is_refused_and_leaves_the_golden_set_there(tmp_path, digits_v3, digits_golden, make, expect):
    existing = _copy(digits_golden.path, tmp_path / "g")
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    arrays = make(np.asarray(digits_golden.raw[:100]), np.asarray(digits_golden.labels[:100]))
    ids = arrays.get("ids", np.arange(100))
    with pytest.raises(UsageError, match=expect):
        build_golden(digits_v3, existing, ids=ids, raw=arrays["raw"], labels=arrays["labels"])
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before   # was: replaced, or half-written
    assert check_golden(existing) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temporary folder left


def test_raw_and_inputs_that_disagree_are_refused(tmp_path, digits_v3, digits_golden):
    with pytest.raises(UsageError, match="raw and inputs disagree"):
        build_golden(digits_v3, tmp_path / "g", ids=np.arange(20), raw=np.asarray(digits_golden.raw[:20]),
                     inputs=np.asarray(digits_golden.inputs[20:40]))


def test_rebuild_into_a_golden_set_replaces_it(tmp_path, digits_v3, digits_golden):
    existing = _copy(digits_golden.path, tmp_path / "g")
    (existing / "README.txt").write_text("notes")
    g = build_golden(digits_v3, existing, ids=np.arange(12), raw=np.asarray(digits_golden.raw[:12]),
                     labels=np.asarray(digits_golden.labels[:12]))
    assert len(g) == 12 and check_golden(existing) == []
    assert (existing / "README.txt").read_text() == "notes"
    np.testing.assert_allclose(g.probabilities, digits_golden.probabilities[:12], atol=1e-5)


def test_golden_build_count_must_be_positive(tmp_path, digits_golden):
    src = tmp_path / "in.npz"
    np.savez(src, raw=digits_golden.raw[:20], labels=digits_golden.labels[:20])
    for count in ("0", "-5"):      # was: -5 dropped the last 5 samples and wrote a broken set; 0 a traceback
        res = run_cli("golden", "build", "--model", "digits:v3", "--from", str(src), "--count", count,
                      "-o", str(tmp_path / f"out{count}"))
        assert res.returncode == 2, res.stderr
        assert "--count" in res.stderr and not (tmp_path / f"out{count}").exists()


# --- model entries ----------------------------------------------------------------------------------

def _entry(tmp_path: Path, digits_v3, **arch) -> Path:
    d = tmp_path / "models" / "digits" / "v3"
    shutil.copytree(digits_v3.directory, d, ignore=shutil.ignore_patterns("*.onnx"))
    doc = yaml.safe_load((d / "model.yaml").read_text())
    doc["architecture"].update(arch)
    (d / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return d


def test_model_yaml_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    d = tmp_path / "models" / "x" / "v1"
    d.mkdir(parents=True)
    os.mkfifo(d / "model.yaml")
    with pytest.raises(ConfigError, match="model.yaml: not a regular file"):   # was: blocked forever
        Registry(tmp_path / "models").entries()


@pytest.mark.parametrize("arch, expect", [
    ({"growth_rate": "12"}, "growth_rate must be an integer"),
    ({"foo": 1}, r"architecture\.foo: unknown field"),
    ({"block_config": [1_000_000_000]}, "more than 1000 dense layers"),
    ({"growth_rate": 4000}, "growth_rate 4000 is more than 1,024"),
])
def test_architecture_out_of_bounds_is_a_config_error(tmp_path, digits_v3, arch, expect):
    _entry(tmp_path, digits_v3, **arch)
    entry = Registry(tmp_path / "models").resolve("digits:v3")
    with pytest.raises(ConfigError, match=expect):   # was: TypeError, a 1e9-step loop, or a 24 GB allocation
        entry.densenet_config()


def test_network_larger_than_its_weights_file_is_never_allocated(tmp_path, digits_v3, monkeypatch):
    """growth_rate 1000 is within bounds but needs 611M parameters; the 440 kB weights file cannot hold them."""
    _entry(tmp_path, digits_v3, growth_rate=1000)
    entry = Registry(tmp_path / "models").resolve("digits:v3")
    from sentinel.reference import densenet

    def refuse(*a, **k):
        raise AssertionError("the network was allocated before its weights were checked against it")

    monkeypatch.setattr(densenet, "DenseNet", refuse)
    with pytest.raises(WeightsError, match="cannot hold the 611,117,114 parameters"):
        entry.build_model()
