"""Child processes of the demo: started in their own sessions, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_bound(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class Children:
    """Processes to stop, newest first, with SIGTERM then SIGKILL to their process groups."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=full_env)
        log.close()
        self.procs.append((name, p))
        return p

    def sentinel(self, name: str, *args: str) -> subprocess.Popen:
        return self.start(name, [sys.executable, "-m", "sentinel", *args],
                          env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})

    def check_alive(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with code {p.returncode}; its log ends:\n{tail}")

    def stop(self, timeout: float = 8.0) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
            # Grandchildren (the sidecar's analysis process) share the group; make sure.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p in self.procs]


def wait_ready(url: str, children: Children, timeout: float = 90.0) -> None:
    """Poll `url` until it answers 200, failing early when a child died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        children.check_alive()
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last})")
