"""Which GPU processes belong to the model server: PIDs, names and cgroups from /proc.

NVML reports host PIDs. A sidecar in its own PID namespace sees other numbers (or
none), so a PID NVML reports may not exist here; `ProcFs` answers from a /proc tree
given as an argument, which is what lets tests feed it a fake one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sentinel.config import GpuConfig

HOST_PID_FIX = (
    "NVML reports host PIDs, and this process runs in its own PID namespace, so it cannot "
    "attribute GPU memory to processes. Run the sidecar in the host PID namespace "
    "(Kubernetes: `hostPID: true` in the pod spec; Docker: `--pid=host`). "
    "`shareProcessNamespace: true` is not enough: it shares the pod's namespace, not the host's."
)


class ProcFs:
    """Read-only view of a /proc tree."""

    def __init__(self, root: str | Path = "/proc"):
        self.root = Path(root)

    def _read(self, pid: int, name: str) -> str | None:
        try:
            return (self.root / str(pid) / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None  # the process exited or is not visible: callers treat it as absent

    def exists(self, pid: int) -> bool:
        return (self.root / str(pid)).is_dir()

    def names(self, pid: int) -> set[str]:
        """`comm` and the basenames of argv[0] and argv[1] (interpreters run scripts)."""
        out: set[str] = set()
        comm = self._read(pid, "comm")
        if comm:
            out.add(comm.strip())
        cmdline = self._read(pid, "cmdline")
        if cmdline:
            for arg in [a for a in cmdline.split("\0") if a][:2]:
                out.add(os.path.basename(arg))
        return out

    def cgroups(self, pid: int) -> list[str]:
        """cgroup paths of a process (the third field of each /proc/PID/cgroup line)."""
        text = self._read(pid, "cgroup") or ""
        return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


def _under(path: str, prefix: str) -> bool:
    prefix = "/" + prefix.strip("/")
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


@dataclass(frozen=True)
class Attribution:
    """The model server's PIDs among those NVML reports, and why some could not be matched."""

    pids: frozenset[int]
    reported: int                 # processes NVML reported, all devices
    invisible: int                # of those, PIDs that do not exist in this PID namespace
    problem: str | None = None

    @property
    def fix(self) -> str | None:
        return HOST_PID_FIX if self.problem else None


def attribute(reported_pids: set[int], config: GpuConfig, proc: ProcFs) -> Attribution:
    """Select the model server's processes among `reported_pids` by PID, name or cgroup.

    With no selector configured, every reported process visible here is selected.
    """
    visible = {p for p in reported_pids if proc.exists(p)}
    invisible = len(reported_pids) - len(visible)
    selectors = bool(config.pids or config.process_names or config.cgroup)
    chosen: set[int] = set()
    for pid in reported_pids:
        if pid in config.pids:
            chosen.add(pid)
        elif pid in visible and not selectors:
            chosen.add(pid)
        elif pid in visible and config.process_names and proc.names(pid) & set(config.process_names):
            chosen.add(pid)
        elif pid in visible and config.cgroup and any(_under(c, config.cgroup) for c in proc.cgroups(pid)):
            chosen.add(pid)
    problem = None
    if reported_pids and not visible and not chosen:
        problem = (f"none of the {len(reported_pids)} processes NVML reports exist in this PID namespace "
                   f"(e.g. PID {min(reported_pids)})")
    elif config.pids and not chosen and invisible:
        missing = ", ".join(str(p) for p in sorted(config.pids))
        problem = (f"configured PIDs {missing} are not among the PIDs NVML reports, and {invisible} of "
                   "the reported PIDs do not exist here")
    return Attribution(frozenset(chosen), len(reported_pids), invisible, problem)
