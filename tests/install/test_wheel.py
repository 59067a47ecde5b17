"""The wheel is complete: built from the repository, installed into an empty venv (base
dependencies only, no torch), it finds its bundled registry, golden set and example files
from a directory that has none of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCES = ("sentinel", "models", "golden_sets", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md",
           "slo.yaml", "sentinel.yaml", "constraints.txt", "LICENSE")
BUNDLED = ("sentinel/_bundled/models/digits/v3/model.yaml", "sentinel/_bundled/models/digits/v3/model.onnx",
           "sentinel/_bundled/models/digits/v3/model.features.onnx",
           "sentinel/_bundled/models/digits/v3/model.safetensors", "sentinel/_bundled/models/digits/v2/model.yaml",
           "sentinel/_bundled/golden_sets/digits/v3/manifest.json", "sentinel/_bundled/golden_sets/digits/v3/inputs.npy",
           "sentinel/_bundled/slo.yaml", "sentinel/_bundled/sentinel.yaml")

pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the repository's sources (the checkout is not written to)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_bundled"))
        else:
            shutil.copy2(p, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, timeout=300, env=_clean_env())
    (whl,) = dist.glob("sentinel_densenet-*.whl")
    return whl


def test_wheel_carries_the_bundled_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in BUNDLED if n not in names]
    assert not missing, missing
    assert not any(n.startswith(("models/", "golden_sets/", "tests/")) for n in names)


def test_wheel_carries_its_license_and_type_marker(wheel):
    """pyproject says Apache-2.0: the text travels with the wheel; py.typed lets mypy users check against sentinel."""
    zf = zipfile.ZipFile(wheel)
    names = set(zf.namelist())
    assert "sentinel/py.typed" in names
    (lic,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")]
    assert "Apache License" in zf.read(lic).decode() and "Version 2.0" in zf.read(lic).decode()


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """An empty venv (no system site-packages) with the wheel and its base dependencies only."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    t0 = time.monotonic()
    r = subprocess.run([str(root / "bin/python"), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
                        str(wheel)], timeout=900, env=_clean_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"base install: {time.monotonic() - t0:.1f}s")
    return root


def _run(venv: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin/sentinel"), *args], cwd=cwd, env=_clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_base_install_has_no_torch_kserve_or_sklearn(venv):
    for dist in ("torch", "kserve", "scikit-learn", "onnx"):
        r = subprocess.run([str(venv / "bin/python"), "-m", "pip", "show", "-q", dist], capture_output=True,
                           timeout=60, env=_clean_env())
        assert r.returncode != 0, f"{dist} is installed in the base venv"


def test_models_list_and_golden_from_an_empty_directory(venv, tmp_path):
    r = _run(venv, "models", "list", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {(x["name"], x["version"]): x for x in json.loads(r.stdout)}
    assert set(rows) == {("digits", "v2"), ("digits", "v3")}
    assert all(x["weights_ok"] for x in rows.values())
    assert "site-packages/sentinel/_bundled/models/digits/v3" in rows[("digits", "v3")]["weights"]
    code = ("from sentinel.registry import data_home, example_file\n"
            "from sentinel.golden import default_golden_root\n"
            "print(data_home()); print(default_golden_root()); print(example_file('slo.yaml'))\n")
    r = subprocess.run([str(venv / "bin/python"), "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    home, golden, slo = r.stdout.split()
    assert home.endswith("site-packages/sentinel/_bundled") and golden == home + "/golden_sets"
    assert Path(slo).is_file()
    assert list(tmp_path.iterdir()) == []


def test_replay_v3_from_an_empty_directory(venv, tmp_path):
    """`sentinel replay --model v3` with the bundled golden set against the bundled ONNX model."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = subprocess.run([str(venv / "bin/python"), "-c", "import sentinel, pathlib; print(pathlib.Path("
                           "sentinel.__file__).parent)"], capture_output=True, text=True, check=True,
                          env=_clean_env(), cwd=tmp_path).stdout.strip()
    server = subprocess.Popen([str(venv / "bin/python"), str(HERE / "onnx_model_server.py"),
                               f"{site}/_bundled/models/digits/v3/model.onnx", str(port)], env=_clean_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "ONNX model server did not start"
            time.sleep(0.2)
        r = _run(venv, "replay", "--model", "v3", "--target", f"http://127.0.0.1:{port}", "--send", "inputs",
                 "--count", "40", "--rate", "40", "--min-agreement", "1.0", "--json", "-", cwd=tmp_path)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "agree" in r.stdout
    finally:
        server.terminate()
        server.wait(10)


def test_sidecar_runs_drift_with_onnxruntime_in_the_base_venv(venv, tmp_path):
    """`sentinel run` from the base install: proxy, analysis worker and shadow on the bundled export."""
    from test_without_torch import check_sidecar

    home = subprocess.run([str(venv / "bin/python"), "-c", "from sentinel.registry import bundled_home; "
                           "print(bundled_home())"], capture_output=True, text=True, check=True, env=_clean_env(),
                          cwd=tmp_path).stdout.strip()
    assert home.endswith("site-packages/sentinel/_bundled")
    check_sidecar(tmp_path, python=str(venv / "bin/python"), env=_clean_env(), home=Path(home))
