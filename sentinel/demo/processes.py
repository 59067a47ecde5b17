"""Child processes of the demo: started in their own sessions, always stopped."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from sentinel.errors import InfrastructureError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(message: str) -> bool:
    """Whether a child's failure (its log's end) says the port it was given was taken (EADDRINUSE)."""
    m = message.lower()
    return "address already in use" in m or "errno 98" in m


def port_is_bound(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _libc_prctl() -> Callable[..., int] | None:
    """prctl(2) from the C library, looked up in the parent (nothing is imported after fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
    """In the child, before exec: SIGTERM when the demo dies, however it dies (Linux).

    The children run in their own sessions, so a closed terminal (SIGHUP), `kill -9` or the
    OOM killer ending the demo would otherwise leave the model server, the sidecar and
    Prometheus running with their ports bound.
    """
    prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG
    if os.getppid() != parent:          # the demo died before prctl took effect
        os._exit(1)


class Children:
    """Processes to stop, newest first, with SIGTERM then SIGKILL to their process groups."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        prctl = _libc_prctl()
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=full_env,
                             preexec_fn=None if prctl is None else functools.partial(
                                 _die_with_parent, prctl, os.getpid()))
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
                raise InfrastructureError(f"{name} exited with code {p.returncode}; its log ends:\n{tail}")

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
    raise InfrastructureError(f"{url} not ready after {timeout:.0f} s ({last})")
