"""Test doubles for the GPU tests: a fake NVML, a fake /proc tree, a hand-driven clock.

There is no GPU (and no NVIDIA driver) on the machines these tests run on, so the
collector is exercised against `FakeNvml`, which implements the same `Nvml` interface
as the real pynvml backend and can be told to fail any call with any NVML error.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentinel.gpu.nvml import (
    MemoryInfo,
    NvmlError,
    NvmlUnavailable,
    ProcessMemory,
    PynvmlBackend,
    translate,
)

GIB = 1 << 30
MIB512 = 512 << 20


@dataclass
class FakeDevice:
    """A device as the fake reports it; `mig` holds MIG devices of a MIG-mode GPU."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory: MemoryInfo = field(default_factory=lambda: MemoryInfo(80 * GIB, 10 * GIB, 70 * GIB - MIB512, MIB512))
    utilization: float | None = 0.25  # None: not supported
    processes: list[ProcessMemory] = field(default_factory=list)
    mig: list[FakeDevice] = field(default_factory=list)


class FakeNvml:
    """In-memory `Nvml`: devices, injectable failures, a call log."""

    def __init__(self, devices: list[FakeDevice] | None = None, *, unavailable: str | None = None):
        self.devices = devices if devices is not None else [FakeDevice("GPU-aaaa")]
        self.unavailable = unavailable      # kind raised by init(), e.g. "library_not_found"
        self.fail: dict[str, NvmlError | Exception] = {}   # call name -> error raised (every time)
        self.fail_once: dict[str, NvmlError | Exception] = {}
        self.delay: dict[str, float] = {}  # call name -> seconds to block
        self.release = threading.Event()   # set to end a blocking delay early
        self.calls: list[str] = []
        self.inits = 0
        self.shutdowns = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def _enter(self, call: str) -> None:
        with self._lock:
            self.calls.append(call)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if call in self.delay:
                self.release.wait(self.delay[call])
            if call in self.fail_once:
                raise self.fail_once.pop(call)
            if call in self.fail:
                raise self.fail[call]
        finally:
            with self._lock:
                self.active -= 1

    def init(self) -> None:
        self.calls.append("init")
        self.inits += 1
        if self.unavailable:
            raise NvmlUnavailable("init", self.unavailable, "NVML Shared Library Not Found", 12)
        self._enter("init")

    def shutdown(self) -> None:
        self.shutdowns += 1

    def driver_version(self) -> str:
        self._enter("driver_version")
        return "550.54.15"

    def device_count(self) -> int:
        self._enter("device_count")
        return len(self.devices)

    def handle(self, index: int) -> Any:
        self._enter("handle")
        return self.devices[index]

    def name(self, handle: Any) -> str:
        self._enter("name")
        return handle.name

    def uuid(self, handle: Any) -> str:
        self._enter("uuid")
        return handle.uuid

    def mig_devices(self, handle: Any) -> list[Any]:
        self._enter("mig_devices")
        return list(handle.mig)

    def memory(self, handle: Any) -> MemoryInfo:
        self._enter("memory")
        return handle.memory

    def utilization(self, handle: Any) -> float:
        self._enter("utilization")
        if handle.utilization is None:
            raise NvmlError("utilization", "not_supported", "Not Supported", 3)
        return handle.utilization

    def processes(self, handle: Any) -> list[ProcessMemory]:
        self._enter("processes")
        return list(handle.processes)


def nvml_error(call: str, code: int) -> NvmlError:
    """The NvmlError the real backend would raise for pynvml error `code` in `call`."""

    class _Foreign(Exception):
        def __init__(self, value: int):
            super().__init__(f"code {value}")
            self.value = value

    return translate(call, _Foreign(code))


def make_proc(root: Path, pid: int, comm: str = "python", cmdline: tuple[str, ...] = ("python",),
              cgroup: str = "0::/") -> None:
    """Write /proc/PID/{comm,cmdline,cgroup} under `root`."""
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_text("\0".join(cmdline) + "\0")
    (d / "cgroup").write_text(cgroup + "\n")


class Clock:
    """A hand-driven monotonic clock; `tick` is added on every read."""

    def __init__(self, tick: float = 0.0):
        self.now = 1000.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def nvml_works() -> bool:
    """True on a machine with a working NVIDIA driver (the real-path tests expect none)."""
    b = PynvmlBackend()
    try:
        b.init()
    except Exception:
        return False
    b.shutdown()
    return True
