"""`sentinel replay` against real `sentinel serve` processes: protocols, exit codes, stalls, canary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry
from servers import REPO, free_port, start_model_server

from sentinel.replay.report import Objectives
from sentinel.replay.runner import LoadPlan
from sentinel.replay.session import ReplaySpec, run_replay

pytestmark = pytest.mark.slow


def sentinel(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sentinel", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server():
    with start_model_server("digits:v3") as url:
        yield url


@pytest.mark.parametrize("protocol,binary", [("v2", False), ("v2", True), ("v1", False), ("torchserve", False)])
def test_every_protocol_agrees_with_the_reference(server, digits_v3, digits_golden, protocol, binary):
    spec = ReplaySpec(target=server, protocol=protocol, model_path_name="digits", binary=binary, samples=20)
    rep = run_replay(digits_v3, digits_golden, spec, LoadPlan(concurrency=2), Objectives(max_error_ratio=0))
    d = rep.doc
    assert rep.passed, rep.doc["objectives"]
    assert d["sent"] == 20 and d["errors"] == 0 and d["agreement"] == 1.0
    assert d["prob_max_abs"] < 1e-5
    assert (d["logits_max_abs"] is not None) == (protocol == "v2")


def test_cli_json_report_has_the_documented_fields(server, tmp_path):
    out = tmp_path / "r.json"
    r = sentinel("replay", "--model", "v3", "--target", server, "--rate", "50", "--count", "40",
                 "--p99-ms", "5000", "--json", str(out))
    assert r.returncode == 0, r.stderr + r.stdout
    d = json.loads(out.read_text())
    for key in ("sent", "errors", "agreement", "mismatches", "achieved_rps", "errors_by_kind"):
        assert key in d
    for kind in ("corrected", "uncorrected"):
        assert set(d["latency_ms"][kind]) >= {"p50", "p90", "p95", "p99", "p999", "max"}
    assert d["sent"] == 40 and d["agreement"] == 1.0 and d["mismatches"] == []
    assert "corrected" in r.stdout and "\x1b[" not in r.stderr  # no progress bar when not a TTY


def test_missed_latency_objective_exits_1_saying_by_how_much(server):
    r = sentinel("replay", "--model", "v3", "--target", server, "--concurrency", "1", "--count", "5",
                 "--p99-ms", "0.001", "--quiet")
    assert r.returncode == 1
    assert "P99 latency" in r.stderr and "exceeds 0.001 ms by" in r.stderr


def test_server_without_normalization_is_an_agreement_violation_exit_1(tmp_path):
    out = tmp_path / "r.json"
    with start_model_server("digits:v3", skip_normalization=True) as url:
        r = sentinel("replay", "--model", "v3", "--target", url, "--protocol", "v1", "--concurrency", "2",
                     "--count", "30", "--json", str(out))
    assert r.returncode == 1, r.stderr + r.stdout
    d = json.loads(out.read_text())
    assert d["agreement"] < 1.0 and d["mismatches"]
    assert {"id", "expected", "served", "prob_max_abs"} <= set(d["mismatches"][0])
    assert "agreement" in r.stderr and "below 100.00%" in r.stderr


def test_a_one_second_stall_shows_in_corrected_percentiles_not_in_uncorrected(digits_v3, digits_golden):
    # One connection, like a closed-loop tester: requests due during the stall queue behind it.
    # Measured from the intended send time they are ~10 slow requests; measured from the
    # actual send only the stalled one is slow (coordinated omission).
    with start_model_server("digits:v3", stall_after=15, stall_seconds=1.0) as url:
        spec = ReplaySpec(target=url, protocol="v2", model_path_name="digits")
        rep = run_replay(digits_v3, digits_golden, spec, LoadPlan(rate=10, count=60, connections=1), Objectives())
    c, u = rep.doc["latency_ms"]["corrected"], rep.doc["latency_ms"]["uncorrected"]
    assert c["p99"] >= 800, c
    assert c["p90"] >= 200 and c["p90"] > 2 * u["p90"], (c, u)
    assert u["max"] >= 900, u          # the uncorrected view still shows the one stalled request
    assert rep.doc["errors"] == 0


def test_open_loop_default_connections_see_the_stall_too(digits_v3, digits_golden):
    with start_model_server("digits:v3", stall_after=10, stall_seconds=1.0) as url:
        spec = ReplaySpec(target=url, protocol="v1", model_path_name="digits")
        rep = run_replay(digits_v3, digits_golden, spec, LoadPlan(rate=10, count=40), Objectives(p99_ms=500))
    assert not rep.passed and rep.doc["latency_ms"]["corrected"]["p99"] >= 800


def test_unreachable_target_exits_2():
    r = sentinel("replay", "--model", "v3", "--target", f"http://127.0.0.1:{free_port()}", "--count", "3")
    assert r.returncode == 2
    assert "target unreachable" in r.stderr


def test_golden_set_failing_its_check_exits_2(tmp_path, server):
    import shutil

    bad = tmp_path / "golden"
    shutil.copytree(REPO / "golden_sets" / "digits" / "v3", bad)
    with open(bad / "probabilities.npy", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    r = sentinel("replay", "--model", "v3", "--target", server, "--golden", str(bad), "--count", "3")
    assert r.returncode == 2, r.stderr
    assert "probabilities.npy" in r.stderr and "sha256" in r.stderr


def test_canary_records_metrics_on_the_given_registry(server, digits_v3, digits_golden):
    from sentinel.replay.canary import CANARY_HEADER, Canary
    from sentinel.replay.session import select_samples
    from sentinel.replay.wire import WireFormat

    reg = CollectorRegistry()
    canary = Canary(model=digits_v3.spec, target=server, wire=WireFormat("v2", "digits"),
                    samples=select_samples(digits_v3, digits_golden), registry=reg, count=6, rate=20)
    assert f"{CANARY_HEADER}: 1".encode() in canary._replayer._requests[0]
    run = canary.run_once()
    assert run.sent == 6 and run.errors == 0 and run.agreed == 6
    labels = {"model": "digits:v3"}
    assert reg.get_sample_value("sentinel_replay_requests_total", {**labels, "result": "ok"}) == 6
    assert reg.get_sample_value("sentinel_replay_duration_seconds_count", labels) == 6
    assert reg.get_sample_value("sentinel_reference_agreement_total",
                                {**labels, "source": "replay", "result": "agree"}) == 6


def test_canary_against_a_dead_target_counts_errors_and_does_not_raise(digits_v3, digits_golden):
    from sentinel.replay.canary import Canary
    from sentinel.replay.session import select_samples
    from sentinel.replay.wire import WireFormat

    reg = CollectorRegistry()
    canary = Canary(model="digits:v3", target=f"http://127.0.0.1:{free_port()}", wire=WireFormat("v2", "digits"),
                    samples=select_samples(digits_v3, digits_golden), registry=reg, count=3, rate=50)
    run = canary.run_once()
    assert run.errors == 3
    assert reg.get_sample_value("sentinel_replay_requests_total", {"model": "digits:v3", "result": "error"}) == 3


def test_canary_from_config_in_a_thread(server):
    import time

    from sentinel.config import Config, ModelConfig, ReplayConfig
    from sentinel.replay.canary import Canary

    cfg = Config(models=(ModelConfig(name="digits", version="v3", endpoint=server),),
                 registry=str(REPO / "models"), golden_sets=str(REPO / "golden_sets"),
                 replay=ReplayConfig(canary_interval_s=3600, canary_samples=4, canary_rate=20))
    reg = CollectorRegistry()
    canary = Canary.from_config(cfg, "digits", reg)
    canary.start()
    deadline = time.monotonic() + 30
    while canary.last is None and time.monotonic() < deadline:
        time.sleep(0.05)
    canary.stop()
    assert canary.last is not None and canary.last.agreed == 4
    assert reg.get_sample_value("sentinel_reference_agreement_total",
                                {"model": "digits", "source": "replay", "result": "agree"}) == 4
