"""`sentinel gate` usage and infrastructure errors exit 2 with one sentence, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _gate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sentinel", "gate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_options_and_bad_window_exit_2():
    r = _gate("--prometheus", "http://127.0.0.1:1", "--model", "digits")
    assert r.returncode == 2 and "needs --baseline, --canary" in r.stderr, r.stderr
    r = _gate("--prometheus", "http://127.0.0.1:1", "--model", "digits", "--baseline", "v3", "--canary", "v4",
              "--window", "ten minutes")
    assert r.returncode == 2 and "--window" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _gate("--prometheus", "http://127.0.0.1:1", "--model", "digits", "--baseline", "v3", "--canary", "v3")
    assert r.returncode == 2 and "both 'v3'" in r.stderr, r.stderr


def test_unreachable_prometheus_exits_2():
    port = _free_port()
    r = _gate("--prometheus", f"http://127.0.0.1:{port}", "--model", "digits", "--baseline", "v3", "--canary", "v4")
    assert r.returncode == 2 and "could not be queried" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _gate("--prometheus", "prometheus:9090", "--model", "digits", "--baseline", "v3", "--canary", "v4")
    assert r.returncode == 2 and "expected an http(s) URL" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_versions_without_series_exit_2_naming_them(tmp_path):
    port = _free_port()
    (tmp_path / "prometheus.yml").write_text("global: {scrape_interval: 1s}\nscrape_configs: []\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = _gate("--prometheus", f"http://127.0.0.1:{port}", "--model", "digits", "--baseline", "v3",
                  "--canary", "v4")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "baseline digits:v3 has no sentinel_model_info or sentinel_requests_total series" in r.stderr
        assert "canary digits:v4" in r.stderr
    finally:
        proc.terminate()
        proc.wait(10)
