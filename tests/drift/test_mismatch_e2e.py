"""End to end: `sentinel serve` + `sentinel run` at 100% sampling; a client starts sending 0–255 inputs.

Within 50 such requests the ATC lower bound on /metrics is below 0.5, the contract violation
counter has counted every bad request, and /status names the evaluation the metrics came from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

pytestmark = pytest.mark.slow


def _body(img: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                                   "data": [float(v) for v in img.ravel()]}]}).encode()


def _metrics(admin: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(m: dict, name: str, **labels: str) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


def _wait_for(cond, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_wrong_scale_client_pulls_the_lower_bound_below_half_within_50_requests(tmp_path):
    from servers import free_port, start_model_server

    from sentinel.registry import Registry
    from sentinel.training.digits import load_split

    entry = Registry(REPO / "models").resolve("digits:v3")
    images, _, _ = load_split()
    hold = images[np.random.default_rng(1).permutation(np.asarray(entry.manifest.split.holdout))]
    with start_model_server("digits:v3") as model_url:
        port, admin = free_port(), free_port()
        cfg = tmp_path / "sentinel.yaml"
        cfg.write_text(
            f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\nupstream: {model_url}\n"
            f"models:\n  - {{name: digits, version: v3, protocol: v2}}\n"
            f"registry: {REPO / 'models'}\ngolden_sets: {REPO / 'golden_sets'}\n"
            "sampling: {rate: 1.0, max_per_second: 1000}\nreplay: {canary_interval_s: 0}\ngpu: {enabled: 'off'}\n"
            "drift: {window_size: 200, evaluate_every: 25, shadow: true, shadow_max_per_second: 200}\n")
        log = (tmp_path / "sentinel.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "sentinel", "run", "--config", str(cfg)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_for(lambda: _ok(f"http://127.0.0.1:{admin}/healthz"), 60)
            with httpx.Client(timeout=30) as client:
                def send(imgs: np.ndarray) -> None:
                    for img in imgs:
                        r = client.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", content=_body(img),
                                        headers={"Content-Type": "application/json"})
                        assert r.status_code == 200, r.text

                def decoded() -> float:
                    return _value(_metrics(admin), "sentinel_samples_total", model="digits",
                                  outcome="decoded") or 0.0

                send(hold[:200])
                _wait_for(lambda: decoded() >= 200, 180)
                m = _metrics(admin)
                clean_lower = _value(m, "sentinel_estimated_accuracy_ratio", model="digits", method="atc_lower")
                assert clean_lower is not None and clean_lower > 0.9
                assert _value(m, "sentinel_input_contract_violating_samples_total", model="digits") == 0.0
                send(hold[200:250] * (255.0 / 16.0))             # one client now sends 0–255
                _wait_for(lambda: decoded() >= 250, 180)
                m = _metrics(admin)
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()
    lower = _value(m, "sentinel_estimated_accuracy_ratio", model="digits", method="atc_lower")
    assert lower is not None and lower < 0.5, (lower, (tmp_path / "sentinel.log").read_text()[-3000:])
    assert _value(m, "sentinel_input_contract_violating_samples_total", model="digits") == 50.0
    assert _value(m, "sentinel_input_contract_violations_total", model="digits", check="out_of_range") == 50.0
    assert _value(m, "sentinel_accuracy_verdicts_total", model="digits", verdict="unknown") >= 50.0
    assert _value(m, "sentinel_accuracy_estimate_reliable", model="digits") == 0.0


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
