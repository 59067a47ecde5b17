"""`proxy.workers: 2` when a worker hangs before its first report (stopped or stuck while it starts).

Real processes and real signals: the first worker process is SIGSTOPped the instant it is
spawned, before its interpreter has imported anything.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from proxy_helpers import RunningSidecar, make_config, proxy_workers, wait_or_fail
from test_workers_death import ERRORS, OK, REQ, _post_fresh, _upstream

from sentinel.proxy import multiproc

pytestmark = pytest.mark.slow   # each test spawns interpreter processes


def _stop_first_start(monkeypatch) -> list[int]:
    """SIGSTOP the first worker process the instant it is spawned (its interpreter not even started)."""
    spawn = multiproc.WorkerSet._spawn
    stopped: list[int] = []

    def spawn_then_stop(self, w) -> None:   # type: ignore[no-untyped-def]
        spawn(self, w)
        if not stopped:
            os.kill(w.proc.pid, signal.SIGSTOP)
            stopped.append(w.proc.pid)

    monkeypatch.setattr(multiproc.WorkerSet, "_spawn", spawn_then_stop)
    return stopped


def test_worker_stopped_before_listening_is_restarted_after_startup_grace(monkeypatch):
    """SIGSTOP right after the spawn: HEAD never noticed (it waited for a first report forever)."""
    monkeypatch.setattr(multiproc, "STARTUP_GRACE_S", 3.0, raising=False)
    stopped = _stop_first_start(monkeypatch)
    with _upstream() as up, RunningSidecar(make_config(up.url, workers=2)) as sc:
        first = stopped[0]
        try:
            starting = proxy_workers(sc)[0]
            # it takes from no socket yet: the main process takes every connection, /readyz stays 200
            r = httpx.get(sc.admin_url + "/readyz")
            assert r.status_code == 200 and "starting" in r.json()["proxy_workers"], r.text
            assert _post_fresh(sc, 5) == 5
            wait_or_fail(lambda: sc.value(ERRORS, {"reason": "proxy_worker_start_timeout"}) == 1,
                         lambda: f"stuck start not killed: {proxy_workers(sc)}", timeout=8)
            grace = sc.sc.workers.startup_grace(sc.sc.workers.workers[0])   # type: ignore[union-attr]
            assert grace == 6.0   # doubled for the next start
        finally:
            try:
                os.kill(first, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert starting["phase"] == "starting" and starting["pid"] == first and not starting["ready"], starting
        w = wait_or_fail(lambda: (w := proxy_workers(sc)[0])["ready"] and w["pid"] != first and w, "not restarted",
                         timeout=20)
        assert w["restarts"] == 1 and w["phase"] == "serving"
        grace = sc.sc.workers.startup_grace(sc.sc.workers.workers[0])   # type: ignore[union-attr]
        assert grace == 3.0   # a start that succeeded resets it
        assert sc.value(ERRORS, {"reason": "proxy_worker_died"}) == 0   # counted once, as a start timeout
        assert httpx.get(sc.admin_url + "/readyz").status_code == 200
        assert _post_fresh(sc, 20) == 20
        assert sc.wait_for(REQ, OK, 25, timeout=5) == 25


def test_worker_silent_after_it_began_listening_fails_readyz_and_is_killed(monkeypatch):
    """A worker that may hold part of the port but never reported: 503 after STALE_S, killed after HANG_TIMEOUT_S.

    The window between a worker's mark (just before it binds) and its first report is too short
    to hit with a signal, so the test stops the worker while it starts and writes the mark itself.
    """
    monkeypatch.setattr(multiproc, "STALE_S", 1.0, raising=False)
    monkeypatch.setattr(multiproc, "HANG_TIMEOUT_S", 2.0, raising=False)
    stopped = _stop_first_start(monkeypatch)
    with _upstream() as up, RunningSidecar(make_config(up.url, workers=2)) as sc:
        worker = sc.sc.workers.workers[0]   # type: ignore[union-attr]
        first = stopped[0]
        try:
            worker.run.ledger.mark_listening()
            assert proxy_workers(sc)[0]["phase"] == "listening"
            r = wait_or_fail(lambda: (r := httpx.get(sc.admin_url + "/readyz")).status_code == 503 and r,
                             "readyz still 200 with a silent listening worker", timeout=3)
            assert "not responding" in r.json()["proxy_workers"]
            wait_or_fail(lambda: sc.value(ERRORS, {"reason": "proxy_worker_hung"}) == 1, "not killed", timeout=4)
        finally:
            try:
                os.kill(first, signal.SIGCONT)
            except ProcessLookupError:
                pass
        wait_or_fail(lambda: (w := proxy_workers(sc)[0])["ready"] and w["pid"] != first, "not restarted",
                     timeout=20)
        assert httpx.get(sc.admin_url + "/readyz").status_code == 200
