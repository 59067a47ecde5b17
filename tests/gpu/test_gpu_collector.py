"""GpuCollector against a fake NVML (there is no GPU here), plus the real path without a driver."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from gpu_fakes import GIB, MIB512, Clock, FakeDevice, FakeNvml, make_proc, nvml_error, nvml_works
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sentinel.config import GpuConfig, ModelConfig
from sentinel.gpu import collector as gc
from sentinel.gpu.collector import GpuCollector, ModelDemand, build_collector, model_demands
from sentinel.gpu.nvml import MemoryInfo, ProcessMemory
from sentinel.gpu.procfs import HOST_PID_FIX, ProcFs


class Scrape:
    """The samples of one `collect()` call (one scrape), looked up by name and labels."""

    def __init__(self, col: GpuCollector):
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for fam in col.collect() for s in fam.samples}

    def __call__(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def names(self) -> set[str]:
        return {n for n, _ in self.samples}


def success(s: Scrape) -> float | None:
    return s("sentinel_collector_success", collector="gpu")


def collector(nv: FakeNvml, proc_root: Path, **cfg) -> GpuCollector:
    return GpuCollector(nv, config=GpuConfig(**cfg), proc=ProcFs(proc_root), threaded=False)


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    return root


# -- the real path on this machine -------------------------------------------------------

@pytest.mark.skipif(nvml_works(), reason="this machine has a working NVIDIA driver")
def test_real_backend_without_driver_reports_unavailable_and_raises_nothing():
    col = build_collector(GpuConfig())
    s = Scrape(col)
    assert s("sentinel_gpu_available") == 0
    assert success(s) == 1  # enabled: auto, so no GPU is a healthy state
    st = col.status()
    assert st["available"] is False
    assert "libnvidia-ml" in st["reason"]
    assert st["devices"] == []


# -- devices -------------------------------------------------------------------------------

def test_device_series_with_memory_v2_and_utilization(proc_root):
    nv = FakeNvml([FakeDevice("GPU-aaaa"), FakeDevice("GPU-bbbb", memory=MemoryInfo(16 * GIB, GIB, 15 * GIB),
                                                      utilization=0.5)])
    s = Scrape(collector(nv, proc_root))
    assert s("sentinel_gpu_available") == 1
    assert s("sentinel_gpu_memory_total_bytes", gpu="0", uuid="GPU-aaaa") == 80 * GIB
    assert s("sentinel_gpu_memory_used_bytes", gpu="0", uuid="GPU-aaaa") == 10 * GIB
    assert s("sentinel_gpu_memory_reserved_bytes", gpu="0", uuid="GPU-aaaa") == MIB512
    assert s("sentinel_gpu_utilization_ratio", gpu="1", uuid="GPU-bbbb") == 0.5
    # Memory info v1 (old driver): no reserved figure, so no series rather than 0.
    assert s("sentinel_gpu_memory_reserved_bytes", gpu="1", uuid="GPU-bbbb") is None
    assert success(s) == 1


def test_register_does_not_touch_nvml_and_exposition_parses(proc_root):
    nv = FakeNvml()
    col = collector(nv, proc_root)
    reg = CollectorRegistry()
    reg.register(col)
    assert nv.calls == []  # describe() names families without reading NVML
    text = generate_latest(reg).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"sentinel_gpu_available", "sentinel_gpu_memory_used_bytes", "sentinel_gpu_errors",
            "sentinel_collector_success"} <= names


def test_self_metrics_can_be_left_to_the_daemon(proc_root):
    col = GpuCollector(FakeNvml(), proc=ProcFs(proc_root), threaded=False, self_metrics=False)
    s = Scrape(col)
    assert success(s) is None
    assert s("sentinel_gpu_available") == 1


def test_utilization_not_supported_is_omitted_not_an_error(proc_root):
    nv = FakeNvml([FakeDevice("GPU-aaaa", utilization=None)])
    s = Scrape(collector(nv, proc_root))
    assert s("sentinel_gpu_utilization_ratio", gpu="0", uuid="GPU-aaaa") is None
    assert s("sentinel_gpu_memory_used_bytes", gpu="0", uuid="GPU-aaaa") == 10 * GIB
    assert success(s) == 1


def test_mig_devices_are_read_through_their_own_handles(proc_root):
    make_proc(proc_root, 4242)
    migs = [FakeDevice("MIG-1111", memory=MemoryInfo(10 * GIB, 2 * GIB, 8 * GIB), utilization=None,
                       processes=[ProcessMemory(4242, GIB)]),
            FakeDevice("MIG-2222", memory=MemoryInfo(10 * GIB, 0, 10 * GIB), utilization=None)]
    nv = FakeNvml([FakeDevice("GPU-aaaa", mig=migs, processes=[ProcessMemory(9, 1)])])
    col = collector(nv, proc_root)
    s = Scrape(col)
    assert s("sentinel_gpu_memory_used_bytes", gpu="0/mig0", uuid="MIG-1111") == 2 * GIB
    assert s("sentinel_gpu_memory_total_bytes", gpu="0/mig1", uuid="MIG-2222") == 10 * GIB
    assert s("sentinel_gpu_memory_total_bytes", gpu="0", uuid="GPU-aaaa") == 80 * GIB
    assert s("sentinel_gpu_process_memory_bytes", gpu="0/mig0", pid="4242") == GIB
    # Processes are read on MIG devices only; the parent's list is not consulted.
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="9") is None
    assert success(s) == 1
    assert [d["mig_parent"] for d in col.status()["devices"]] == [None, "0", "0"]


# -- processes -----------------------------------------------------------------------------

def _procs_device(*pids_used):
    return FakeDevice("GPU-aaaa", processes=[ProcessMemory(p, u) for p, u in pids_used])


def test_processes_selected_by_configured_pid(proc_root):
    make_proc(proc_root, 100)
    make_proc(proc_root, 200)
    nv = FakeNvml([_procs_device((100, GIB), (200, 2 * GIB))])
    s = Scrape(collector(nv, proc_root, pids=(200,)))
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="200") == 2 * GIB
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="100") is None


def test_processes_selected_by_name(proc_root):
    make_proc(proc_root, 100, comm="tritonserver", cmdline=("/opt/tritonserver/bin/tritonserver", "--model-repository=/m"))
    make_proc(proc_root, 200, comm="python3", cmdline=("python3", "/srv/torchserve_worker.py"))
    make_proc(proc_root, 300, comm="other")
    nv = FakeNvml([_procs_device((100, GIB), (200, 2 * GIB), (300, 3 * GIB))])
    s = Scrape(collector(nv, proc_root, process_names=("tritonserver", "torchserve_worker.py")))
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="100") == GIB
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="200") == 2 * GIB
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="300") is None


def test_processes_selected_by_cgroup(proc_root):
    pod = "/kubepods/burstable/pod1234/abcd"
    make_proc(proc_root, 100, cgroup=f"0::{pod}")
    make_proc(proc_root, 200, cgroup="0::/kubepods/burstable/pod12345/ffff")  # a prefix, not a parent
    nv = FakeNvml([_procs_device((100, GIB), (200, 2 * GIB))])
    s = Scrape(collector(nv, proc_root, cgroup="/kubepods/burstable/pod1234"))
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="100") == GIB
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="200") is None


def test_without_selectors_every_visible_process_is_reported(proc_root):
    make_proc(proc_root, 100)
    nv = FakeNvml([_procs_device((100, GIB), (555, 2 * GIB))])
    s = Scrape(collector(nv, proc_root))
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="100") == GIB
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="555") is None


def test_used_gpu_memory_none_gives_no_series(proc_root):
    make_proc(proc_root, 100)
    nv = FakeNvml([_procs_device((100, None))])
    col = collector(nv, proc_root, pids=(100,))
    s = Scrape(col)
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="100") is None
    assert success(s) == 1
    assert col.status()["devices"][0]["processes"] == [{"pid": 100, "used_bytes": None, "attributed": True}]


def test_pids_outside_this_pid_namespace_are_absent_and_explained(proc_root):
    make_proc(proc_root, 1, comm="sentinel")  # the sidecar's own namespace: PID 1 and little else
    nv = FakeNvml([_procs_device((48213, 3 * GIB), (48214, GIB))])
    col = collector(nv, proc_root, process_names=("tritonserver",))
    s = Scrape(col)
    assert "sentinel_gpu_process_memory_bytes" not in s.names()  # absent, not 0
    assert success(s) == 1  # an operator fix, not a collector failure
    procs = col.status()["processes"]
    assert procs["reported"] == 2 and procs["not_in_this_pid_namespace"] == 2
    assert "PID namespace" in procs["problem"]
    assert procs["fix"] == HOST_PID_FIX and "hostPID: true" in procs["fix"]


def test_configured_namespace_pid_not_reported_by_nvml_is_explained(proc_root):
    make_proc(proc_root, 7)  # the model server as this namespace numbers it
    make_proc(proc_root, 100)
    nv = FakeNvml([_procs_device((100, GIB), (48213, 3 * GIB))])
    col = collector(nv, proc_root, pids=(7,))
    s = Scrape(col)
    assert s("sentinel_gpu_process_memory_bytes", gpu="0", pid="7") is None
    assert "configured PIDs 7" in col.status()["processes"]["problem"]


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("call,code,kind", [
    ("memory", 15, "gpu_is_lost"),
    ("uuid", 999, "unknown"),
    ("handle", 2, "invalid_argument"),
    ("processes", 4, "no_permission"),
    ("device_count", 10, "timeout"),
    ("mig_devices", 1, "uninitialized"),
    ("utilization", 999, "unknown"),
])
def test_nvml_error_mid_run_is_counted_marks_scrape_failed_and_next_scrape_retries(proc_root, call, code, kind):
    nv = FakeNvml([FakeDevice("GPU-aaaa", processes=[ProcessMemory(1, GIB)])])
    make_proc(proc_root, 1)
    nv.fail_once[call] = nvml_error(call, code)
    col = collector(nv, proc_root)
    s = Scrape(col)
    assert s("sentinel_gpu_errors_total", kind=kind) == 1
    assert success(s) == 0
    assert s("sentinel_gpu_available") == 1
    assert col.status()["last_scrape"]["errors"][0]["kind"] == kind
    # The next scrape retries and succeeds; the count stays.
    s = Scrape(col)
    assert success(s) == 1
    assert s("sentinel_gpu_errors_total", kind=kind) == 1
    assert s("sentinel_gpu_memory_used_bytes", gpu="0", uuid="GPU-aaaa") == 10 * GIB


def test_failed_call_drops_only_its_series(proc_root):
    nv = FakeNvml([FakeDevice("GPU-aaaa"), FakeDevice("GPU-bbbb")])
    nv.fail_once["memory"] = nvml_error("memory", 15)  # the first device's memory read
    s = Scrape(collector(nv, proc_root))
    assert s("sentinel_gpu_memory_used_bytes", gpu="0", uuid="GPU-aaaa") is None
    assert s("sentinel_gpu_utilization_ratio", gpu="0", uuid="GPU-aaaa") == 0.25
    assert s("sentinel_gpu_memory_used_bytes", gpu="1", uuid="GPU-bbbb") == 10 * GIB


def test_driver_level_error_reinitialises_nvml_on_next_scrape(proc_root):
    nv = FakeNvml()
    col = collector(nv, proc_root)
    nv.fail_once["memory"] = nvml_error("memory", 15)  # GPU is lost
    col.snapshot()
    assert (nv.inits, nv.shutdowns) == (1, 1)
    col.snapshot()
    assert nv.inits == 2
    assert col.status()["last_scrape"]["success"] is True


def test_unexpected_exception_is_counted_not_raised(proc_root):
    nv = FakeNvml()
    nv.fail_once["memory"] = RuntimeError("ctypes blew up")
    col = GpuCollector(nv, proc=ProcFs(proc_root))  # threaded: the worker's exception reaches collect()
    s = Scrape(col)
    assert s("sentinel_gpu_errors_total", kind="unexpected") == 1
    assert success(s) == 0


def test_unavailable_library_logged_once_and_retried_later(proc_root, caplog):
    nv = FakeNvml(unavailable="library_not_found")
    clock = Clock()
    col = GpuCollector(nv, config=GpuConfig(), proc=ProcFs(proc_root), clock=clock, threaded=False)
    with caplog.at_level(logging.INFO, logger="sentinel.gpu.collector"):
        scrapes = [Scrape(col) for _ in range(4)]
    s = scrapes[-1]
    assert s("sentinel_gpu_available") == 0
    assert success(s) == 1
    assert s("sentinel_gpu_errors_total", kind="library_not_found") is None  # not an error: a fact
    assert nv.inits == 1  # not asked again within REINIT_INTERVAL_S
    logged = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(logged) == 1 and "libnvidia-ml.so.1" in logged[0].getMessage()
    clock.now += gc.REINIT_INTERVAL_S + 1
    col.snapshot()
    assert nv.inits == 2


def test_unavailable_with_enabled_on_is_a_failure(proc_root, caplog):
    nv = FakeNvml(unavailable="driver_not_loaded")
    with caplog.at_level(logging.INFO, logger="sentinel.gpu.collector"):
        col = collector(nv, proc_root, enabled="on")
        s = Scrape(col)
        Scrape(col)
    assert s("sentinel_gpu_available") == 0
    assert success(s) == 0
    logged = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.ERROR
    assert "kernel driver is not loaded" in col.status()["reason"]


def test_disabled_collector_reads_nothing():
    col = build_collector(GpuConfig(enabled="off"))
    s = Scrape(col)
    assert s("sentinel_gpu_available") == 0
    assert "disabled" in col.status()["reason"]


def test_hung_nvml_call_times_out_and_is_not_piled_up(proc_root):
    nv = FakeNvml()
    nv.delay["memory"] = 5.0
    col = GpuCollector(nv, config=GpuConfig(scrape_budget_s=0.05), proc=ProcFs(proc_root))
    try:
        t0 = time.monotonic()
        s = Scrape(col)
        assert time.monotonic() - t0 < 1.0
        assert s("sentinel_gpu_errors_total", kind="scrape_timeout") == 1
        assert success(s) == 0
        Scrape(col)  # second scrape while the first read is still blocked
        assert nv.max_active == 1 and nv.calls.count("memory") == 1
        assert col.status()["errors_total"]["scrape_timeout"] == 2
    finally:
        nv.release.set()
    nv.delay.clear()
    deadline = time.monotonic() + 2
    while col._pending is not None and not col._pending.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    col.snapshot()
    assert col.status()["last_scrape"]["success"] is True


def test_budget_spent_between_devices_stops_the_read(proc_root):
    nv = FakeNvml([FakeDevice("GPU-aaaa"), FakeDevice("GPU-bbbb")])
    clock = Clock(tick=0.3)  # every clock read costs 0.3 s against a 0.5 s budget
    col = GpuCollector(nv, config=GpuConfig(scrape_budget_s=0.5), proc=ProcFs(proc_root), clock=clock,
                       threaded=False)
    s = Scrape(col)
    assert s("sentinel_gpu_errors_total", kind="budget_exceeded") == 1
    assert success(s) == 0


# -- headroom -------------------------------------------------------------------------------

def test_headroom_is_free_memory_minus_predicted_need(proc_root):
    nv = FakeNvml([FakeDevice("GPU-aaaa"), FakeDevice("GPU-bbbb", memory=MemoryInfo(16 * GIB, 15 * GIB, GIB))])
    demands = [ModelDemand("digits", 3 * GIB, "test"), ModelDemand("unknown", None, "no entry")]
    col = GpuCollector(nv, demands=demands, proc=ProcFs(proc_root), threaded=False)
    s = Scrape(col)
    assert s("sentinel_gpu_memory_headroom_bytes", model="digits", gpu="0") == 70 * GIB - MIB512 - 3 * GIB
    assert s("sentinel_gpu_memory_headroom_bytes", model="digits", gpu="1") == -2 * GIB  # would OOM
    assert s("sentinel_gpu_memory_headroom_bytes", model="unknown", gpu="0") is None


def test_headroom_only_on_devices_the_model_server_uses(proc_root):
    make_proc(proc_root, 100)
    nv = FakeNvml([FakeDevice("GPU-aaaa"), FakeDevice("GPU-bbbb", processes=[ProcessMemory(100, GIB)])])
    col = GpuCollector(nv, config=GpuConfig(pids=(100,)), demands=[ModelDemand("m", GIB, "")],
                       proc=ProcFs(proc_root), threaded=False)
    s = Scrape(col)
    assert s("sentinel_gpu_memory_headroom_bytes", model="m", gpu="0") is None
    assert s("sentinel_gpu_memory_headroom_bytes", model="m", gpu="1") is not None


def _entry(name: str, version: str, arch: str, shape: tuple[int, ...], classes: int):
    from sentinel.reference.densenet import resolve_config

    cfg = resolve_config(arch, num_classes=classes)
    manifest = SimpleNamespace(arch=arch, input=SimpleNamespace(shape=shape, dtype="float32"))
    return SimpleNamespace(name=name, version=version, spec=f"{name}:{version}", manifest=manifest,
                           densenet_config=lambda: cfg)


def test_model_demands_from_registry_entry_architecture_and_input_shape():
    from sentinel.gpu.memory import estimate
    from sentinel.reference.densenet import ARCHS

    models = [ModelConfig("digits", "v3", max_batch=64), ModelConfig("cats", "v1")]
    entries = [_entry("digits", "v2", "densenet_digits", (1, 32, 32), 10),
               _entry("digits", "v3", "densenet_digits", (1, 32, 32), 10)]
    d = {m.model: m for m in model_demands(models, entries)}
    want = estimate(ARCHS["densenet_digits"], batch=64, resolution=32, backend="cuda").extra_bytes
    assert d["digits"].extra_bytes == want and "digits:v3" in d["digits"].detail
    assert d["cats"].extra_bytes is None and "no registry entry" in d["cats"].detail


def test_build_collector_wires_demands_and_fake_backend(proc_root):
    entries = {"digits": _entry("digits", "v3", "densenet_digits", (1, 32, 32), 10)}
    col = build_collector(GpuConfig(), [ModelConfig("digits", "v3", max_batch=8)], entries,
                          nvml=FakeNvml(), proc=ProcFs(proc_root))
    col.threaded = False
    s = Scrape(col)
    assert s("sentinel_gpu_memory_headroom_bytes", model="digits", gpu="0") is not None
    assert col.status()["models"][0]["extra_bytes"] > 0


def test_collector_import_and_scrape_load_neither_torch_nor_pynvml_eagerly():
    import subprocess
    import sys

    code = ("import sys\n"
            "from prometheus_client import CollectorRegistry, generate_latest\n"
            "from sentinel.config import GpuConfig\n"
            "from sentinel.gpu.collector import build_collector\n"
            "assert 'pynvml' not in sys.modules\n"
            "r = CollectorRegistry(); r.register(build_collector(GpuConfig())); generate_latest(r)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_lasting_fault_is_logged_when_it_starts_and_counted_every_scrape(proc_root, caplog):
    nv = FakeNvml()
    nv.fail["memory"] = nvml_error("memory", 15)
    col = collector(nv, proc_root)
    with caplog.at_level(logging.WARNING, logger="sentinel.gpu.collector"):
        scrapes = [Scrape(col) for _ in range(3)]
    assert scrapes[-1]("sentinel_gpu_errors_total", kind="gpu_is_lost") == 3
    assert len([r for r in caplog.records if "gpu_is_lost" in r.getMessage()]) == 1
