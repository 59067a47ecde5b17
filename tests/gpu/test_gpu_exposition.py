"""The whole exposition of one scrape of a fake two-GPU (one MIG) machine, against a golden file.

The fake stands in for NVML because there is no GPU here. Set SENTINEL_UPDATE_GOLDEN=1
to rewrite tests/gpu/golden/exposition.txt instead of failing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from gpu_fakes import GIB, Clock, FakeDevice, FakeNvml, make_proc, nvml_error
from prometheus_client import CollectorRegistry, generate_latest

from sentinel.config import GpuConfig
from sentinel.gpu.collector import GpuCollector, ModelDemand
from sentinel.gpu.nvml import MemoryInfo, ProcessMemory
from sentinel.gpu.procfs import ProcFs

GOLDEN = Path(__file__).parent / "golden" / "exposition.txt"
UPDATE = os.environ.get("SENTINEL_UPDATE_GOLDEN") == "1"


def test_exposition_matches_golden_file(tmp_path):
    make_proc(tmp_path, 4242, comm="tritonserver")
    migs = [FakeDevice("MIG-1111", memory=MemoryInfo(20 * GIB, 6 * GIB, 14 * GIB, 0), utilization=None,
                       processes=[ProcessMemory(4242, 5 * GIB)])]
    nv = FakeNvml([FakeDevice("GPU-aaaa", processes=[ProcessMemory(4242, 9 * GIB), ProcessMemory(77, GIB)]),
                   FakeDevice("GPU-bbbb", name="NVIDIA A100", mig=migs)])
    nv.fail_once["processes"] = nvml_error("processes", 4)  # once, before the scrape that is recorded
    col = GpuCollector(nv, config=GpuConfig(process_names=("tritonserver",)),
                       demands=[ModelDemand("digits", 2 * GIB, "test")], proc=ProcFs(tmp_path),
                       clock=Clock(), threaded=False)
    col.snapshot()
    reg = CollectorRegistry()
    reg.register(col)
    text = generate_latest(reg).decode()
    if UPDATE:
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "exposition changed; rerun with SENTINEL_UPDATE_GOLDEN=1 if intended"


def test_promtool_accepts_the_exposition():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup.sh installs it)")
    res = subprocess.run([promtool, "check", "metrics"], input=GOLDEN.read_text(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
