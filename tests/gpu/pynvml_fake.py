"""A fake `pynvml` module with the real nvidia-ml-py API surface, for fault injection.

Unlike `gpu_fakes.FakeNvml` (which stands in for sentinel's own `Nvml` interface), this
replaces the `pynvml` module itself, so `PynvmlBackend` runs unchanged on top of it. Its
exception classes are the real package's (`NVMLError`, `NVMLError_GpuIsLost`, ...), and
its functions return what nvidia-ml-py returns: ctypes-like structs with `total`/`used`/
`free` (and `reserved`/`version` for v2), process objects with `pid`/`usedGpuMemory`
(None when NVML_VALUE_NOT_AVAILABLE), `[current, pending]` for the MIG mode, and `str`
(or `bytes`, as before nvidia-ml-py 11.515, with `bytes_strings=True`).

    fake = FakePynvml([FakeGpu("GPU-0"), FakeGpu("GPU-1")])
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    fake.devices[1].lost = True          # NVMLError_GpuIsLost from every call on GPU 1
    fake.fail["nvmlDeviceGetComputeRunningProcesses"] = fake.nv.NVMLError_NotSupported
"""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml as _real

GIB = 1 << 30
NOT_AVAILABLE = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE_ulonglong


@dataclass
class FakeGpu:
    """One device (or MIG device) as the fake driver sees it."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GIB
    used: int = 10 * GIB
    free: int | None = None         # default: total - used - reserved
    reserved: int = 512 << 20
    util: int = 25                  # percent, as c_uint
    procs: list[tuple[int, int | None]] = field(default_factory=list)   # (pid, usedGpuMemory)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    mig: list[FakeGpu | None] | None = None  # MIG slots (None: empty slot); None: MIG disabled
    lost: bool = False
    v2: bool = True                 # memory info v2 answered (MIG devices and vGPUs may say NotSupported)


class FakePynvml:
    """State behind a fake `pynvml` module (`self.module`)."""

    def __init__(self, devices: list[FakeGpu] | None = None, *, bytes_strings: bool = False,
                 old_api: bool = False, v2: bool = True):
        self.devices = devices if devices is not None else [FakeGpu("GPU-0")]
        self.bytes_strings = bytes_strings
        self.v2 = v2
        self.fail: dict[str, Any] = {}       # function name -> exception class/instance raised
        self.fail_times: dict[str, int] = {}  # function name -> how many calls fail (then succeed)
        self.delay: dict[str, float] = {}    # function name -> seconds to block
        self.release = threading.Event()
        self.calls: list[str] = []
        self.initialised = False
        self.init_error: Any = None
        self.proc_growth = 0                 # processes added between the size query and the read
        self.nv = _real
        self.module = self._build(old_api)

    # -- helpers -------------------------------------------------------------------------
    def _s(self, text: str) -> str | bytes:
        return text.encode() if self.bytes_strings else text

    def _enter(self, fn: str, handle: FakeGpu | None = None) -> None:
        self.calls.append(fn)
        if fn in self.delay:
            self.release.wait(self.delay[fn])
        if fn != "nvmlInit" and not self.initialised:
            raise _real.NVMLError_Uninitialized()
        if fn in self.fail:
            n = self.fail_times.get(fn)
            if n is None or n > 0:
                if n is not None:
                    self.fail_times[fn] = n - 1
                err = self.fail[fn]
                raise err() if isinstance(err, type) else err
        if handle is not None and handle.lost:
            raise _real.NVMLError_GpuIsLost()

    def _build(self, old_api: bool) -> types.ModuleType:
        m = types.ModuleType("pynvml")
        for name in dir(_real):
            if name.startswith(("NVML_", "NVMLError")):
                setattr(m, name, getattr(_real, name))
        if not old_api:
            m.nvmlMemory_v2 = _real.nvmlMemory_v2
        me = self

        def nvmlInit() -> None:
            me._enter("nvmlInit")
            if me.init_error is not None:
                err = me.init_error
                raise err() if isinstance(err, type) else err
            me.initialised = True

        def nvmlShutdown() -> None:
            me._enter("nvmlShutdown")
            me.initialised = False

        def nvmlSystemGetDriverVersion():
            me._enter("nvmlSystemGetDriverVersion")
            return me._s("550.54.15")

        def nvmlDeviceGetCount() -> int:
            me._enter("nvmlDeviceGetCount")
            return len(me.devices)

        def nvmlDeviceGetHandleByIndex(i: int) -> FakeGpu:
            me._enter("nvmlDeviceGetHandleByIndex")
            if not 0 <= i < len(me.devices):
                raise _real.NVMLError_InvalidArgument()
            d = me.devices[i]
            if d.lost:
                raise _real.NVMLError_GpuIsLost()
            return d

        def nvmlDeviceGetName(h: FakeGpu):
            me._enter("nvmlDeviceGetName", h)
            return me._s(h.name)

        def nvmlDeviceGetUUID(h: FakeGpu):
            me._enter("nvmlDeviceGetUUID", h)
            return me._s(h.uuid)

        def _mem(h: FakeGpu, v2: bool) -> SimpleNamespace:
            if v2:
                free = h.free if h.free is not None else h.total - h.used - h.reserved
                return SimpleNamespace(version=_real.nvmlMemory_v2, total=h.total, reserved=h.reserved,
                                       free=free, used=h.used)
            used = h.used + h.reserved  # v1 counts the driver's reservation as used
            return SimpleNamespace(total=h.total, free=h.free if h.free is not None else h.total - used, used=used)

        if old_api:
            def nvmlDeviceGetMemoryInfo(h: FakeGpu):  # nvidia-ml-py < 11.510: no version argument
                me._enter("nvmlDeviceGetMemoryInfo", h)
                return _mem(h, False)
        else:
            def nvmlDeviceGetMemoryInfo(h: FakeGpu, version=None):  # type: ignore[misc]
                me._enter("nvmlDeviceGetMemoryInfo", h)
                if version and not me.v2:
                    raise _real.NVMLError_FunctionNotFound()
                if version and not h.v2:
                    raise _real.NVMLError_NotSupported()
                return _mem(h, bool(version))

        def nvmlDeviceGetUtilizationRates(h: FakeGpu):
            me._enter("nvmlDeviceGetUtilizationRates", h)
            return SimpleNamespace(gpu=h.util, memory=3)

        def _procs(fn: str, h: FakeGpu, rows: list[tuple[int, int | None]]) -> list[SimpleNamespace]:
            me._enter(fn, h)
            if me.proc_growth:
                # More processes appeared than nvidia-ml-py's oversized buffer holds.
                me.proc_growth -= 1
                raise _real.NVMLError_InsufficientSize()
            return [SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=NOT_AVAILABLE & 0xFFFFFFFF,
                                    computeInstanceId=NOT_AVAILABLE & 0xFFFFFFFF) for pid, used in rows]

        def nvmlDeviceGetComputeRunningProcesses(h: FakeGpu):
            return _procs("nvmlDeviceGetComputeRunningProcesses", h, h.procs)

        def nvmlDeviceGetGraphicsRunningProcesses(h: FakeGpu):
            return _procs("nvmlDeviceGetGraphicsRunningProcesses", h, h.graphics)

        def nvmlDeviceGetMigMode(h: FakeGpu):
            me._enter("nvmlDeviceGetMigMode", h)
            if h.name.startswith("Tesla V100"):
                raise _real.NVMLError_NotSupported()
            on = _real.NVML_DEVICE_MIG_ENABLE if h.mig is not None else _real.NVML_DEVICE_MIG_DISABLE
            return [on, on]

        def nvmlDeviceGetMaxMigDeviceCount(h: FakeGpu) -> int:
            me._enter("nvmlDeviceGetMaxMigDeviceCount", h)
            return len(h.mig or [])

        def nvmlDeviceGetMigDeviceHandleByIndex(h: FakeGpu, i: int) -> FakeGpu:
            me._enter("nvmlDeviceGetMigDeviceHandleByIndex", h)
            slot = (h.mig or [])[i]
            if slot is None:
                raise _real.NVMLError_NotFound()
            return slot

        fns = dict(locals())
        for name, fn in fns.items():
            if name.startswith("nvml") and callable(fn):
                if old_api and name.startswith("nvmlDeviceGetMig") or (old_api and name == "nvmlDeviceGetMaxMigDeviceCount"):
                    continue  # MIG bindings arrived in nvidia-ml-py 11
                setattr(m, name, fn)
        return m
