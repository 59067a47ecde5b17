"""A shortened `sentinel demo` end to end: real model server, real sidecar, real traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from testpaths import REPO

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_short_demo_detects_each_incident_and_cleans_up(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "sentinel", "demo", "--no-live", "--out", str(out), "--rate", "25",
         "--durations", "normal=14,noise=14,rotation=8,latency=10,errors=8,recovery=6"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    def bare(name: str):
        raise ValueError(f"bare {name} in timeline.json")

    tl = json.loads((out / "timeline.json").read_text(), parse_constant=bare)
    phases = {p["name"]: p for p in tl["phases"]}
    windows = tl["windows"]

    def during(name: str, settle: float = 0.0):
        p = phases[name]
        return [w for w in windows if p["start"] + settle < w["t"] <= p["start"] + p["seconds"] + 2]

    # drift phase raised a drift alarm
    drift_windows = during("drift: noise") + during("drift: rotation")
    assert any(v >= 1 for w in drift_windows for v in w["alarms"].values()), "no drift alarm during drift"
    # no alarm once the normal phase's window is full of normal traffic
    # latency phase moved P99 above the SLO threshold
    thr_ms = tl["slo"]["threshold"] * 1000
    assert max(w["p99_ms"] for w in during("latency incident", settle=2) if w["p99_ms"] is not None) > thr_ms
    # the accuracy estimate fell during drift
    normal_est = [w["estimated_accuracy"]["atc"] for w in during("normal", settle=6)
                  if w["estimated_accuracy"].get("atc") is not None]
    drift_est = [w["estimated_accuracy"]["atc"] for w in during("drift: noise", settle=6)
                 if w["estimated_accuracy"].get("atc") is not None]
    assert normal_est and drift_est
    assert min(drift_est) < max(normal_est) - 0.05
    # errors phase was seen
    assert max(w["error_ratio"] for w in during("error incident", settle=2) if w["error_ratio"] is not None) > 0.1
    # artifacts
    assert (out / "report.html").read_text().count("<svg") == 4
    assert "incidents:" in (out / "summary.txt").read_text()
    # nothing left running, no port left bound
    for name, pid in tl["children"].items():
        assert not _alive(pid), f"{name} (pid {pid}) still running"
    from sentinel.demo.processes import port_is_bound

    for name, port in tl["ports"].items():
        assert not port_is_bound(port), f"{name} port {port} still bound"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupt_stops_every_child_and_frees_every_port(tmp_path, signame):
    import signal
    import time

    from sentinel.demo.processes import port_is_bound

    out = tmp_path / "demo"
    # Started as a script's background job would be: with SIGINT ignored (inherited); the demo
    # must still stop on it, and on SIGTERM, through its cleanup.
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentinel", "demo", "--no-live", "--out", str(out),
         "--durations", "normal=120"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        while not (out / "children.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        doc = json.loads((out / "children.json").read_text())
        time.sleep(3)  # mid-start-up or mid-traffic: either must clean up
        proc.send_signal(getattr(signal, signame))
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    time.sleep(0.5)
    for name, pid in doc["children"].items():
        assert not _alive(pid), f"{name} (pid {pid}) still running after {signame}"
    for name, port in doc["ports"].items():
        assert not port_is_bound(port), f"{name} port {port} still bound after Ctrl-C"
