"""`sentinel demo` edge cases without a full run: option checks before anything starts, the
report folder (a file, a second demo, a previous run's TSDB), children outliving the demo,
the last phase's figures, a dead child as an error line."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from testpaths import REPO

from sentinel.demo.observe import Window
from sentinel.demo.phases import Phase
from sentinel.demo.runner import Demo, DemoOptions, Timeline
from sentinel.errors import InfrastructureError, UsageError

pytestmark = pytest.mark.unit

PHASES = (Phase("normal", 10), Phase("error incident", 10, error_ratio=0.3, incident="errors"))


def _opts(out: Path, **kw) -> DemoOptions:
    return DemoOptions(phases=PHASES, out=out, repo=REPO, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"seed": -1}, "--seed must be a non-negative integer, got -1"),
    ({"rate": 1e9}, "--rate must be a positive number of requests per second of at most 1000"),
    ({"rate": math.nan}, "--rate must be a positive"),
    ({"rate": 0.0}, "--rate must be a positive"),
])
def test_bad_seed_and_rate_are_usage_errors(tmp_path, kw, message):
    with pytest.raises(UsageError) as exc:
        _opts(tmp_path / "d", **kw)
    assert message in str(exc.value)


def test_cli_exits_2_on_a_negative_seed_before_starting_anything(tmp_path):
    # It used to start the model server and the sidecar, then die with numpy's traceback.
    r = subprocess.run([sys.executable, "-m", "sentinel", "demo", "--seed", "-1", "--no-live", "--out",
                        str(tmp_path / "d")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--seed must be a non-negative integer" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("sub", ["", "below"])
def test_out_that_is_a_file_is_a_usage_error(tmp_path, sub):
    f = tmp_path / "taken"
    f.write_text("keep me\n")
    out = f / sub if sub else f
    with pytest.raises(UsageError, match=f"--out {out}: cannot use it as the report folder"):
        Demo(_opts(out)).start()
    assert f.read_text() == "keep me\n"


def test_a_second_demo_on_the_same_out_is_refused_until_the_first_ends(tmp_path):
    out = tmp_path / "d"
    first, second = Demo(_opts(out)), Demo(_opts(out))
    first.claim_out()
    with pytest.raises(UsageError, match=rf"another sentinel demo \(pid {os.getpid()}\) is writing there"):
        second.start()
    assert second.children.procs == []
    first.release_out()
    second.claim_out()
    second.release_out()


def test_a_previous_runs_tsdb_is_removed_before_prometheus_starts(tmp_path, monkeypatch):
    """Its ALERTS series (no instance label) merged with the rerun's: alerts reported as firing
    from before the rerun's traffic began."""
    import sentinel.demo.processes as processes
    import sentinel.demo.prom as prom

    out = tmp_path / "d"
    old = out / "tsdb"
    (old / "wal").mkdir(parents=True)
    (old / "wal" / "00000000").write_bytes(b"last run")
    started: list[list[str]] = []
    monkeypatch.setattr(prom.subprocess, "run", lambda *a, **k: None)
    monkeypatch.setattr(processes, "wait_ready", lambda *a, **k: None)
    demo = SimpleNamespace(opts=_opts(out), ports={"admin": 1},
                           children=SimpleNamespace(start=lambda name, argv: started.append(argv)))
    prom.start_prometheus(demo, out / "sentinel.demo.yaml")
    assert started and f"--storage.tsdb.path={old}" in started[0]
    assert not (old / "wal").exists()


def test_a_tsdb_folder_that_is_not_prometheus_is_refused_and_kept(tmp_path):
    from sentinel.demo.prom import fresh_tsdb

    mine = tmp_path / "tsdb"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not a Prometheus TSDB"):
        fresh_tsdb(mine)
    assert (mine / "notes.txt").read_text() == "mine"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_end_when_the_demo_is_killed(tmp_path):
    """The children run in their own sessions: a closed terminal (SIGHUP) or kill -9 of the
    demo left the model server and the sidecar running, ports bound."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from sentinel.demo.processes import Children\n"
        f"c = Children(Path({str(tmp_path)!r}))\n"
        "p = c.start('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    pid = int(r.stdout.split()[0])
    try:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the child outlived the demo"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_child_that_died_is_an_error_line_not_a_traceback(tmp_path):
    from sentinel.demo.processes import Children

    c = Children(tmp_path)
    p = c.start("model-server", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    p.wait(30)
    with pytest.raises(InfrastructureError, match="model-server exited with code 3; its log ends:\nboom"):
        c.check_alive()


def _win(t: float, rps: float) -> Window:
    return Window(t=t, rps=rps, p50_ms=10.0, p99_ms=20.0, error_ratio=0.0, slow_ratio=0.0, p_values={},
                  alarms={}, estimated_accuracy={"atc": 0.99}, shadow_agreement=1.0, canary_agreement=1.0,
                  samples={})


def test_the_last_phase_leaves_out_windows_after_the_traffic_ended():
    """Scrapes go on while the last answers come back; those windows (half or no traffic)
    pulled the last phase's rate and latency down (recovery at 19.1 rps of 20 sent)."""
    from sentinel.demo.summary import phase_table

    tl = Timeline(phase_starts=[0.0, 10.0],
                  windows=[_win(t, 20.0) for t in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20)]
                  + [_win(22, 10.0), _win(24, 0.0)])
    demo = SimpleNamespace(timeline=tl, opts=SimpleNamespace(phases=PHASES, window_s=6.0))
    rows = phase_table(demo)
    assert [r["rps"] for r in rows] == [20.0, 20.0]


def test_a_port_taken_before_the_model_server_binds_it_is_chosen_again(tmp_path, monkeypatch):
    """free_port() only finds a port free at that moment; another process could take it before the
    child binds it, and the demo failed ("address already in use")."""
    import socket

    import sentinel.demo.runner as runner

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    first = iter([taken.getsockname()[1]])
    real = runner.free_port
    monkeypatch.setattr(runner, "free_port", lambda: next(first, None) or real())
    demo = Demo(_opts(tmp_path / "out"))
    try:
        assert demo.ports["server"] == taken.getsockname()[1]
        demo.start()
        assert demo.ports["server"] != taken.getsockname()[1]
        assert all(p.poll() is None for _, p in demo.children.procs)   # the second attempt's children run
    finally:
        demo.stop()
        demo.release_out()
        taken.close()
