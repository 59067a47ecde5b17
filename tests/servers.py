"""Start `sentinel serve` as a real subprocess on a free loopback port, for end-to-end tests.

    from servers import start_model_server

    with start_model_server("digits:v3", delay_ms=5) as url:   # url = "http://127.0.0.1:PORT"
        httpx.post(f"{url}/v2/models/digits/infer", json=...)

The server is ready (GET /v2/health/ready answers 200) when the block starts, and is
stopped with SIGTERM (then SIGKILL after a grace period) when it ends. Its log is kept in
a temporary file and quoted in the error when it fails to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy (returned); connection errors and missing keys count as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.TransportError, KeyError):
            pass
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server on a free loopback port, serving from a daemon thread; stop it with stop_server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def send_json(handler: BaseHTTPRequestHandler, status: int, doc: Any) -> None:
    """Answer `doc` as a JSON body with Content-Length (keep-alive safe) from a BaseHTTPRequestHandler."""
    body = json.dumps(doc).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def stop_server(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


class ServerURL(str):
    """The base URL (a plain str to callers), with the process and its log for tests that want them."""

    process: subprocess.Popen
    log_path: str

    def log(self) -> str:
        """The server's output so far."""
        return Path(self.log_path).read_bytes().decode("utf-8", "replace")


class ServerFailed(RuntimeError):
    """`sentinel serve` exited or never became ready; the message quotes its log."""


@contextlib.contextmanager
def start_model_server(
    model: str = "digits:v3",
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    delay_ms: float = 0.0,
    error_ratio: float = 0.0,
    stall_after: int | None = None,
    stall_seconds: float = 0.0,
    skip_normalization: bool = False,
    registry: str | Path | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 90.0,
    cwd: str | Path = REPO,
) -> Iterator[ServerURL]:
    """Run `sentinel serve --model MODEL` with the given faults; yields its base URL (a str)."""
    if port is None:
        # A free port can be taken between our probe and the server's bind: try a few.
        for attempt in range(3):
            try:
                cm = start_model_server(model, port=free_port(host), host=host, delay_ms=delay_ms,
                                        error_ratio=error_ratio, stall_after=stall_after, stall_seconds=stall_seconds,
                                        skip_normalization=skip_normalization, registry=registry,
                                        extra_args=extra_args, ready_timeout=ready_timeout, cwd=cwd)
                url = cm.__enter__()
            except ServerFailed as exc:
                if "address already in use" not in str(exc).lower() or attempt == 2:
                    raise
                continue
            try:
                yield url
            except BaseException:
                if not cm.__exit__(*sys.exc_info()):
                    raise
            else:
                cm.__exit__(None, None, None)
            return
    cmd = [sys.executable, "-m", "sentinel", "serve", "--model", model, "--host", host, "--port", str(port)]
    if delay_ms:
        cmd += ["--delay-ms", str(delay_ms)]
    if error_ratio:
        cmd += ["--error-ratio", str(error_ratio)]
    if stall_after is not None:
        cmd += ["--stall-after", str(stall_after), "--stall-seconds", str(stall_seconds)]
    if skip_normalization:
        cmd.append("--skip-normalization")
    cmd += ["--registry", str(registry or Path(cwd) / "models")]
    cmd += list(extra_args)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    url = ServerURL(f"http://{host}:{port}")
    with tempfile.NamedTemporaryFile("w+b", prefix="sentinel-serve-", suffix=".log") as logf:
        proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        url.process, url.log_path = proc, logf.name
        try:
            _wait_ready(proc, url, ready_timeout, logf.name)
            yield url
        finally:
            stop_process(proc)


def _log_tail(path: str, n: int = 4000) -> str:
    data = Path(path).read_bytes()[-n:]
    return data.decode("utf-8", "replace")


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerFailed(f"sentinel serve exited with {proc.returncode} before it was ready:\n"
                                   f"{_log_tail(log_path)}")
            try:
                if client.get(f"{url}/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    stop_process(proc)
    raise ServerFailed(f"sentinel serve not ready at {url} after {timeout:.0f} s:\n{_log_tail(log_path)}")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process is gone."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
