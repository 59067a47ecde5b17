"""The slice of NVML sentinel uses, behind an interface a fake can implement.

`Nvml` is the protocol the collector talks to; `PynvmlBackend` implements it over
nvidia-ml-py (`pynvml`), imported only when `init()` runs. Every pynvml error is
translated here into `NvmlError` (or its subclass `NvmlUnavailable` when the library
or driver is missing), with a short `kind` usable as a metric label, so nothing above
this module ever sees a pynvml type.

    NvmlError (InfrastructureError)   an NVML call failed; `kind`, `code`, `call`
    └── NvmlUnavailable               no library, no driver, no device access at init
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sentinel.errors import InfrastructureError

T = TypeVar("T")

# NVML return codes (nvml.h) → metric label values. pynvml's own NVML_ERROR_* names
# are used when it is loaded (the label is the name, lower-cased); this table covers
# the codes sentinel acts on when it is not. Unknown codes map to "unknown", so the
# label set of sentinel_gpu_errors_total stays bounded.
ERROR_KINDS: dict[int, str] = {
    1: "uninitialized",
    2: "invalid_argument",
    3: "not_supported",
    4: "no_permission",
    6: "not_found",
    7: "insufficient_size",
    9: "driver_not_loaded",
    10: "timeout",
    12: "library_not_found",
    13: "function_not_found",
    15: "gpu_is_lost",
    16: "reset_required",
    17: "operating_system",
    18: "lib_rm_version_mismatch",
    20: "memory",
    999: "unknown",
}


def error_kind(code: int) -> str:
    """Label value for an NVML return code."""
    if code in ERROR_KINDS:
        return ERROR_KINDS[code]
    nv = sys.modules.get("pynvml")  # only consulted when pynvml raised, so already imported
    if nv is not None:
        for name in dir(nv):
            if name.startswith("NVML_ERROR_") and getattr(nv, name) == code:
                return name[len("NVML_ERROR_"):].lower()
    return "unknown"


# Kinds that mean "NVML cannot be used at all here", not "this call failed".
UNAVAILABLE_KINDS = frozenset({"library_not_found", "driver_not_loaded", "no_permission",
                               "lib_rm_version_mismatch", "operating_system", "import_error"})


# Plain sentences for the reasons NVML cannot start, shown in logs and `sentinel gpu status`.
_EXPLAIN: dict[str, str] = {
    "library_not_found": "libnvidia-ml.so.1 could not be loaded: no NVIDIA driver on this machine, "
                         "or the container was started without the NVIDIA container runtime",
    "driver_not_loaded": "the NVIDIA kernel driver is not loaded",
    "no_permission": "no permission to open the NVIDIA device files (/dev/nvidia*)",
    "lib_rm_version_mismatch": "libnvidia-ml and the kernel driver are different versions (reboot or reinstall)",
    "import_error": "the nvidia-ml-py package (import name pynvml) is not installed",
}


def explain(kind: str, detail: str) -> str:
    """A sentence saying why NVML is unusable, ending with NVML's own words."""
    base = _EXPLAIN.get(kind)
    return f"{base} ({detail})" if base else detail


class NvmlError(InfrastructureError):
    """An NVML call failed; `kind` is a short label (e.g. `gpu_is_lost`)."""

    def __init__(self, call: str, kind: str, detail: str, code: int | None = None):
        self.call, self.kind, self.detail, self.code = call, kind, detail, code
        super().__init__(f"NVML {call} failed: {detail} ({kind})")


class NvmlUnavailable(NvmlError):
    """NVML cannot be used on this machine (no library, no driver, no permission)."""


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory in bytes; `reserved` is None where the driver lacks memory info v2."""

    total: int
    used: int
    free: int
    reserved: int | None = None


@dataclass(frozen=True)
class ProcessMemory:
    """A process using a device; `used_bytes` is None when NVML cannot tell (e.g. WDDM, MIG)."""

    pid: int
    used_bytes: int | None


class Nvml(Protocol):
    """What the collector needs from NVML; handles are opaque."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def device_count(self) -> int: ...
    def handle(self, index: int) -> Any: ...
    def name(self, handle: Any) -> str: ...
    def uuid(self, handle: Any) -> str: ...
    def mig_devices(self, handle: Any) -> list[Any]:
        """MIG device handles of a physical GPU in MIG mode, else an empty list."""
        ...
    def memory(self, handle: Any) -> MemoryInfo: ...
    def utilization(self, handle: Any) -> float:
        """GPU busy ratio in [0, 1] over the driver's last sample period."""
        ...
    def processes(self, handle: Any) -> list[ProcessMemory]: ...


def translate(call: str, exc: BaseException) -> NvmlError:
    """The NvmlError for a foreign exception raised by `call` (see `ERROR_KINDS`)."""
    code = getattr(exc, "value", None)
    if isinstance(code, int):
        kind = error_kind(code)
    elif isinstance(exc, (ImportError, OSError)):
        kind = "library_not_found" if isinstance(exc, OSError) else "import_error"
    else:
        kind = "unknown"
    detail = str(exc) or type(exc).__name__
    cls = NvmlUnavailable if call == "init" and kind in UNAVAILABLE_KINDS else NvmlError
    return cls(call, kind, detail, code if isinstance(code, int) else None)


class PynvmlBackend:
    """`Nvml` over nvidia-ml-py; `pynvml` is imported by `init()`, not at module import."""

    def __init__(self) -> None:
        self._nv: Any = None
        self._v2 = True  # memory info v2 (with `reserved`) until the driver says otherwise

    @property
    def _lib(self) -> Any:
        if self._nv is None:
            raise NvmlError("call", "uninitialized", "NVML is not initialised; call init() first")
        return self._nv

    def _call(self, call: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except self._lib.NVMLError as exc:
            raise translate(call, exc) from exc

    def init(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailable("init", "import_error",
                                  f"the nvidia-ml-py package is not installed ({exc})") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise translate("init", exc) from exc
        except OSError as exc:  # a broken libnvidia-ml can fail in the loader itself
            raise translate("init", exc) from exc
        self._nv = pynvml

    def shutdown(self) -> None:
        if self._nv is not None:
            nv, self._nv = self._nv, None
            try:
                nv.nvmlShutdown()
            except nv.NVMLError:
                pass  # already gone: nothing to release, and the caller is resetting anyway

    def driver_version(self) -> str:
        return str(self._call("driver_version", self._lib.nvmlSystemGetDriverVersion))

    def device_count(self) -> int:
        return int(self._call("device_count", self._lib.nvmlDeviceGetCount))

    def handle(self, index: int) -> Any:
        return self._call("handle", self._lib.nvmlDeviceGetHandleByIndex, index)

    def name(self, handle: Any) -> str:
        return str(self._call("name", self._lib.nvmlDeviceGetName, handle))

    def uuid(self, handle: Any) -> str:
        return str(self._call("uuid", self._lib.nvmlDeviceGetUUID, handle))

    def mig_devices(self, handle: Any) -> list[Any]:
        nv = self._lib
        try:
            current, _pending = self._call("mig_mode", nv.nvmlDeviceGetMigMode, handle)
        except NvmlError as exc:
            if exc.kind in ("not_supported", "function_not_found"):
                return []  # pre-Ampere GPUs and old drivers have no MIG
            raise
        if current != nv.NVML_DEVICE_MIG_ENABLE:
            return []
        out = []
        for i in range(self._call("mig_count", nv.nvmlDeviceGetMaxMigDeviceCount, handle)):
            try:
                out.append(self._call("mig_handle", nv.nvmlDeviceGetMigDeviceHandleByIndex, handle, i))
            except NvmlError as exc:
                if exc.kind != "not_found":  # an empty MIG slot
                    raise
        return out

    def memory(self, handle: Any) -> MemoryInfo:
        nv = self._lib
        if self._v2:
            try:
                m = self._call("memory_v2", nv.nvmlDeviceGetMemoryInfo, handle, nv.nvmlMemory_v2)
                return MemoryInfo(int(m.total), int(m.used), int(m.free), int(m.reserved))
            except NvmlError as exc:
                if exc.kind not in ("function_not_found", "not_supported", "invalid_argument",
                                     "argument_version_mismatch"):
                    raise
                self._v2 = False  # driver older than R510: fall back to v1 for good
        m = self._call("memory", nv.nvmlDeviceGetMemoryInfo, handle)
        return MemoryInfo(int(m.total), int(m.used), int(m.free), None)

    def utilization(self, handle: Any) -> float:
        u = self._call("utilization", self._lib.nvmlDeviceGetUtilizationRates, handle)
        return float(u.gpu) / 100.0

    def processes(self, handle: Any) -> list[ProcessMemory]:
        nv = self._lib
        by_pid: dict[int, int | None] = {}
        for call, fn in (("compute_processes", nv.nvmlDeviceGetComputeRunningProcesses),
                         ("graphics_processes", nv.nvmlDeviceGetGraphicsRunningProcesses)):
            try:
                procs = self._call(call, fn, handle)
            except NvmlError as exc:
                if call == "graphics_processes" and exc.kind == "not_supported":
                    continue  # compute-only boards
                raise
            for p in procs:
                used = p.usedGpuMemory if p.usedGpuMemory is None else int(p.usedGpuMemory)
                prev = by_pid.get(int(p.pid))
                # A "C+G" process is listed twice with the same figure: keep one.
                by_pid[int(p.pid)] = used if prev is None else max(prev, used or 0)
        return [ProcessMemory(pid, used) for pid, used in sorted(by_pid.items())]
