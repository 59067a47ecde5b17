"""What a user of an installed package meets outside the checkout: the generators find the
shipped example SLO file from any directory, and `sentinel serve` in a base install (no torch,
kserve or fastapi) names the extra instead of printing a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# What a base install (no extras) lacks: the blocker's list plus kserve's own web stack.
BASE_MISSING = ("torch", "torchvision", "kserve", "sklearn", "onnx", "onnxscript", "fastapi", "uvicorn",
                "starlette")


def _sentinel(*args: str, cwd: Path, pythonpath: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(pythonpath or []), str(REPO)])
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "sentinel", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("args", "written"), [
    (["rules", "generate", "-o", "out"], "out/sentinel-slo.rules.yml"),
    (["dashboards", "generate", "-o", "out"], "out/sentinel-overview.json"),
    (["gate", "templates", "-o", "out"], "out/argo"),
])
def test_generators_use_the_shipped_slo_file_from_an_empty_directory(tmp_path, args, written):
    r = _sentinel(*args, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert (tmp_path / written).exists(), r.stdout
    assert "using the example SLO file" in r.stderr and "slo.yaml" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_generators_prefer_the_slo_file_in_the_current_directory(tmp_path):
    (tmp_path / "slo.yaml").write_text((REPO / "slo.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    r = _sentinel("rules", "generate", "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "example SLO file" not in r.stderr
    r = _sentinel("rules", "generate", "--slo", "missing.yaml", "-o", "out", cwd=tmp_path)
    assert r.returncode == 2 and "missing.yaml: file not found" in r.stderr


def test_serve_without_fastapi_names_the_extra(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = frozenset({BASE_MISSING!r})\n"
        "class _Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Blocker())\n", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    r = _sentinel("serve", "--model", "digits:v3", cwd=work, pythonpath=[str(blocker)])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == "error: sentinel serve needs PyTorch: pip install 'sentinel-densenet[serve]'"


def test_serve_names_fastapi_as_the_serve_extra():
    from sentinel.errors import missing_extra

    exc = ModuleNotFoundError("No module named 'fastapi'", name="fastapi")
    extra = missing_extra(exc, "sentinel serve", "serve")
    assert extra is not None and str(extra) == "sentinel serve needs kserve: pip install 'sentinel-densenet[serve]'"


@pytest.fixture
def wheel_layout(tmp_path, monkeypatch):
    """An installed package's layout: no checkout, the example data in sentinel/_bundled (a copy)."""
    import shutil

    from sentinel import registry

    bundled = tmp_path / "site-packages" / "sentinel" / "_bundled"
    shutil.copytree(REPO / "models" / "digits" / "v3", bundled / "models" / "digits" / "v3")
    shutil.copy(REPO / "sentinel.yaml", bundled / "sentinel.yaml")
    monkeypatch.setattr(registry, "source_checkout", lambda: None)
    monkeypatch.setattr(registry, "bundled_home", lambda: bundled)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return bundled


@pytest.mark.parametrize("args", [["models", "init", "densenet121", "--seed", "0"], ["export", "--model", "v3"],
                                  ["models", "import", "w.pth", "--arch", "densenet121", "--name", "digits",
                                   "--version", "v9"]],
                         ids=["models-init", "export", "models-import"])
def test_write_commands_never_write_into_the_installed_package(wheel_layout, args):
    """From a wheel install with no ./models, `models init` wrote 32 MB of random weights into
    site-packages and `export` overwrote the bundled model.onnx and model.yaml."""
    from typer.testing import CliRunner

    from sentinel.cli import app
    from sentinel.errors import UsageError

    before = {p: p.stat().st_mtime_ns for p in wheel_layout.rglob("*")}
    r = CliRunner().invoke(app, args)
    assert isinstance(r.exception, UsageError), r.output   # exit 2 through sentinel's own entry point
    assert "inside the installed package's example data" in str(r.exception)
    assert {p: p.stat().st_mtime_ns for p in wheel_layout.rglob("*")} == before


def test_write_commands_still_write_to_a_registry_of_ones_own(wheel_layout, tmp_path):
    from sentinel.registry import refuse_bundled

    refuse_bundled(tmp_path / "work" / "models" / "x", "models init")   # not the bundled copy: no error
