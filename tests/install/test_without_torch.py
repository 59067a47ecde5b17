"""The sidecar and the read-only commands with torch, kserve, scikit-learn and onnx unimportable.

Every Python process these tests start has tests/install/blocker on PYTHONPATH, whose
sitecustomize makes those imports fail as they would in a base-only install (the analysis
worker, a separate process, included). The model server is the registry's ONNX export on
onnxruntime (onnx_model_server.py), since `sentinel serve` needs the serve extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BLOCKED = ("torch", "kserve", "sklearn", "onnx")


def blocked_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "blocker"), str(REPO)])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def sentinel(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sentinel", *args], cwd=cwd, env=blocked_env(),
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_blocker_blocks(tmp_path):
    code = ("import importlib\n"
            f"for m in {BLOCKED!r}:\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except ModuleNotFoundError as exc:\n"
            "        assert exc.name == m\n"
            "    else:\n"
            "        raise SystemExit(m + ' imported')\n"
            "import sentinel.cli\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=blocked_env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_read_only_commands_run_without_torch(tmp_path):
    r = sentinel("models", "list", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {(x["name"], x["version"]) for x in rows} >= {("digits", "v2"), ("digits", "v3")}
    assert all(x["parameters"] and x["weights_ok"] for x in rows)
    r = sentinel("gpu", "estimate", "--arch", "densenet121", "--batch", "4", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)
    r = sentinel("gpu", "status", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = sentinel("rules", "generate", "--slo", str(REPO / "slo.yaml"), "-o", str(out / "rules"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list((out / "rules").glob("*.yml")) or list((out / "rules").glob("*.yaml"))
    r = sentinel("dashboards", "generate", "--slo", str(REPO / "slo.yaml"), "-o", str(out / "dash"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list((out / "dash").glob("*.json"))) == 3
    r = sentinel("golden", "check", str(REPO / "golden_sets/digits/v3"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["export", "--model", "digits:v3", "-o", "x.onnx"],
     "sentinel export needs PyTorch: pip install 'sentinel-densenet[torch]'"),
    (["serve", "--model", "digits:v3"], "sentinel serve needs PyTorch: pip install 'sentinel-densenet[serve]'"),
    (["demo"], "sentinel demo needs PyTorch: pip install 'sentinel-densenet[serve]'"),
])
def test_commands_that_need_an_extra_say_which(tmp_path, args, message):
    r = sentinel(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def onnx_server(port: int, *, python: str, env: dict[str, str], model: Path):
    proc = subprocess.Popen([python, str(HERE / "onnx_model_server.py"), str(model), str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(proc, f"http://127.0.0.1:{port}/v2/health/ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _wait(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout}s")


@pytest.mark.slow
def test_sidecar_proxies_and_computes_drift_with_onnxruntime(tmp_path):
    """`sentinel run`: proxy, analysis worker, shadow and embeddings from the registered features export."""
    check_sidecar(tmp_path, python=sys.executable, env=blocked_env(), home=REPO)


def check_sidecar(tmp_path: Path, *, python: str, env: dict[str, str], home: Path) -> None:
    """Start an ONNX model server and `sentinel run` before it (with `python`, `env`, the registry and
    golden sets under `home`), send golden inputs, and wait for a drift verdict with an onnxruntime shadow."""
    from sentinel.golden import load_golden

    golden = load_golden(REPO / "golden_sets/digits/v3")
    up, port, admin = free_port(), free_port(), free_port()
    cfg = tmp_path / "sentinel.yaml"
    cfg.write_text("\n".join([
        f"listen: 127.0.0.1:{port}", f"admin: 127.0.0.1:{admin}", f"upstream: http://127.0.0.1:{up}",
        f"registry: {home / 'models'}", f"golden_sets: {home / 'golden_sets'}",
        "models:", f"  - {{name: digits, version: v3, protocol: v2, endpoint: 'http://127.0.0.1:{up}'}}",
        "sampling: {rate: 1.0, max_per_second: 1000}",
        "drift: {window_size: 40, evaluate_every: 20, shadow: true, shadow_max_per_second: 1000}",
        "replay: {canary_interval_s: 0}",
    ]) + "\n")
    with onnx_server(up, python=python, env=env, model=home / "models/digits/v3/model.onnx"):
        proc = subprocess.Popen([python, "-m", "sentinel", "run", "--config", str(cfg)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _wait(proc, f"http://127.0.0.1:{admin}/healthz")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                for i in range(0, 80, 4):
                    x = golden.inputs[i:i + 4]
                    r = c.post("/v2/models/digits/infer", json={"inputs": [
                        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
                    assert r.status_code == 200, r.text
                    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(len(x), -1)
                    assert (got.argmax(1) == golden.logits[i:i + 4].argmax(1)).all()
            deadline = time.monotonic() + 90
            status: dict = {}
            while time.monotonic() < deadline:
                status = httpx.get(f"http://127.0.0.1:{admin}/status", timeout=5).json()
                model = _analysis_of(status, "digits")
                if model and model.get("last") and model.get("shadow", {}).get("backend"):
                    break
                time.sleep(0.5)
            model = _analysis_of(status, "digits")
            assert model, (status, _drain(proc))
            assert model["shadow"]["backend"] == "onnxruntime", model["shadow"]
            names = {d["name"] for d in model["last"]["detectors"]}
            assert {"bbsd", "embedding"} <= names
            emb = [d for d in model["last"]["detectors"] if d["name"] == "embedding"][0]
            assert not emb["abstained"], emb
            metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
            assert 'sentinel_reference_agreement_total{model="digits",result="agree",source="shadow"}' in metrics
        finally:
            if proc.poll() is None:
                proc.terminate()
            out = proc.communicate(timeout=30)[0].decode()
        assert "No module named" not in out, out


def _drain(proc: subprocess.Popen) -> str:
    """The daemon's log so far (stops it)."""
    proc.terminate()
    return proc.communicate(timeout=30)[0].decode()


def _analysis_of(status: dict, model: str) -> dict | None:
    """The analysis worker's last per-model status in /status."""
    return (status.get("last_results") or {}).get(model)
