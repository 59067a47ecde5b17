"""Faults behind the real pynvml API: PynvmlBackend and GpuCollector over a fake `pynvml` module.

`pynvml_fake.FakePynvml` replaces the module itself (real exception classes, real return
shapes), so these run the same code a GPU machine runs, with the faults on-call meets:
lost GPUs, old bindings, figures that cannot be true, slow drivers, vGPU limits.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_fakes import Clock, FakeDevice, FakeNvml
from pynvml_fake import GIB, NOT_AVAILABLE, FakeGpu, FakePynvml
from typer.testing import CliRunner

from sentinel.config import GpuConfig
from sentinel.gpu import collector as gc
from sentinel.gpu.collector import GpuCollector, ModelDemand
from sentinel.gpu.memory import estimate
from sentinel.gpu.nvml import PynvmlBackend, translate
from sentinel.gpu.procfs import ProcFs
from sentinel.reference.arch import ARCHS

ROOT = Path(__file__).resolve().parents[2]


class Scrape:
    def __init__(self, col: GpuCollector):
        self.samples = {(s.name, frozenset(s.labels.items())): s.value for fam in col.collect() for s in fam.samples}

    def __call__(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def gpus(self, name: str = "sentinel_gpu_memory_used_bytes") -> set[str]:
        return {dict(lbl)["gpu"] for n, lbl in self.samples if n == name}

    @property
    def success(self) -> float | None:
        return self("sentinel_collector_success", collector="gpu")


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    (root / "1").mkdir()  # the model server, PID 1 as NVML reports it
    return root


@pytest.fixture
def make(monkeypatch, proc_root):
    def build(fake: FakePynvml, **cfg) -> GpuCollector:
        monkeypatch.setitem(sys.modules, "pynvml", fake.module)
        demands = cfg.pop("demands", ())
        clock = cfg.pop("clock", None) or Clock()
        return GpuCollector(PynvmlBackend(), config=GpuConfig(**cfg), proc=ProcFs(proc_root), threaded=False,
                            demands=demands, clock=clock)
    return build


def test_bytes_strings_from_old_bindings_are_decoded(make):
    col = make(FakePynvml(bytes_strings=True))
    s = Scrape(col)
    assert s("sentinel_gpu_memory_total_bytes", gpu="0", uuid="GPU-0") == 80 * GIB
    assert col.status()["devices"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert col.status()["driver_version"] == "550.54.15"


def test_binding_without_memory_v2_or_mig_reads_memory_v1(make):
    col = make(FakePynvml(old_api=True))
    s = Scrape(col)
    assert s("sentinel_gpu_available") == 1
    assert s("sentinel_gpu_memory_used_bytes", gpu="0", uuid="GPU-0") == 10 * GIB + (512 << 20)
    assert s("sentinel_gpu_memory_reserved_bytes", gpu="0", uuid="GPU-0") is None
    assert s.success == 1


def test_foreign_exception_in_one_call_costs_only_that_series(make):
    fake = FakePynvml([FakeGpu("GPU-0"), FakeGpu("GPU-1")])
    fake.fail["nvmlDeviceGetUtilizationRates"] = TypeError("ctypes argument 1: wrong type")
    fake.fail_times["nvmlDeviceGetUtilizationRates"] = 1
    s = Scrape(make(fake))
    assert s("sentinel_gpu_available") == 1
    assert s("sentinel_gpu_utilization_ratio", gpu="0", uuid="GPU-0") is None
    assert s("sentinel_gpu_utilization_ratio", gpu="1", uuid="GPU-1") == 0.25
    assert s.gpus() == {"0", "1"}
    assert s("sentinel_gpu_errors_total", kind="unexpected") == 1 and s.success == 0


@pytest.mark.parametrize("gpu", [
    FakeGpu("GPU-0", used=90 * GIB, free=0),                       # used > total
    FakeGpu("GPU-0", used=NOT_AVAILABLE, free=0),                   # NVML_VALUE_NOT_AVAILABLE
    FakeGpu("GPU-0", total=0, used=0, free=0, reserved=0),          # a device mid-reset
])
def test_memory_figures_that_cannot_be_true_are_refused_then_recovered(make, gpu):
    fake = FakePynvml([gpu])
    col = make(fake, demands=[ModelDemand("m", GIB, "")])
    s = Scrape(col)
    assert s("sentinel_gpu_memory_used_bytes", gpu="0", uuid="GPU-0") is None
    assert s("sentinel_gpu_memory_total_bytes", gpu="0", uuid="GPU-0") is None
    assert s("sentinel_gpu_memory_headroom_bytes", model="m", gpu="0") is None
    assert s("sentinel_gpu_errors_total", kind="implausible_value") == 1 and s.success == 0
    assert col.status()["last_scrape"]["errors"][0]["gpu"] == "0"
    gpu.total, gpu.used, gpu.free, gpu.reserved = 80 * GIB, 10 * GIB, None, 512 << 20
    s = Scrape(col)
    assert s("sentinel_gpu_memory_used_bytes", gpu="0", uuid="GPU-0") == 10 * GIB and s.success == 1


def test_utilization_outside_0_to_100_percent_is_refused(make):
    s = Scrape(make(FakePynvml([FakeGpu("GPU-0", util=4294967295)])))
    assert s("sentinel_gpu_utilization_ratio", gpu="0", uuid="GPU-0") is None
    assert s("sentinel_gpu_errors_total", kind="implausible_value") == 1


def test_used_gpu_memory_not_available_value_is_no_figure(make):
    s = Scrape(make(FakePynvml([FakeGpu("GPU-0", procs=[(1, NOT_AVAILABLE)])])))
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="1") is None


def test_process_list_growing_between_calls_is_read_again(make):
    fake = FakePynvml([FakeGpu("GPU-0", procs=[(1, GIB)])])
    fake.proc_growth = 1  # NVMLError_InsufficientSize once
    s = Scrape(make(fake))
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="1") == GIB
    assert s.success == 1


def test_lost_gpu_is_named_others_kept_nvml_not_reinitialised_every_scrape(make, caplog):
    fake = FakePynvml([FakeGpu("GPU-0"), FakeGpu("GPU-1"), FakeGpu("GPU-2")])
    clock = Clock()
    col = make(fake, clock=clock)
    fake.devices[1].lost = True
    with caplog.at_level(logging.INFO, logger="sentinel.gpu.collector"):
        scrapes = [Scrape(col) for _ in range(5)]
        assert all(s.gpus() == {"0", "2"} and s.success == 0 for s in scrapes)
        assert fake.calls.count("nvmlInit") <= 2  # not a fresh (slow) nvmlInit on every scrape
        err = col.status()["last_scrape"]["errors"]
        assert [(e["kind"], e["gpu"]) for e in err] == [("gpu_is_lost", "1")]
        assert any("GPU 1" in r.getMessage() and "gpu_is_lost" in r.getMessage() for r in caplog.records)
        fake.devices[1].lost = False
        clock.now += gc.REINIT_INTERVAL_S + 1
        s = Scrape(col)
    assert s.gpus() == {"0", "1", "2"} and s.success == 1
    assert any("again" in r.getMessage() for r in caplog.records)  # the recovery is logged


def test_headroom_not_moved_to_other_gpus_when_the_servers_gpu_is_lost(make):
    fake = FakePynvml([FakeGpu("GPU-0"), FakeGpu("GPU-1", procs=[(1, GIB)]), FakeGpu("GPU-2")])
    col = make(fake, pids=(1,), demands=[ModelDemand("m", GIB, "")])
    s = Scrape(col)
    assert {k for k in s.gpus("sentinel_gpu_memory_headroom_bytes")} == {"1"}
    fake.devices[1].lost = True
    s = Scrape(col)
    assert "sentinel_gpu_memory_headroom_bytes" not in {n for n, _ in s.samples}


def test_memory_v2_not_supported_on_a_mig_device_keeps_v2_for_the_others(make):
    mig = FakeGpu("MIG-a", total=10 * GIB, used=GIB, reserved=0, v2=False)
    fake = FakePynvml([FakeGpu("GPU-0", mig=[mig]), FakeGpu("GPU-1")])
    s = Scrape(make(fake))
    assert s("sentinel_gpu_memory_total_bytes", gpu="0/mig0", uuid="MIG-a") == 10 * GIB
    assert s("sentinel_gpu_memory_reserved_bytes", gpu="1", uuid="GPU-1") == 512 << 20
    assert s.success == 1


def test_processes_not_supported_everywhere_is_explained(make):
    fake = FakePynvml([FakeGpu("GPU-0", procs=[(1, GIB)])])
    fake.fail["nvmlDeviceGetComputeRunningProcesses"] = fake.nv.NVMLError_NotSupported
    col = make(fake, pids=(1,))
    s = Scrape(col)
    assert s("sentinel_gpu_memory_used_bytes", gpu="0", uuid="GPU-0") == 10 * GIB and s.success == 1
    st = col.status()
    assert "per-process" in st["processes"]["problem"] and "vGPU" in st["processes"]["problem"]
    assert st["not_reported"] == ["processes on GPU 0 (not_supported)"]


def test_slow_nvml_on_eight_gpus_starves_no_device():
    nv = FakeNvml([FakeDevice(f"GPU-{i}") for i in range(8)])
    clock = Clock(tick=0.1)  # each clock read costs 0.1 s: about three devices per 0.5 s budget
    col = GpuCollector(nv, config=GpuConfig(scrape_budget_s=0.5), proc=ProcFs("/nonexistent"), clock=clock,
                       threaded=False)
    seen: set[str] = set()
    for _ in range(4):
        s = Scrape(col)
        seen |= s.gpus()
    assert seen == {str(i) for i in range(8)}
    assert "not read this time" in col.status()["last_scrape"]["errors"][0]["detail"]


def test_nvml_error_subclass_without_code_keeps_its_kind():
    class NVMLError(Exception):
        pass

    class NVMLError_GpuIsLost(NVMLError):  # noqa: N801 (pynvml's own spelling)
        pass

    assert translate("memory", NVMLError_GpuIsLost()).kind == "gpu_is_lost"


def test_status_command_waits_for_a_slow_nvml_init(monkeypatch, tmp_path):
    from sentinel.cli import app

    fake = FakePynvml([FakeGpu("GPU-0")])
    fake.delay["nvmlInit"] = 1.0  # nvmlInit on a many-GPU machine takes seconds
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["gpu", "status"])
    assert res.exit_code == 0, res.output
    assert "GPU-0" in res.output and "1 device(s)" in res.output


@pytest.mark.parametrize("kw,msg", [
    (dict(batch=10**7, resolution=224), "batch must be at most"),
    (dict(batch=8, resolution=10**6), "resolution must be at most"),
    (dict(batch=1.5, resolution=224), "batch must be a whole number"),
    (dict(batch=8, resolution=224.0), "resolution must be a whole number"),
])
def test_estimator_inputs_are_bounded(kw, msg):
    with pytest.raises(ValueError, match=msg):
        estimate(ARCHS["densenet121"], **kw)


def test_gpu_check_fails_loudly_without_nvidia_smi(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "timeout", "tee", "mkdir", "env"):
        path = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if path:
            (bindir / tool).symlink_to(path)
    env = {"PATH": str(bindir), "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 2
    assert "gpu_check: no nvidia-smi on PATH" in res.stderr and "nothing was run" in res.stderr
