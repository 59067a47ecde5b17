"""Config validation, `sentinel config check`, and the CLI's light imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from testpaths import REPO

from sentinel.config import load_config
from sentinel.errors import ConfigError


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sentinel", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_example_config_is_valid():
    cfg = load_config(REPO / "sentinel.yaml")
    assert cfg.model().name == "digits" and cfg.model().version == "v3"
    assert cfg.analysis.store_payloads is False


def test_every_error_names_file_and_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "listen: nowhere\n"
        "models:\n"
        "  - {name: digits, version: v3, protocl: v2, endpoint: 'ftp://x'}\n"
        "drift: {alpha: 1.5, window_size: 3}\n"
        "sampling: {rate: -1}\n"
        "analysis: {worker_scheduling: idle}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(p)
    lines = err.value.problems
    assert f"{p}: listen: expected host:port, got 'nowhere'" in lines
    assert any(line.startswith(f"{p}: models[0].protocl: unknown field (did you mean 'protocol'?)") for line in lines)
    assert f"{p}: models[0].endpoint: expected an http(s) URL, got 'ftp://x'" in lines
    assert f"{p}: drift.alpha: must be between 0 and 1, got 1.5" in lines
    assert f"{p}: drift.window_size: must be at least 10" in lines
    assert f"{p}: sampling.rate: must be between 0 and 1, got -1.0" in lines
    assert f"{p}: analysis.worker_scheduling: must be 'normal' or 'batch', got 'idle'" in lines


def test_missing_models_and_bad_yaml(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("listen: 127.0.0.1:1\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: models: required field is missing") as info:
        load_config(p)
    # said once, by its field: not again as the constructor's "missing 1 required positional argument"
    assert info.value.problems == [f"{p}: models: required field is missing"]
    q = tmp_path / "broken.yaml"
    q.write_text("models: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+, column \d+: invalid YAML"):
        load_config(q)


def test_config_check_exit_codes(tmp_path):
    ok = run_cli("config", "check", "sentinel.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: digits, version: v3, protocol: v9}\n")
    res = run_cli("config", "check", str(bad))
    assert res.returncode == 2
    assert f"{bad}: models[0].protocol: must be one of 'v2', 'v1', 'torchserve', got 'v9'" in res.stderr
    assert "Traceback" not in res.stderr


def test_version():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("sentinel ")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_does_not_import_heavy_modules(argv):
    code = (
        "import sys\n"
        f"sys.argv = ['sentinel', *{argv!r}]\n"
        "from sentinel.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'scipy', 'onnx', 'sklearn', 'kserve') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "HEAVY=" in res.stdout, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "HEAVY=", res.stdout


def test_help_lists_command_groups():
    res = run_cli("--help")
    for group in ("config", "models", "golden"):
        assert group in res.stdout
