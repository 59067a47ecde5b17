"""The shadow reference's CUDA probe: on a Linux host with no GPU device node it answers without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sentinel.analysis.shadow import _gpu_device_nodes

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("nodes", "expected"), [
    ((), False), (("nvidiactl", "nvidia-uvm"), False), (("nvidia0",), True), (("nvidia3",), True),
    (("kfd",), True), (("dxg",), True), (("null", "tty0"), False),
])
def test_device_nodes_that_mean_a_gpu(tmp_path, nodes, expected):
    for name in nodes:
        (tmp_path / name).touch()
    assert _gpu_device_nodes(tmp_path) is expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the device-node probe is Linux only")
def test_no_device_node_means_no_cuda_and_torch_stays_unimported():
    code = ("import sys; import sentinel.analysis.shadow as s; s._gpu_device_nodes = lambda: False; "
            "print(s._cuda_available(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
