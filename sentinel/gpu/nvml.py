"""The slice of NVML sentinel uses, behind an interface a fake can implement.

`Nvml` is the protocol the collector talks to; `PynvmlBackend` implements it over
nvidia-ml-py (`pynvml`), imported only when `init()` runs. Every pynvml error is
translated here into `NvmlError` (or its subclass `NvmlUnavailable` when the library
or driver is missing), with a short `kind` usable as a metric label, so nothing above
this module ever sees a pynvml type; other exceptions a binding raises become
`NvmlError(kind="unexpected")` for that call only. Figures NVML returns that cannot be
true (used > total, NVML_VALUE_NOT_AVAILABLE, utilization above 100%) raise
`NvmlError(kind="implausible_value")` rather than being exported as numbers. Strings are
decoded whether the binding returns `str` or (before nvidia-ml-py 11.515) `bytes`.

    NvmlError (InfrastructureError)   an NVML call failed; `kind`, `code`, `call`, `gpu`
    └── NvmlUnavailable               no library, no driver, no device access at init
"""

from __future__ import annotations

import re
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
    14: "corrupted_inforom",
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


# NVML_VALUE_NOT_AVAILABLE as an unsigned long long: what NVML puts in a field it cannot fill.
NOT_AVAILABLE_ULL = (1 << 64) - 1
# Kind of the error raised when NVML answers with figures that cannot be true (used > total, say).
IMPLAUSIBLE = "implausible_value"


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def text(value: Any) -> str:
    """A string NVML returned: nvidia-ml-py before 11.515 returns bytes, later versions str."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return str(value)


def explain(kind: str, detail: str) -> str:
    """A sentence saying why NVML is unusable, ending with NVML's own words."""
    base = _EXPLAIN.get(kind)
    return f"{base} ({detail})" if base else detail


class NvmlError(InfrastructureError):
    """An NVML call failed; `kind` is a short label (e.g. `gpu_is_lost`)."""

    def __init__(self, call: str, kind: str, detail: str, code: int | None = None, gpu: str | None = None):
        self.call, self.kind, self.detail, self.code = call, kind, detail, code
        self.gpu = gpu  # the device it concerns, set by the collector ("3", "0/mig1"); None: NVML as a whole
        super().__init__(f"NVML {call} failed: {detail} ({kind})")

    def __str__(self) -> str:
        where = f" on GPU {self.gpu}" if self.gpu is not None else ""
        return f"NVML {self.call} failed{where}: {self.detail} ({self.kind})"


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
    cls_name = type(exc).__name__
    if isinstance(code, int):
        kind = error_kind(code)
    elif cls_name.startswith("NVMLError_") and _snake(cls_name[len("NVMLError_"):]) in ERROR_KINDS.values():
        kind = _snake(cls_name[len("NVMLError_"):])  # a subclass raised without its code
    elif isinstance(exc, (ImportError, OSError)):
        kind = "library_not_found" if isinstance(exc, OSError) else "import_error"
    else:
        kind = "unknown"
    try:
        detail = str(exc) or cls_name
    except Exception:  # pynvml's __str__ asks the library, which may be what failed
        detail = f"{cls_name} (code {code})"
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
        except NvmlError:
            raise
        except Exception as exc:  # a binding bug or an old binding: this call failed, not the whole read
            raise NvmlError(call, "unexpected", f"{type(exc).__name__}: {exc}") from exc

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
            except Exception:  # NVMLError or worse: already gone, nothing to release, and the caller is resetting
                pass

    def driver_version(self) -> str:
        return text(self._call("driver_version", self._lib.nvmlSystemGetDriverVersion))

    def device_count(self) -> int:
        return int(self._call("device_count", self._lib.nvmlDeviceGetCount))

    def handle(self, index: int) -> Any:
        return self._call("handle", self._lib.nvmlDeviceGetHandleByIndex, index)

    def name(self, handle: Any) -> str:
        return text(self._call("name", self._lib.nvmlDeviceGetName, handle))

    def uuid(self, handle: Any) -> str:
        return text(self._call("uuid", self._lib.nvmlDeviceGetUUID, handle))

    def mig_devices(self, handle: Any) -> list[Any]:
        nv = self._lib
        get_mode = getattr(nv, "nvmlDeviceGetMigMode", None)
        if get_mode is None:
            return []  # nvidia-ml-py older than 11: no MIG bindings (and no MIG to see)
        try:
            current, _pending = self._call("mig_mode", get_mode, handle)
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
        if self._v2 and getattr(nv, "nvmlMemory_v2", None) is None:
            self._v2 = False  # nvidia-ml-py older than 11.510: only memory info v1
        if self._v2:
            try:
                m = self._call("memory_v2", nv.nvmlDeviceGetMemoryInfo, handle, nv.nvmlMemory_v2)
                return checked_memory("memory_v2", m.total, m.used, m.free, m.reserved)
            except NvmlError as exc:
                if exc.kind in ("function_not_found", "argument_version_mismatch") or (
                        exc.kind == "unexpected" and isinstance(exc.__cause__, (TypeError, AttributeError))):
                    self._v2 = False  # driver older than R510, or a binding without v2: v1 for good
                elif exc.kind not in ("not_supported", "invalid_argument"):
                    raise
                # else: this device (a MIG device, a vGPU) lacks v2; v1 for it, v2 still for others
        m = self._call("memory", nv.nvmlDeviceGetMemoryInfo, handle)
        return checked_memory("memory", m.total, m.used, m.free, None)

    def utilization(self, handle: Any) -> float:
        u = self._call("utilization", self._lib.nvmlDeviceGetUtilizationRates, handle)
        gpu = u.gpu
        if not isinstance(gpu, (int, float)) or isinstance(gpu, bool) or not 0 <= gpu <= 100:
            raise NvmlError("utilization", IMPLAUSIBLE, f"GPU utilization {gpu!r} is not a percentage")
        return float(gpu) / 100.0

    def processes(self, handle: Any) -> list[ProcessMemory]:
        nv = self._lib
        by_pid: dict[int, int | None] = {}
        for call, fn in (("compute_processes", nv.nvmlDeviceGetComputeRunningProcesses),
                         ("graphics_processes", nv.nvmlDeviceGetGraphicsRunningProcesses)):
            try:
                procs = self._process_list(call, fn, handle)
            except NvmlError as exc:
                if call == "graphics_processes" and exc.kind in ("not_supported", "function_not_found"):
                    continue  # compute-only boards
                raise
            for p in procs:
                used = p.usedGpuMemory
                if used is not None and not 0 <= int(used) < NOT_AVAILABLE_ULL:
                    used = None  # NVML_VALUE_NOT_AVAILABLE from a binding that did not map it to None
                used = None if used is None else int(used)
                pid = int(p.pid)
                if pid in by_pid:
                    # A "C+G" process is listed twice with the same figure: keep the one that is known.
                    prev = by_pid[pid]
                    used = prev if used is None else used if prev is None else max(prev, used)
                by_pid[pid] = used
        return [ProcessMemory(pid, used) for pid, used in sorted(by_pid.items())]

    def _process_list(self, call: str, fn: Callable[..., Any], handle: Any) -> list[Any]:
        # nvidia-ml-py sizes its buffer from a first call, then reads; processes starting in
        # between can overflow it (NVML_ERROR_INSUFFICIENT_SIZE). The list is new each time, so ask again.
        for attempt in range(_PROCESS_LIST_TRIES):
            try:
                return list(self._call(call, fn, handle))
            except NvmlError as exc:
                if exc.kind != "insufficient_size" or attempt == _PROCESS_LIST_TRIES - 1:
                    raise
        raise AssertionError("unreachable")


_PROCESS_LIST_TRIES = 3


def checked_memory(call: str, total: Any, used: Any, free: Any, reserved: Any) -> MemoryInfo:
    """MemoryInfo from NVML's figures, or NvmlError(IMPLAUSIBLE) when they cannot all be true.

    NVML_VALUE_NOT_AVAILABLE, used or free above total, used + free above total: a
    reading like that (seen on some vGPU and MIG setups, and from drivers mid-reset)
    would be exported as a wrong number, so it is refused instead.
    """
    vals = {"total": total, "used": used, "free": free, "reserved": reserved}
    ints: dict[str, int | None] = {}
    for k, v in vals.items():
        if v is None and k == "reserved":
            ints[k] = None
            continue
        try:
            ints[k] = int(v)
        except (TypeError, ValueError):
            ints[k] = -1
    t, u, f, r = ints["total"], ints["used"], ints["free"], ints["reserved"]
    assert t is not None and u is not None and f is not None
    bad = (any(x is not None and not 0 <= x < NOT_AVAILABLE_ULL for x in (t, u, f, r)) or t == 0
           or u > t or f > t or u + f > t or (r is not None and r > t))
    if bad:
        raise NvmlError(call, IMPLAUSIBLE, f"memory figures cannot all be true: total {vals['total']}, "
                                           f"used {vals['used']}, free {vals['free']}, reserved {vals['reserved']}")
    return MemoryInfo(t, u, f, r)
