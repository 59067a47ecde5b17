"""The daemon as a process: import hygiene, `sentinel run`, SIGTERM drain, promtool, memory."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from proxy_helpers import RunningSidecar, Upstream, free_port, make_config

REPO = Path(__file__).resolve().parents[2]
V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'


def test_hot_path_imports_no_heavy_modules():
    code = ("import sys\n"
            "import sentinel.proxy.sidecar, sentinel.proxy.server, sentinel.proxy.exchange\n"
            "import sentinel.proxy.analysis, sentinel.protocols, sentinel.commands.run_cmd\n"
            "bad = [m for m in ('torch', 'onnxruntime', 'scipy', 'sentinel.analysis', 'sentinel.analysis.monitor')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_running_daemon_loads_no_heavy_modules():
    """Not just the imports: a started sidecar (GPU collector, tracing off) serving a request."""
    code = ("import asyncio, sys, urllib.request\n"
            "from sentinel.config import Config, ModelConfig\n"
            "from sentinel.proxy.sidecar import Sidecar\n"
            "async def main():\n"
            "    sc = Sidecar(Config(models=(ModelConfig(name='m', version='1'),), listen='127.0.0.1:0',\n"
            "                        admin='127.0.0.1:0', upstream='http://127.0.0.1:9'))\n"
            "    await sc.start()\n"
            "    port = sc.proxy_address[1]\n"
            "    loop = asyncio.get_running_loop()\n"
            "    def get():\n"
            "        try:\n"
            "            urllib.request.urlopen(f'http://127.0.0.1:{port}/v2/models/m/infer', data=b'{}')\n"
            "        except Exception as exc:\n"
            "            return str(exc)\n"
            "    print(await loop.run_in_executor(None, get))\n"
            "    await sc.stop()\n"
            "asyncio.run(main())\n"
            "bad = [m for m in ('torch', 'onnxruntime', 'scipy', 'sentinel.analysis') if m in sys.modules]\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "502" in p.stdout


def _write_config(tmp: Path, upstream: str, **extra: str) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    lines = [f"listen: 127.0.0.1:{port}", f"admin: 127.0.0.1:{admin}", f"upstream: {upstream}",
             "models:", "  - {name: digits, version: v3, protocol: v2}",
             "sampling: {rate: 0.0}", "proxy: {drain_timeout_s: 5, upstream_timeout_s: 10}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    cfg = tmp / "sentinel.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg, port, admin


def _start(cfg: Path, admin: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "sentinel", "run", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sentinel run exited: {proc.stdout.read().decode()}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=0.5).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("sentinel run did not become healthy")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])   # SIGHUP (a closed terminal) ended it at once
def test_sigterm_drains_in_flight_requests(tmp_path, sig):
    with Upstream() as up:
        cfg, port, admin = _write_config(tmp_path, up.url)
        proc = _start(cfg, admin)
        try:
            result: dict = {}

            def slow() -> None:
                result["r"] = httpx.get(f"http://127.0.0.1:{port}/slow?s=1", timeout=10)

            t = threading.Thread(target=slow)
            t.start()
            time.sleep(0.3)
            proc.send_signal(sig)
            t.join(10)
            assert result["r"].status_code == 200 and result["r"].json() == {"slow": True}
            assert proc.wait(10) == 0
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]


def test_cli_overrides_and_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: []\nlisten: nonsense\n")
    p = subprocess.run([sys.executable, "-m", "sentinel", "run", "--config", str(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "listen" in p.stderr and "models" in p.stderr
    good, _, _ = _write_config(tmp_path, "http://127.0.0.1:1")
    p = subprocess.run([sys.executable, "-m", "sentinel", "run", "--config", str(good), "--upstream", "ftp://x"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--upstream" in p.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_scrape_of_busy_sidecar():
    with Upstream() as up, RunningSidecar(make_config(up.url, rate=1.0, max_model_labels=3)) as sc:
        with httpx.Client(base_url=sc.url) as c:
            for i in range(40):
                c.post("/v2/models/digits/infer", content=V2_BODY)
                c.post(f"/v1/models/m{i % 6}:predict", content=b"{}")
                c.get("/status?code=500", headers={"traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"})
        sc.wait_for("sentinel_samples_total", {"model": "digits", "outcome": "decoded"}, 40)
        text = httpx.get(sc.admin_url + "/metrics").content
        p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
        om = httpx.get(sc.admin_url + "/metrics", headers={"Accept": "application/openmetrics-text"}).text
        fams = {f.name: f for f in om_families(om)}
        dur = fams["sentinel_request_duration_seconds"]
        assert any(s.exemplar is not None for s in dur.samples)


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_memory_bounded_under_1gb_upload(tmp_path):
    """A chunked upload headed for 1 GB meets the 64 MiB limit; the daemon's peak memory stays small."""
    with Upstream() as up:
        cfg, port, admin = _write_config(tmp_path, up.url)
        proc = _start(cfg, admin)
        try:
            base = _vm_hwm_kb(proc.pid)
            piece = b"%x\r\n" % (1 << 20) + b"q" * (1 << 20) + b"\r\n"
            sent = 0
            view = memoryview(piece)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                s.settimeout(0.0)
                reply = b""
                deadline = time.monotonic() + 60
                while sent < (1 << 30) and time.monotonic() < deadline:
                    try:
                        reply = s.recv(4096)
                        break
                    except BlockingIOError:
                        pass
                    try:
                        n = s.send(view)
                        sent += n
                        view = view[n:] or memoryview(piece)   # a partial send resumes mid-piece
                    except BlockingIOError:
                        time.sleep(0.001)
            assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
            growth_mb = (_vm_hwm_kb(proc.pid) - base) / 1024
            assert growth_mb < 32, f"peak RSS grew {growth_mb:.1f} MB"
            assert httpx.post(f"http://127.0.0.1:{port}/echo", content=b"still").content == b"still"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            proc.stdout.close()  # type: ignore[union-attr]


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg, _, _ = _write_config(tmp_path, "http://127.0.0.1:1")
        p = subprocess.run([sys.executable, "-m", "sentinel", "run", "--config", str(cfg),
                            "--listen", f"127.0.0.1:{port}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in p.stderr and "Traceback" not in p.stderr
