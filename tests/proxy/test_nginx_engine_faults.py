"""proxy.engine nginx when things break: nginx killed, a stop mid-request, config
errors, access-log lines the kernel drops. Real nginx, real sockets (see test_nginx_engine.py)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter

import httpx  # noqa: E402
import pytest
from proxy_helpers import StepUpstream, Upstream, free_port, wait_or_fail  # noqa: E402
from test_nginx_engine import (  # skips this module too where there is no nginx
    DIGITS,
    V2_BODY,
    counted_after,
    counts,
    nginx_config,
    no_nginx_left_behind,  # noqa: F401 - an autouse fixture
    running,
)

from sentinel import metricnames as mn  # noqa: E402
from sentinel.config import load_config  # noqa: E402
from sentinel.errors import ConfigError, InfrastructureError  # noqa: E402
from sentinel.proxy import nginx as ngx  # noqa: E402

RESTARTS = mn.DATAPLANE_RESTARTS.sample_name
LOST = mn.ACCESS_LOG_LOST.sample_name


def _nginx_status(sc) -> dict:
    return httpx.get(sc.admin_url + "/status").json()["nginx"]


def _ready(sc) -> tuple[int, dict]:
    r = httpx.get(sc.admin_url + "/readyz")
    return r.status_code, r.json()


def _in_loop(sc, fn) -> None:
    """Run `fn` on the sidecar's event loop and wait for it."""
    done = threading.Event()

    def call() -> None:
        try:
            fn()
        finally:
            done.set()
    sc.loop.call_soon_threadsafe(call)
    assert done.wait(5)


def _workers(master: int) -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process(master).children()}


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- 5. nginx dies ------------------------------------------------------------------------------

def _wait_restarted(sc, was: int) -> dict:
    return wait_or_fail(lambda: (st := _nginx_status(sc))["running"] and st["pid"] != was and st,
                        lambda: f"nginx not running again: {_nginx_status(sc)}", timeout=10)


def test_nginx_killed_is_restarted_counted_and_unready_meanwhile():
    with Upstream() as up, running(nginx_config(up.url)) as sc:
        assert _ready(sc)[0] == 200
        pid = _nginx_status(sc)["pid"]
        os.killpg(pid, signal.SIGKILL)   # the master and its workers
        code, doc = wait_or_fail(lambda: (r := _ready(sc))[0] == 503 and r, "/readyz still ready", timeout=5)
        assert doc["ready"] is False and doc["nginx"] == "down (restarting)"
        _wait_restarted(sc, pid)
        assert _ready(sc)[0] == 200
        assert sc.value(RESTARTS) == 1
        r, delta = counted_after(sc, lambda: httpx.post(sc.url + "/v2/models/digits/infer", content=V2_BODY))
        assert r.status_code == 200 and delta == Counter({(*DIGITS, "200"): 1})


def test_a_killed_master_leaves_no_workers_holding_the_port():
    """SIGKILL to the master alone: its workers live on holding the listener, and a new master
    cannot bind it (it retried, exited, and was restarted again and again). They are killed."""
    with Upstream() as up, running(nginx_config(up.url, workers=2)) as sc:
        pid = _nginx_status(sc)["pid"]
        old = wait_or_fail(lambda: len(w := _workers(pid)) == 2 and w, "two workers")
        os.kill(pid, signal.SIGKILL)
        new = _wait_restarted(sc, pid)["pid"]
        wait_or_fail(lambda: not any(_alive(w) for w in old), f"old workers {sorted(old)} still alive", timeout=5)
        time.sleep(1.0)   # no restart loop: the new master bound the port and stays
        assert sc.value(RESTARTS) == 1 and _nginx_status(sc)["pid"] == new
        assert _ready(sc)[0] == 200
        r, delta = counted_after(sc, lambda: httpx.get(sc.url + "/v2/models/digits/infer"))
        assert r.status_code == 200 and delta == Counter({(*DIGITS, "200"): 1})


_CHILD = """
import dataclasses, sys
sys.path.insert(0, {helpers!r})
from proxy_helpers import BUILTIN_MONITOR, make_config
from sentinel.proxy.sidecar import run
cfg = make_config({upstream!r}, engine="nginx")
run(dataclasses.replace(cfg, listen={listen!r}, admin={admin!r}), monitor_factory=BUILTIN_MONITOR)
"""


@pytest.mark.skipif(ngx.SETPRIV is None, reason="needs util-linux's setpriv")
def test_a_killed_sentinel_takes_its_nginx_with_it(tmp_path):
    """sentinel SIGKILLed (the OOM killer): its nginx, in a session of its own, served on with
    nobody counting and held `listen` against the next sentinel. It stops now (parent-death signal)."""
    import subprocess
    import sys

    from test_nginx_engine import in_groups

    with Upstream() as up:
        cfg = nginx_config(up.url)
        admin = f"127.0.0.1:{free_port()}"
        script = tmp_path / "child.py"
        script.write_text(_CHILD.format(helpers=os.path.dirname(__file__), upstream=up.url, listen=cfg.listen,
                                        admin=admin))
        child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        master, run_dir = None, None
        try:
            def nginx_status():
                try:
                    return httpx.get(f"http://{admin}/status").json()["nginx"]
                except (httpx.HTTPError, KeyError):
                    return None
            st = wait_or_fail(nginx_status, "the child sidecar did not start", timeout=20)
            master, run_dir = st["pid"], os.path.dirname(st["config"])
            port = int(cfg.listen.rsplit(":", 1)[1])
            assert httpx.get(f"http://127.0.0.1:{port}/v2/models/digits/infer").status_code == 200
            child.kill()
            child.wait(5)
            wait_or_fail(lambda: not in_groups({master}), lambda: f"nginx left running: {in_groups({master})}",
                         timeout=10)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/")
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(5)
            for pid in in_groups({master}) if master else ():
                os.kill(pid, signal.SIGKILL)
            if run_dir:   # what a killed sentinel could not remove
                shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.unit
def test_restart_backoff_starts_over_after_a_long_run(monkeypatch):
    """A nginx that ran for long before it died is restarted after the shortest delay; the backoff
    grew for good before (every restart of a long-lived sidecar waited 30 s after its sixth)."""
    import asyncio
    import types

    clock = [0.0]
    lives = iter([0.1, 0.1, 0.1, ngx.RESTART_RESET_S + 1, 0.1, 0.1])   # how long each nginx runs
    delays: list[float] = []

    class Proc:
        pid, returncode = 2 ** 22 + 12345, None

        async def wait(self) -> int:
            clock[0] += next(lives)
            return 1

    async def main() -> None:
        n = ngx.Nginx(nginx_config("http://127.0.0.1:1"), "nginx")

        async def sleep(s: float) -> None:
            delays.append(s)
            clock[0] += s
            n.stopping = len(delays) == 6

        async def spawn() -> None:
            n.proc, n._spawned_at = Proc(), clock[0]
        monkeypatch.setattr(ngx, "asyncio", types.SimpleNamespace(sleep=sleep))
        monkeypatch.setattr(ngx, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
        monkeypatch.setattr(ngx, "_killpg", lambda pgid: None)
        monkeypatch.setattr(n, "_spawn", spawn)
        try:
            await spawn()
            await n._supervise()
        finally:
            n.remove_dirs()
    asyncio.run(main())
    assert delays == [0.5, 1.0, 2.0, 0.5, 1.0, 2.0]


# --- 6. a graceful stop ---------------------------------------------------------------------

def test_stop_finishes_the_request_in_flight_counts_it_and_leaves_nothing_behind():
    up = StepUpstream()
    up.scripts[b"/v2/models/digits/infer"] = lambda c: (time.sleep(1.0), c.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    try:
        with running(nginx_config(up.url)) as sc:
            st = _nginx_status(sc)
            master, run_dir = st["pid"], os.path.dirname(st["config"])
            pids = {master} | _workers(master)
            got: list = []
            t = threading.Thread(target=lambda: got.append(httpx.post(sc.url + "/v2/models/digits/infer",
                                                                      content=b"{}", timeout=10)))
            t.start()
            wait_or_fail(lambda: len(up.seen) == 1, "the request reached the model server")
            t0 = time.monotonic()
            sc.stop()
            assert time.monotonic() - t0 < 5
            t.join(5)
            assert got and got[0].status_code == 200 and got[0].content == b"ok"
            assert counts(sc) == Counter({(*DIGITS, "200"): 1})   # counted before the reader closed
            assert not any(_alive(p) for p in pids)
            assert not os.path.exists(run_dir)
            with pytest.raises(httpx.ConnectError):
                httpx.get(sc.url + "/")
    finally:
        up.close()


# --- 7. configuration errors ---------------------------------------------------------------

def _run_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("sentinel-nginx-")}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_an_nginx_binary_that_is_not_there_is_named_with_the_fix():
    cfg = nginx_config("http://127.0.0.1:1", nginx_binary="/nonexistent/nginx")
    dirs = _run_dirs()
    with pytest.raises(InfrastructureError) as e, running(cfg):
        pass
    assert "proxy.nginx_binary" in str(e.value) and "apt-get install nginx-light" in str(e.value)
    assert "/nonexistent/nginx" in str(e.value)
    assert _run_dirs() == dirs
    assert _port_free(int(cfg.listen.rsplit(":", 1)[1]))


def test_an_nginx_binary_that_cannot_run_is_an_infrastructure_error(tmp_path):
    fake = tmp_path / "nginx"
    fake.write_text("not a program\n")
    fake.chmod(0o644)
    with pytest.raises(InfrastructureError, match=r"proxy\.nginx_binary.*cannot run"), \
            running(nginx_config("http://127.0.0.1:1", nginx_binary=str(fake))):
        pass


def test_a_listen_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = dataclasses.replace(nginx_config("http://127.0.0.1:1"), listen=f"127.0.0.1:{port}")
        with pytest.raises(InfrastructureError, match=r"listen\).*in use"), running(cfg):
            pass


@pytest.mark.parametrize("yaml,field", [
    ("listen: 127.0.0.1:0\nproxy:\n  engine: nginx\n", "listen"),
    ("listen: 127.0.0.1:8080\nproxy:\n  engine: bogus\n", "proxy.engine"),
    ("listen: 127.0.0.1:8080\nproxy:\n  engine: nginx\n  capture_dir: /nonexistent/captures\n", "proxy.capture_dir"),
], ids=["port-0", "bogus-engine", "capture-dir"])
def test_config_errors_name_the_field(tmp_path, yaml, field):
    path = tmp_path / "sentinel.yaml"
    path.write_text("models:\n  - name: digits\n    version: v3\nupstream: http://127.0.0.1:8081\n" + yaml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{field}:" in str(e.value), str(e.value)


# --- 8. lines the kernel drops ---------------------------------------------------------------

def test_lines_the_kernel_drops_are_counted_lost(monkeypatch):
    """A receive buffer of a few datagrams and a slow reader: a burst overflows it. What is not
    counted is counted lost, to the line, once the burst is over (not when the next line comes)."""
    monkeypatch.setattr(ngx, "RECV_BUFFER", 1)   # the kernel's minimum
    monkeypatch.setattr(ngx, "POLL_S", 0.5)
    monkeypatch.setattr(ngx, "BUSY_POLL_S", 0.5)
    n = 150
    with Upstream() as up, running(nginx_config(up.url)) as sc:
        def burst() -> list[int]:
            with httpx.Client(base_url=sc.url) as c:
                return [c.get("/v2/models/digits/infer").status_code for _ in range(n)]
        codes = burst()
        assert codes == [200] * n
        log = sc.sc.access_log
        wait_or_fail(lambda: log.lines + log.dropped >= n and time.sleep(0.6) is None,
                     lambda: f"lines {log.lines} + lost {log.dropped} < {n}", timeout=5)
        assert log.dropped > 0 and log.lines > 0
        assert log.lines + log.dropped == n
        assert sc.value(LOST) == log.dropped
        assert sum(counts(sc).values()) == log.lines
        assert _nginx_status(sc)["log_lines_lost"] == log.dropped


# --- 9. nginx's error lines ------------------------------------------------------------------

def test_nginx_writes_its_error_lines_into_a_pipe_that_cannot_block_it():
    """nginx's workers write error lines to their stderr, sentinel's pipe: a sentinel that stops
    reading must cost lines, not requests. The write end nginx holds is non-blocking."""
    with Upstream() as up, running(nginx_config(up.url)) as sc:
        master = _nginx_status(sc)["pid"]
        import psutil

        for pid in [master] + [c.pid for c in psutil.Process(master).children()]:
            with open(f"/proc/{pid}/fdinfo/2") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
            assert flags & os.O_NONBLOCK, (pid, oct(flags))


def test_a_flood_of_nginx_error_lines_is_logged_a_few_at_a_time(caplog):
    async def relay(lines: int) -> ngx.Nginx:
        n = ngx.Nginx.__new__(ngx.Nginx)
        n.last_error = ""
        rfd, wfd = os.pipe()
        with os.fdopen(wfd, "wb") as w:
            w.write(b"".join(b"2026/12/05 06:00:00 [error] 7#7: *%d upstream timed out\n" % i
                             for i in range(lines)))
        await n._relay_errors(rfd)
        return n

    import asyncio

    with caplog.at_level("WARNING", logger="sentinel.nginx"):
        n = asyncio.run(relay(500))
    shown = [r for r in caplog.records if "upstream timed out" in r.getMessage()]
    assert len(shown) == ngx.RELAY_LINES
    assert n.last_error.endswith("*499 upstream timed out")   # /status still shows the newest


# --- 10. a stalled sentinel ------------------------------------------------------------------

def test_a_stalled_sentinel_holds_no_request_and_pauses_captures_until_it_runs_again():
    """Everything sampled, then sentinel's event loop stalls for 5 s. Requests never wait for
    sentinel (nginx answers them mid-stall); after STALL_S the watchdog reloads nginx without
    captures, so no file piles up that the stalled loop cannot take; once it runs again captures
    resume. Every request is counted once, every file is taken or deleted."""
    with Upstream() as up, running(nginx_config(up.url, rate=1.0)) as sc:
        with httpx.Client(base_url=sc.url) as c:
            assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
        wait_or_fail(lambda: sc.sc.access_log.state()["captured"] == 1, "the request was not captured")
        stall = 5.0
        started = time.monotonic()
        sc.loop.call_soon_threadsafe(time.sleep, stall)
        time.sleep(0.3)
        with httpx.Client(base_url=sc.url, timeout=10) as c:   # before the watchdog: captured, not held
            assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
        assert time.monotonic() - started < 1.5, "a captured request waited for sentinel"
        time.sleep(ngx.STALL_S + 0.5)
        assert sc.sc.nginx.diverted and sc.sc.nginx.diversions == 1
        assert sc.value(mn.CAPTURES_PAUSED.sample_name, {"reason": "stalled"}) == 1
        time.sleep(0.5)   # the reload's new workers
        inbox = os.path.join(sc.sc.nginx.capture_dir, ngx.CAPTURE_IN)
        before = len(os.listdir(inbox))
        with httpx.Client(base_url=sc.url, timeout=10) as c:
            assert [c.post("/v2/models/digits/infer", content=V2_BODY).status_code for _ in range(5)] == [200] * 5
        assert time.monotonic() - started < stall, "the requests waited for the stall"
        assert len(os.listdir(inbox)) == before, "files were captured while sentinel could not take them"
        wait_or_fail(lambda: not sc.sc.nginx.diverted, "captures did not resume", timeout=stall + 5)
        time.sleep(0.5)
        with httpx.Client(base_url=sc.url) as c:
            assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
        wait_or_fail(lambda: sum(counts(sc).values()) == 8, lambda: f"counted {counts(sc)}")
        wait_or_fail(lambda: sc.sc.access_log.state()["captured"] == 3,
                     lambda: f"captured {sc.sc.access_log.state()['captured']}, not 3 (the first, the one "
                             "sent before the pause, the last)")
        assert os.listdir(inbox) == []
        assert _nginx_status(sc)["capture_pauses"] == 1
        assert sc.value(mn.CAPTURES_PAUSED.sample_name, {"reason": "stalled"}) == 0


def test_captures_pause_while_the_disk_is_nearly_full_and_requests_never_fail(monkeypatch):
    """nginx answers 500 when it cannot write a captured body: under the free-space floor the
    watchdog reloads nginx without captures; requests are answered and counted all along; once
    there is room again captures resume."""
    free = [1 << 40]
    monkeypatch.setattr(ngx, "free_bytes", lambda path: free[0])
    with Upstream() as up, running(nginx_config(up.url, rate=1.0)) as sc:
        n = sc.sc.nginx
        assert ngx.MIN_FREE_FLOOR <= n.min_free_bytes <= ngx.MAX_FREE_FLOOR
        post = lambda: httpx.post(sc.url + "/v2/models/digits/infer", content=V2_BODY).status_code  # noqa: E731
        assert post() == 200
        wait_or_fail(lambda: sc.sc.access_log.state()["captured"] == 1, "the request was not captured")
        paused = mn.CAPTURES_PAUSED.sample_name
        registry = sc.sc.metrics.registry   # exported from the start (0), not absent until a pause
        assert [registry.get_sample_value(paused, {"reason": r}) for r in ("disk", "stalled")] == [0.0, 0.0]
        free[0] = n.min_free_bytes - 1
        wait_or_fail(lambda: n.diverted, "captures did not pause on a nearly full disk", timeout=3)
        assert sc.value(paused, {"reason": "disk"}) == 1 and sc.value(paused, {"reason": "stalled"}) == 0
        time.sleep(0.5)   # the reload's new workers
        assert [post() for _ in range(3)] == [200] * 3
        assert _nginx_status(sc)["capture_pause_reason"] == "disk nearly full"
        free[0] = n.min_free_bytes   # over the floor, not yet twice it: still paused
        time.sleep(3 * ngx.WATCH_S)
        assert n.diverted
        free[0] = 2 * n.min_free_bytes
        wait_or_fail(lambda: not n.diverted, "captures did not resume", timeout=3)
        assert sc.value(paused, {"reason": "disk"}) == 0
        time.sleep(0.5)
        assert post() == 200
        wait_or_fail(lambda: sum(counts(sc).values()) == 5, lambda: f"counted {counts(sc)}")
        wait_or_fail(lambda: sc.sc.access_log.state()["captured"] == 2,
                     lambda: f"captured {sc.sc.access_log.state()['captured']}, not 2 (the first and the last)")
