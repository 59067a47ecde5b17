"""Commands pointed at a temporary directory write there and nowhere else (issue 16, item 5).

Each command runs with the repository as its working directory (the worst case: every
relative default resolves inside it) and its outputs pointed at tmp_path; the repository's
files (path, size, mtime) must be the same before and after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from servers import REPO

from sentinel.registry import Registry, sha256_file

pytestmark = pytest.mark.slow

_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".venv", ".mypy_cache", ".ruff_cache", ".hypothesis"}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root (caches and .git aside) with its size and modification time."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def sentinel(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sentinel", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_repo_untouched(before: dict[str, tuple[int, int]]) -> None:
    after = snapshot(REPO)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"added {added}, removed {removed}, changed {changed}"


def test_rules_generate_writes_only_under_out(tmp_path):
    before = snapshot(REPO)
    r = sentinel("rules", "generate", "--slo", "slo.yaml", "-o", str(tmp_path / "rules"))
    assert r.returncode == 0, r.stderr
    assert_repo_untouched(before)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["rules/sentinel-ops.rules.yml", "rules/sentinel-slo.rules.yml",
                       "rules/tests/sentinel-slo.test.yml"]


def test_rules_generate_writes_the_prometheusrule_only_where_told(tmp_path):
    before = snapshot(REPO)
    pr = tmp_path / "k8s" / "pr.yaml"
    r = sentinel("rules", "generate", "--slo", "slo.yaml", "-o", str(tmp_path / "rules"), "--prometheusrule", str(pr))
    assert r.returncode == 0, r.stderr
    assert_repo_untouched(before)
    assert "kind: PrometheusRule" in pr.read_text()


def test_export_outside_the_registry_leaves_model_yaml_alone_and_is_reproducible(tmp_path):
    """Re-exporting the bundled digits:v3 gives the bytes committed as models/digits/v3/model.onnx."""
    import onnx
    import torch

    entry = Registry(REPO / "models").resolve("digits:v3")
    bundled = entry.directory / "model.onnx"
    if onnx.load(str(bundled)).producer_version != torch.__version__:
        pytest.skip(f"bundled export made by torch {onnx.load(str(bundled)).producer_version}, "
                    f"this is {torch.__version__}")
    before = snapshot(REPO)
    out = tmp_path / "x.onnx"
    r = sentinel("export", "--model", "v3", "--format", "onnx", "--dynamic-batch", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "not recorded in the registry" in r.stdout
    assert_repo_untouched(before)
    assert sha256_file(out) == sha256_file(bundled)
    assert entry.export("onnx", "fp32").sha256 == sha256_file(bundled)


def test_export_register_refuses_files_outside_the_model_directory(tmp_path):
    import shutil

    reg = tmp_path / "registry"
    shutil.copytree(REPO / "models" / "digits" / "v3", reg / "digits" / "v3")
    before = (reg / "digits" / "v3" / "model.yaml").read_bytes()
    out = tmp_path / "elsewhere" / "m.pt"
    r = sentinel("export", "--model", "digits:v3", "--registry", str(reg), "--format", "torchscript",
                 "-o", str(out), "--register")
    # model.yaml confines export paths to the model's directory: recording this one would break it
    assert r.returncode == 2 and "--register" in r.stderr and "outside" in r.stderr, r.stderr
    assert (reg / "digits" / "v3" / "model.yaml").read_bytes() == before
    inside = reg / "digits" / "v3" / "exports" / "m.pt"
    r = sentinel("export", "--model", "digits:v3", "--registry", str(reg), "--format", "torchscript",
                 "-o", str(inside), "--register")
    assert r.returncode == 0, r.stderr
    rec = [e for e in Registry(reg).resolve("digits:v3").manifest.exports if e.file.endswith("m.pt")]
    assert len(rec) == 1 and rec[0].sha256 == sha256_file(inside)


def test_verify_json_writes_only_the_report(tmp_path):
    before = snapshot(REPO)
    report = tmp_path / "reports" / "verify.json"   # a folder that does not exist yet is made
    r = sentinel("verify", "models/digits/v3/model.onnx", "--model", "v3", "--json", str(report), "--quiet")
    assert r.returncode == 0, r.stderr
    assert_repo_untouched(before)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["reports", "reports/verify.json"]
    assert '"passed": true' in report.read_text()
