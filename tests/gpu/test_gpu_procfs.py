"""Reading process names and cgroups from a fake /proc tree."""

from __future__ import annotations

import pytest
from gpu_fakes import make_proc

from sentinel.config import GpuConfig
from sentinel.gpu.procfs import ProcFs, attribute

pytestmark = pytest.mark.unit


def test_names_and_cgroups(tmp_path):
    make_proc(tmp_path, 5, comm="python3", cmdline=("/usr/bin/python3", "/app/serve.py", "--port=8081"),
              cgroup="12:memory:/kubepods/pod1/c1\n0::/kubepods/pod1/c1")
    p = ProcFs(tmp_path)
    assert p.names(5) == {"python3", "serve.py"}
    assert p.cgroups(5) == ["/kubepods/pod1/c1", "/kubepods/pod1/c1"]
    assert p.names(6) == set() and p.cgroups(6) == [] and not p.exists(6)


def test_no_processes_no_problem(tmp_path):
    a = attribute(set(), GpuConfig(pids=(1,)), ProcFs(tmp_path))
    assert a.pids == frozenset() and a.problem is None and a.fix is None


def test_configured_host_pids_are_taken_even_when_not_visible(tmp_path):
    # With hostPID the operator may configure host PIDs; they are NVML's numbers.
    a = attribute({4000, 4001}, GpuConfig(pids=(4000,)), ProcFs(tmp_path))
    assert a.pids == frozenset({4000})
    assert a.problem is None
