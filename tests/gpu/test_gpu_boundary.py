"""The pynvml boundary: every NVML error code translated, and PynvmlBackend over a fake pynvml.

No GPU or driver exists here, so `pynvml` is replaced by a fake module exposing the same
names (NVMLError with `.value`, nvmlDevice* functions); the real backend code runs on it.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from sentinel.errors import InfrastructureError
from sentinel.gpu.nvml import (
    MemoryInfo,
    NvmlError,
    NvmlUnavailable,
    ProcessMemory,
    PynvmlBackend,
    translate,
)

pytestmark = pytest.mark.unit


def test_every_pynvml_error_code_has_a_kind():
    pynvml = pytest.importorskip("pynvml")
    codes = {getattr(pynvml, n) for n in dir(pynvml) if n.startswith("NVML_ERROR_")}
    kinds = {c: translate("memory", pynvml.NVMLError(c)).kind for c in codes}
    assert all(k and k.islower() for k in kinds.values())
    assert [c for c, k in kinds.items() if k == "unknown"] == [pynvml.NVML_ERROR_UNKNOWN]
    assert kinds[pynvml.NVML_ERROR_GPU_IS_LOST] == "gpu_is_lost"


def test_init_errors_that_mean_no_gpu_become_unavailable():
    err = translate("init", OSError("libnvidia-ml.so.1: cannot open shared object file"))
    assert isinstance(err, NvmlUnavailable) and err.kind == "library_not_found"
    assert isinstance(err, InfrastructureError)
    mid_run = translate("memory", SimpleNamespace(value=15))  # type: ignore[arg-type]
    assert type(mid_run) is NvmlError and "NVML memory failed" in str(mid_run)


class _NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(f"NVML error {value}")
        self.value = value


def _fake_pynvml(**overrides) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError
    m.NVML_DEVICE_MIG_ENABLE = 1
    m.nvmlMemory_v2 = 0x02000028
    m.nvmlInit = lambda: None
    m.nvmlShutdown = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    m.nvmlDeviceGetName = lambda h: "NVIDIA A100"
    m.nvmlDeviceGetUUID = lambda h: "GPU-1"

    def memory(h, version=None):
        if version is not None:
            return SimpleNamespace(total=100, used=30, free=60, reserved=10)
        return SimpleNamespace(total=100, used=40, free=60)

    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=37, memory=5)
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [SimpleNamespace(pid=7, usedGpuMemory=20),
                                                        SimpleNamespace(pid=8, usedGpuMemory=None)]
    m.nvmlDeviceGetGraphicsRunningProcesses = lambda h: [SimpleNamespace(pid=7, usedGpuMemory=20)]
    m.nvmlDeviceGetMigMode = lambda h: [0, 0]
    m.nvmlDeviceGetMaxMigDeviceCount = lambda h: 0
    m.nvmlDeviceGetMigDeviceHandleByIndex = lambda h, i: None
    for k, v in overrides.items():
        setattr(m, k, v)
    return m


def _raise(code: int):
    def f(*a, **k):
        raise _NVMLError(code)
    return f


@pytest.fixture
def backend(monkeypatch):
    def make(**overrides) -> PynvmlBackend:
        monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(**overrides))
        b = PynvmlBackend()
        b.init()
        return b
    return make


def test_memory_v2_with_reserved(backend):
    assert backend().memory("h0") == MemoryInfo(total=100, used=30, free=60, reserved=10)


def test_memory_falls_back_to_v1_on_old_drivers(backend):
    def memory(h, version=None):
        if version is not None:
            raise _NVMLError(13)  # function not found: driver older than R510
        return SimpleNamespace(total=100, used=40, free=60)

    b = backend(nvmlDeviceGetMemoryInfo=memory)
    assert b.memory("h0") == MemoryInfo(100, 40, 60, None)
    assert b.memory("h0").reserved is None  # v2 is not asked again


def test_memory_error_is_translated(backend):
    b = backend(nvmlDeviceGetMemoryInfo=_raise(15))
    with pytest.raises(NvmlError) as e:
        b.memory("h0")
    assert e.value.kind == "gpu_is_lost" and e.value.call == "memory_v2"


def test_utilization_is_a_ratio(backend):
    assert backend().utilization("h0") == pytest.approx(0.37)


def test_processes_merge_compute_and_graphics_and_keep_none(backend):
    assert backend().processes("h0") == [ProcessMemory(7, 20), ProcessMemory(8, None)]


def test_graphics_not_supported_is_ignored(backend):
    b = backend(nvmlDeviceGetGraphicsRunningProcesses=_raise(3))
    assert [p.pid for p in b.processes("h0")] == [7, 8]


def test_mig_handles_skip_empty_slots(backend):
    def by_index(h, i):
        if i == 1:
            raise _NVMLError(6)  # not found: an unused MIG slot
        return f"mig{i}"

    b = backend(nvmlDeviceGetMigMode=lambda h: [1, 1], nvmlDeviceGetMaxMigDeviceCount=lambda h: 3,
                nvmlDeviceGetMigDeviceHandleByIndex=by_index)
    assert b.mig_devices("h0") == ["mig0", "mig2"]


def test_no_mig_on_older_gpus(backend):
    assert backend(nvmlDeviceGetMigMode=_raise(3)).mig_devices("h0") == []


def test_init_failure_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(nvmlInit=_raise(9)))
    with pytest.raises(NvmlUnavailable) as e:
        PynvmlBackend().init()
    assert e.value.kind == "driver_not_loaded"


def test_calls_before_init_are_an_error():
    with pytest.raises(NvmlError, match="not initialised"):
        PynvmlBackend().device_count()
