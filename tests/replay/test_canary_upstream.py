"""`sentinel run --upstream` moves the canary and the readiness probe; the canary waits for readiness."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import REPO, free_port, start_model_server

from sentinel import metricnames as mn
from sentinel.commands.run_cmd import override_upstream
from sentinel.config import Config, ModelConfig
from sentinel.replay.canary import readiness_path, wait_ready
from sentinel.replay.http import Target


def _cfg(upstream: str, *endpoints: str) -> Config:
    return Config(models=tuple(ModelConfig(name=f"m{i}", version="v1", endpoint=e) for i, e in enumerate(endpoints)),
                  upstream=upstream)


def test_override_moves_endpoints_on_the_same_server_only():
    cfg = _cfg("http://127.0.0.1:8081", "http://localhost:8081", "http://127.0.0.1:8081/base", "http://10.0.0.9:8081")
    new = override_upstream(cfg, "http://127.0.0.1:9999")
    assert new.upstream == "http://127.0.0.1:9999"
    assert [m.endpoint for m in new.models] == [
        "http://127.0.0.1:9999", "http://127.0.0.1:9999/base", "http://10.0.0.9:8081"]
    assert override_upstream(cfg, None) is cfg


def test_override_rejects_a_bad_url_naming_the_option():
    from sentinel.errors import ConfigError

    with pytest.raises(ConfigError, match="--upstream"):
        override_upstream(_cfg("http://127.0.0.1:8081", "http://127.0.0.1:8081"), "ftp://x")


def test_readiness_paths():
    assert readiness_path("v2", "digits") == "/v2/models/digits/ready"
    assert readiness_path("v1", "digits") == "/v1/models/digits"
    assert readiness_path("torchserve", "digits") == "/ping"


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first `not_ready` readiness polls, then 200."""

    polls = 0
    not_ready = 3

    def log_message(self, *a):  # keep test output quiet
        pass

    def do_GET(self):
        type(self).polls += 1
        code = 503 if type(self).polls <= self.not_ready else 200
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_wait_ready_backs_off_until_ready_and_gives_up_when_bounded():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t = Target("127.0.0.1", srv.server_address[1])
        ok, why = wait_ready(t, "/v2/models/digits/ready", 30.0)
        assert ok and "ready" in why and _Flaky.polls == 4
        dead = Target("127.0.0.1", free_port())
        t0 = time.monotonic()
        ok, why = wait_ready(dead, "/ping", 0.5)
        assert not ok and time.monotonic() - t0 < 5
        stopped = threading.Event()
        stopped.set()
        ok, why = wait_ready(dead, "/ping", 30.0, sleep=stopped.wait)
        assert not ok and why.startswith("stopped")
    finally:
        srv.shutdown()
        srv.server_close()


def _metric(text: str, name: str, labels: dict[str, str]) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.mark.slow
def test_run_upstream_override_reaches_canary_and_readyz_with_a_slow_to_start_server(tmp_path):
    """The file names a dead port; --upstream names one whose server starts seconds later."""
    dead, port, admin = free_port(), free_port(), free_port()
    cfg = tmp_path / "sentinel.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{free_port()}\nupstream: http://127.0.0.1:{dead}\nadmin: 127.0.0.1:{admin}\n"
        f"registry: {REPO / 'models'}\ngolden_sets: {REPO / 'golden_sets'}\n"
        f"models:\n  - {{name: digits, version: v3, endpoint: 'http://127.0.0.1:{dead}', protocol: v2}}\n"
        "sampling: {rate: 0.0}\ndrift: {shadow: false}\n"
        "replay: {canary_interval_s: 3600, canary_samples: 4, canary_rate: 20, canary_ready_timeout_s: 120}\n"
        "gpu: {enabled: 'off'}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sentinel", "run", "--config", str(cfg),
                             "--upstream", f"http://127.0.0.1:{port}"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{admin}"
    name = mn.REPLAY_REQUESTS.sample_name
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(base + "/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
                time.sleep(0.2)
        assert r.status_code == 503 and f"127.0.0.1:{port}" in r.json()["upstream"]
        time.sleep(2.0)  # the canary is polling readiness now; nothing listens on the port yet
        with start_model_server("digits:v3", port=port):
            deadline = time.monotonic() + 90
            ok = 0.0
            while time.monotonic() < deadline:
                text = httpx.get(base + "/metrics", timeout=5).text
                ok = _metric(text, name, {"model": "digits", "result": "ok"})
                if ok >= 4:
                    break
                time.sleep(0.5)
            assert ok == 4, (tmp_path / "run.log").read_text()
            assert _metric(text, name, {"model": "digits", "result": "error"}) == 0
            r = httpx.get(base + "/readyz", timeout=5)
            assert r.status_code == 200 and f"127.0.0.1:{port}" in r.json()["upstream"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
