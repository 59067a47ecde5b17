"""`sentinel gpu ...` on this machine, which has no GPU and no NVIDIA driver."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gpu_fakes import nvml_works
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.errors import UsageError
from sentinel.gpu.memory import estimate, max_batch_that_fits
from sentinel.reference.densenet import ARCHS

no_gpu = pytest.mark.skipif(nvml_works(), reason="this machine has a working NVIDIA driver")


def sentinel(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sentinel", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@no_gpu
def test_status_json_says_unavailable_and_exits_0(tmp_path):
    res = sentinel("gpu", "status", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["available"] is False
    assert "libnvidia-ml.so.1" in st["reason"]
    assert st["devices"] == []


@no_gpu
def test_status_text_says_plainly_there_is_no_gpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["gpu", "status"])
    assert res.exit_code == 0
    assert res.output.startswith("No GPU visible: libnvidia-ml.so.1 could not be loaded")


@no_gpu
def test_selfcheck_without_gpu_exits_2_saying_why(tmp_path):
    res = sentinel("gpu", "selfcheck", cwd=tmp_path)
    assert res.returncode == 2
    assert "no NVIDIA GPU is visible" in res.stderr and "did not run" in res.stderr


@no_gpu
def test_selfcheck_skip_ok_exits_0_with_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["gpu", "selfcheck", "--skip-ok"])
    assert res.exit_code == 0
    assert res.output.startswith("skipped: no NVIDIA GPU is visible")


def test_estimate_json_matches_the_model():
    res = CliRunner().invoke(app, ["gpu", "estimate", "--arch", "densenet121", "--batch", "64", "--res", "224",
                                   "--dtype", "fp16", "--fit-in", "16GiB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    want = estimate(ARCHS["densenet121"], batch=64, resolution=224, dtype="fp16")
    assert out["activation_peak_bytes"] == want.activation_peak_bytes
    assert out["total_bytes"] == want.total_bytes
    assert out["max_batch"] == max_batch_that_fits(ARCHS["densenet121"], 16 << 30, resolution=224, dtype="fp16")
    assert out["mode"] == "inference" and out["parameters"] == 7_978_856


def test_estimate_text_training_memory_efficient():
    res = CliRunner().invoke(app, ["gpu", "estimate", "--arch", "densenet169", "--batch", "8", "--train",
                                   "--memory-efficient"])
    assert res.exit_code == 0, res.output
    assert "training (memory-efficient)" in res.output and "activation peak" in res.output


def test_estimate_rejects_memory_efficient_without_train_and_unknown_arch():
    res = CliRunner().invoke(app, ["gpu", "estimate", "--memory-efficient"])
    assert isinstance(res.exception, UsageError) and res.exception.exit_code == 2
    assert "--memory-efficient applies to training only" in str(res.exception)
    res = CliRunner().invoke(app, ["gpu", "estimate", "--arch", "resnet50"])
    assert res.exit_code != 0 and "unknown architecture 'resnet50'" in str(res.exception)
