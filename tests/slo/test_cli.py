"""`sentinel rules` / `sentinel dashboards` from the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rulefiles import keep_test_groups
from typer.testing import CliRunner

from sentinel.cli import app

REPO = Path(__file__).resolve().parents[2]


def test_generate_writes_rules_tests_and_prometheusrule(tmp_path):
    res = CliRunner().invoke(app, ["rules", "generate", "--slo", str(REPO / "slo.yaml"), "-o", str(tmp_path / "r"),
                                   "--prometheusrule", str(tmp_path / "pr.yaml")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "r").rglob("*.yml")) == [
        "sentinel-ops.rules.yml", "sentinel-slo.rules.yml", "sentinel-slo.test.yml"]
    assert (tmp_path / "pr.yaml").exists()
    assert "digits/availability (0.999): Workbook detection 52s, pages within 1m, resolves within 6m" in res.output


def test_generate_can_skip_the_prometheusrule(tmp_path):
    res = CliRunner().invoke(app, ["rules", "generate", "--slo", str(REPO / "slo.yaml"), "-o", str(tmp_path),
                                   "--no-prometheusrule"])
    assert res.exit_code == 0, res.output
    assert "prometheusrule" not in res.output


def _sentinel(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "sentinel", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_invalid_slo_file_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "slo.yaml"
    bad.write_text("slos: [{name: l, model: m, objective: 0.99, sli: latency}]\n")
    proc = _sentinel("rules", "generate", "--slo", str(bad), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{bad}: slos[0].threshold: required for a latency SLI" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rules_test_without_promtool_says_so_and_exits_2(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty directory: no promtool
    proc = _sentinel("rules", "test", "--rules", str(REPO / "rules"), env=env)
    assert proc.returncode == 2
    assert "promtool not found on PATH" in proc.stderr
    assert "Traceback" not in proc.stderr



@pytest.mark.slow
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_rules_test_with_a_relative_rules_directory(tmp_path):
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    keep_test_groups(tmp_path / "rules", "no sentinel series")   # the path handling is the point: one short group
    proc = _sentinel("rules", "test", "--rules", "rules", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
