"""Prometheus collector for GPU memory: devices, model-server processes, OOM headroom.

`GpuCollector.collect()` reads NVML on each scrape (in a worker thread, waited on for
at most `GpuConfig.scrape_budget_s`, so a hung driver call cannot hang /metrics) and
builds fresh metric families. Failures are visible, never silent:

- no library or driver: `sentinel_gpu_available 0`, the reason logged once and kept
  in `status()`; with `enabled: auto` that is a healthy state (collector_success 1),
  with `enabled: on` it is a failure (collector_success 0);
- an NVML call failing mid-run: `sentinel_gpu_errors_total{kind}` counts it, the
  series it would have produced are absent, collector_success is 0 for that scrape,
  the log line and `status()` name the call and the GPU, and the next scrape tries
  again (re-initialising NVML after session-level errors at once, after a lost GPU at
  most every REINIT_INTERVAL_S); the first clean scrape after a fault is logged;
- figures NVML returns that cannot be true (used > total, utilization > 100%): counted
  as `implausible_value`, series absent, never exported as numbers;
- a slow NVML: the read stops when the budget is spent, and the next read starts at
  the first device left unread, so no device is starved on a machine with many GPUs;
- PIDs NVML reports that do not exist in this PID namespace: process series absent
  (not 0) and `status()["processes"]` says how to fix it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sentinel import metricnames as mn
from sentinel.config import GpuConfig, ModelConfig
from sentinel.gpu.nvml import (
    MemoryInfo,
    Nvml,
    NvmlError,
    NvmlUnavailable,
    ProcessMemory,
    PynvmlBackend,
    explain,
)
from sentinel.gpu.procfs import Attribution, ProcFs, attribute

log = logging.getLogger(__name__)

COLLECTOR = "gpu"
REINIT_INTERVAL_S = 60.0  # how often a machine without NVML is asked again (dlopen is not free)
# Errors after which the NVML session is torn down and initialised afresh next scrape.
_REINIT_KINDS = frozenset({"uninitialized", "driver_not_loaded", "lib_rm_version_mismatch"})
# Device-level errors that may need a fresh session to clear (a GPU back from a reset), but
# re-initialising NVML is slow (seconds with many GPUs), so at most every REINIT_INTERVAL_S.
_DEVICE_REINIT_KINDS = frozenset({"gpu_is_lost", "reset_required"})
# "Not supported" is a property of the device (utilisation on MIG, say), not a failure.
_OPTIONAL_KINDS = frozenset({"not_supported", "function_not_found"})


@dataclass(frozen=True)
class ModelDemand:
    """Predicted extra device memory a served model needs at its configured max batch."""

    model: str
    extra_bytes: int | None   # input + activation peak; None when unknown
    detail: str               # how it was derived, or why it is unknown


@dataclass(frozen=True)
class DeviceReading:
    """One device (a physical GPU, or a MIG device as `"<gpu>/mig<i>"`) as read this scrape."""

    gpu: str
    uuid: str
    name: str | None
    memory: MemoryInfo | None
    utilization: float | None
    processes: tuple[ProcessMemory, ...] | None  # None: not read (error)
    mig_parent: str | None = None
    leaf: bool = True  # a device a process can run on (not a MIG-mode parent)


@dataclass(frozen=True)
class Snapshot:
    """Everything one NVML read produced, including the errors it met."""

    available: bool
    reason: str | None = None
    driver: str | None = None
    devices: tuple[DeviceReading, ...] = ()
    errors: tuple[NvmlError, ...] = ()


class _Reader:
    """One NVML session: initialises lazily, reads snapshots, resets after driver errors."""

    def __init__(self, nvml: Nvml, clock: Callable[[], float]):
        self.nvml = nvml
        self.clock = clock
        self.ready = False
        self.unavailable: NvmlError | None = None
        self.next_init = 0.0
        self.driver: str | None = None
        self.optional_logged: set[tuple[str, str]] = set()
        self.unsupported: dict[tuple[str, str], str] = {}  # (what, gpu) -> kind, from the last read
        self.start = 0  # device index the next read starts at (after a read cut short by the budget)
        self.last_device_reset = -float("inf")

    def _init(self) -> None:
        if self.ready:
            return
        now = self.clock()
        if self.unavailable is not None and now < self.next_init:
            raise self.unavailable
        try:
            self.nvml.init()
        except NvmlError as exc:
            self.unavailable, self.next_init = exc, now + REINIT_INTERVAL_S
            raise
        self.ready, self.unavailable = True, None
        try:
            self.driver = self.nvml.driver_version()
        except NvmlError:
            self.driver = None  # informational only

    def _reset(self) -> None:
        self.ready = False
        self.nvml.shutdown()

    def read(self, deadline: float) -> Snapshot:
        try:
            self._init()
        except NvmlUnavailable as exc:
            return Snapshot(False, explain(exc.kind, exc.detail))
        except NvmlError as exc:
            return Snapshot(False, explain(exc.kind, exc.detail), errors=(exc,))
        errors: list[NvmlError] = []
        devices: list[DeviceReading] = []
        self.unsupported = {}
        try:
            count = self.nvml.device_count()
        except NvmlError as exc:
            errors.append(exc)
            count = 0
        first = self.start if 0 <= self.start < count else 0
        order = [(first + k) % count for k in range(count)]
        self.start = 0
        for k, i in enumerate(order):
            if self.clock() > deadline:
                left = sorted(order[k:])
                errors.append(NvmlError("scrape", "budget_exceeded",
                                        f"scrape budget spent after {k} of {count} devices; not read this time: "
                                        f"GPU {', '.join(map(str, left))} (read first next time)"))
                self.start = i
                break
            try:
                devices.extend(self._device(i, errors))
            except Exception as exc:  # a bug or a foreign error on one device must not cost the others
                errors.append(NvmlError("device", "unexpected", f"{type(exc).__name__}: {exc}", gpu=str(i)))
        devices.sort(key=lambda d: int(d.gpu.split("/", 1)[0]))
        now = self.clock()
        if any(e.kind in _REINIT_KINDS for e in errors):
            self._reset()
        elif any(e.kind in _DEVICE_REINIT_KINDS for e in errors) and now - self.last_device_reset >= REINIT_INTERVAL_S:
            self.last_device_reset = now
            self._reset()
        return Snapshot(True, None, self.driver, tuple(devices), tuple(errors))

    def _optional(self, call: Callable[[], Any], what: str, gpu: str, errors: list[NvmlError]) -> Any:
        try:
            return call()
        except NvmlError as exc:
            if exc.kind in _OPTIONAL_KINDS:
                self.unsupported[(what, gpu)] = exc.kind
                if (what, gpu) not in self.optional_logged:
                    self.optional_logged.add((what, gpu))
                    log.info("GPU %s does not report %s (%s); that series is omitted", gpu, what, exc.kind)
                return None
            errors.append(_on(exc, gpu))
            return None

    def _device(self, index: int, errors: list[NvmlError]) -> list[DeviceReading]:
        gpu = str(index)
        try:
            h = self.nvml.handle(index)
            uuid = self.nvml.uuid(h)
        except NvmlError as exc:
            errors.append(_on(exc, gpu))
            return []  # without a handle and uuid there is nothing to label
        name = self._optional(lambda: self.nvml.name(h), "name", gpu, errors)
        memory = self._optional(lambda: self.nvml.memory(h), "memory", gpu, errors)
        util = self._optional(lambda: self.nvml.utilization(h), "utilization", gpu, errors)
        try:
            migs = self.nvml.mig_devices(h)
        except NvmlError as exc:
            errors.append(_on(exc, gpu))
            migs = []
        out: list[DeviceReading] = []
        if migs:
            # MIG mode: processes run on MIG devices, which have their own handles and memory.
            out.append(DeviceReading(gpu, uuid, name, memory, util, None, leaf=False))
            for j, mh in enumerate(migs):
                mgpu = f"{gpu}/mig{j}"
                try:
                    muuid = self.nvml.uuid(mh)
                except NvmlError as exc:
                    errors.append(_on(exc, mgpu))
                    continue
                mmem = self._optional(lambda: self.nvml.memory(mh), "memory", mgpu, errors)  # noqa: B023 (called at once)
                mutil = self._optional(lambda: self.nvml.utilization(mh), "utilization", mgpu, errors)  # noqa: B023
                mprocs = self._processes(mh, mgpu, errors)
                out.append(DeviceReading(mgpu, muuid, name, mmem, mutil, mprocs, mig_parent=gpu))
        else:
            out.append(DeviceReading(gpu, uuid, name, memory, util, self._processes(h, gpu, errors)))
        return out

    def _processes(self, h: Any, gpu: str, errors: list[NvmlError]) -> tuple[ProcessMemory, ...] | None:
        procs = self._optional(lambda: self.nvml.processes(h), "processes", gpu, errors)
        return None if procs is None else tuple(procs)


def _on(exc: NvmlError, gpu: str) -> NvmlError:
    """`exc`, saying which device it concerns (a copy: a fake may raise one instance many times)."""
    if exc.gpu is not None:
        return exc
    out = type(exc)(exc.call, exc.kind, exc.detail, exc.code, gpu)
    out.__cause__ = exc.__cause__
    return out


@dataclass
class _Pending:
    """A snapshot being read in a worker thread."""

    done: threading.Event = field(default_factory=threading.Event)
    result: Snapshot | None = None
    failure: BaseException | None = None


class GpuCollector:
    """Collector for `sentinel_gpu_*`; register it on a `CollectorRegistry`."""

    def __init__(
        self,
        nvml: Nvml | None,
        *,
        config: GpuConfig | None = None,
        demands: Sequence[ModelDemand] = (),
        proc: ProcFs | None = None,
        clock: Callable[[], float] = time.monotonic,
        threaded: bool = True,
        self_metrics: bool = True,
    ):
        self.config = config or GpuConfig()
        self.demands = tuple(demands)
        self.proc = proc or ProcFs()
        self.clock = clock
        self.threaded = threaded
        self.self_metrics = self_metrics  # False when the daemon reports collector_* centrally
        self._reader = _Reader(nvml, clock) if nvml is not None else None
        self._lock = threading.Lock()
        # Scrapes can arrive concurrently (threaded HTTP server): one at a time updates state.
        self._scrape_lock = threading.Lock()
        self._pending: _Pending | None = None
        self._errors: dict[str, int] = {}
        self._logged_reason: str | None = None
        self._logged_problem: str | None = None
        self._last_kinds: set[tuple[str, str, str | None]] = set()
        self._read_once = False  # a read has returned (so the snapshot's `available` means something)
        self._server_gpus: frozenset[str] = frozenset()  # uuids the model server was last seen on
        self._last: dict[str, Any] = {"success": None, "duration_seconds": None, "errors": []}
        self._snapshot = Snapshot(False, "GPU collection is disabled in the configuration (gpu.enabled: off)"
                                  if nvml is None else "not scraped yet")
        self._attribution = Attribution(frozenset(), 0, 0)

    # -- reading ------------------------------------------------------------------------
    def _read_snapshot(self, budget: float) -> Snapshot:
        assert self._reader is not None
        start = self.clock()
        deadline = start + budget
        if not self.threaded:
            return self._reader.read(deadline)
        with self._lock:
            pending = self._pending
            if pending is None or pending.done.is_set():
                pending = self._pending = _Pending()
                threading.Thread(target=self._work, args=(pending, deadline), name="sentinel-gpu-scrape",
                                 daemon=True).start()
            # else: the previous read is still stuck in the driver: wait on it, do not pile up threads
        if not pending.done.wait(max(0.0, deadline - self.clock())):
            raise NvmlError("scrape", "scrape_timeout",
                            f"NVML did not answer within the {budget:g} s scrape budget")
        with self._lock:
            if self._pending is pending:
                self._pending = None
        if pending.failure is not None:
            raise pending.failure
        assert pending.result is not None
        return pending.result

    def _work(self, pending: _Pending, deadline: float) -> None:
        try:
            assert self._reader is not None
            pending.result = self._reader.read(deadline)
        except BaseException as exc:  # delivered to the scraping thread, which counts it
            pending.failure = exc
        finally:
            pending.done.set()

    def _count(self, kind: str) -> None:
        self._errors[kind] = self._errors.get(kind, 0) + 1

    def snapshot(self) -> Snapshot:
        """Read NVML now (same budget and error accounting as a scrape)."""
        with self._scrape_lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> Snapshot:
        start = self.clock()
        errors: list[NvmlError] = []
        if self._reader is None:
            snap = self._snapshot
        else:
            try:
                snap = self._read_snapshot(self.config.scrape_budget_s)
                self._read_once = True
            except Exception as exc:  # a hung read, a bug, a foreign error: count, never raise
                err = exc if isinstance(exc, NvmlError) else NvmlError(
                    "scrape", "unexpected", f"{type(exc).__name__}: {exc}")
                prev = self._snapshot
                # No device series this scrape (nothing was read); before any read has
                # returned, say why NVML is unusable rather than "not scraped yet".
                snap = (Snapshot(prev.available, prev.reason, prev.driver, (), (err,)) if self._read_once
                        else Snapshot(False, f"no NVML reading yet: {err}", None, (), (err,)))
        errors.extend(snap.errors)
        seen = {(e.call, e.kind, e.gpu) for e in errors}
        for e in errors:
            self._count(e.kind)
            # Logged when it starts (not on every scrape of a lasting fault); always counted.
            if (e.call, e.kind, e.gpu) not in self._last_kinds:
                log.warning("GPU collector: %s", e)
        if self._last_kinds and not seen and snap.available:
            log.info("GPU collector: NVML reads cleanly again (after %s)",
                     ", ".join(sorted({k for _, k, _ in self._last_kinds})))
        self._last_kinds = seen
        if not snap.available and snap.reason != self._logged_reason:
            self._logged_reason = snap.reason
            level = logging.ERROR if self.config.enabled == "on" else logging.INFO
            log.log(level, "GPU metrics unavailable: %s", snap.reason)
        failed = bool(errors) or (not snap.available and self.config.enabled == "on")
        self._last = {"success": not failed, "duration_seconds": self.clock() - start,
                      "errors": [{"call": e.call, "kind": e.kind, "gpu": e.gpu, "detail": e.detail}
                                 for e in errors]}
        self._snapshot = snap
        reported = {p.pid for d in snap.devices for p in (d.processes or ())}
        self._attribution = attribute(reported, self.config, self.proc)
        located = frozenset(d.uuid for d in snap.devices
                            if d.leaf and any(p.pid in self._attribution.pids for p in d.processes or ()))
        if located:
            self._server_gpus = located
        problem = self._attribution.problem
        if problem and problem != self._logged_problem:
            log.warning("GPU process attribution: %s. %s", problem, self._attribution.fix)
        self._logged_problem = problem
        return snap

    # -- exposition ---------------------------------------------------------------------
    def _families(self) -> dict[str, Metric]:
        def gauge(spec: mn.MetricSpec) -> GaugeMetricFamily:
            return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels, unit="")

        fams: dict[str, Metric] = {
            s.name: gauge(s) for s in (mn.GPU_AVAILABLE, mn.GPU_MEMORY_USED, mn.GPU_MEMORY_TOTAL,
                                       mn.GPU_MEMORY_RESERVED, mn.GPU_UTILIZATION, mn.GPU_PROCESS_MEMORY,
                                       mn.GPU_MEMORY_HEADROOM)
        }
        fams[mn.GPU_ERRORS.name] = CounterMetricFamily(mn.GPU_ERRORS.name, mn.GPU_ERRORS.help,
                                                       labels=mn.GPU_ERRORS.labels)
        if self.self_metrics:
            for s in (mn.COLLECTOR_SUCCESS, mn.COLLECTOR_DURATION):
                fams[s.name] = gauge(s)
        return fams

    def describe(self) -> Iterable[Metric]:
        """Family names without samples, so registering does not touch NVML."""
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        f = self._families()
        f[mn.GPU_AVAILABLE.name].add_metric([], 1.0 if snap.available else 0.0)
        for d in snap.devices:
            labels = [d.gpu, d.uuid]
            if d.memory is not None:
                f[mn.GPU_MEMORY_USED.name].add_metric(labels, d.memory.used)
                f[mn.GPU_MEMORY_TOTAL.name].add_metric(labels, d.memory.total)
                if d.memory.reserved is not None:
                    f[mn.GPU_MEMORY_RESERVED.name].add_metric(labels, d.memory.reserved)
            if d.utilization is not None:
                f[mn.GPU_UTILIZATION.name].add_metric(labels, d.utilization)
        for gpu, pid, used in self._process_rows(snap):
            f[mn.GPU_PROCESS_MEMORY.name].add_metric([gpu, str(pid)], used)
        for model, gpu, headroom in self._headroom_rows(self._headroom_targets(snap)[0]):
            f[mn.GPU_MEMORY_HEADROOM.name].add_metric([model, gpu], headroom)
        for kind, n in sorted(self._errors.items()):
            f[mn.GPU_ERRORS.name].add_metric([kind], n)
        if self.self_metrics:
            f[mn.COLLECTOR_SUCCESS.name].add_metric([COLLECTOR], 1.0 if self._last["success"] else 0.0)
            f[mn.COLLECTOR_DURATION.name].add_metric([COLLECTOR], self._last["duration_seconds"])
        yield from f.values()

    def _process_rows(self, snap: Snapshot) -> list[tuple[str, int, int]]:
        """(gpu, pid, bytes) of attributed processes whose usage NVML reports."""
        rows = []
        for d in snap.devices:
            for p in d.processes or ():
                # usedGpuMemory None (WDDM, some MIG setups): no figure, so no series rather than 0.
                if p.pid in self._attribution.pids and p.used_bytes is not None:
                    rows.append((d.gpu, p.pid, p.used_bytes))
        return rows

    def _headroom_targets(self, snap: Snapshot) -> tuple[list[DeviceReading], str]:
        """The devices headroom is computed for, and on what basis."""
        leaves = [d for d in snap.devices if d.leaf and d.memory is not None]
        used_by_server = {d.gpu for d in leaves for p in (d.processes or ()) if p.pid in self._attribution.pids}
        if used_by_server:
            return [d for d in leaves if d.gpu in used_by_server], "devices the model server uses"
        if self._server_gpus:
            # Seen before, not now: only where its processes could not be read this time. A
            # lost or unreadable device must not be replaced by devices the server never used.
            return ([d for d in leaves if d.uuid in self._server_gpus and d.processes is None],
                    "devices the model server was last seen on (its processes are not visible now)")
        return leaves, "every device (the model server's processes are not visible to NVML here)"

    def _headroom_rows(self, targets: list[DeviceReading]) -> list[tuple[str, str, int]]:
        """(model, gpu, free − predicted extra need) on `targets` (`_headroom_targets`)."""
        return [(m.model, d.gpu, d.memory.free - m.extra_bytes)  # type: ignore[union-attr]
                for m in self.demands if m.extra_bytes is not None for d in targets]

    def status(self) -> dict[str, Any]:
        """What /status shows about GPU collection (from the last scrape; reads nothing)."""
        snap, att = self._snapshot, self._attribution
        targets, basis = self._headroom_targets(snap)
        errors_total = dict(self._errors)  # one C-level copy: a scrape thread may be adding a kind
        unsupported = dict(self._reader.unsupported) if self._reader is not None else {}
        problem, fix = att.problem, att.fix
        leaves = [d for d in snap.devices if d.leaf]
        if problem is None and leaves and all(("processes", d.gpu) in unsupported for d in leaves):
            problem = ("NVML does not report per-process GPU memory on this machine (not_supported: usual on "
                       "vGPU and WSL), so no memory can be attributed to the model server")
            fix = "none from sentinel's side: device-level series are still exported"
        return {
            "collector": COLLECTOR,
            "enabled": self.config.enabled,
            "available": snap.available,
            "reason": snap.reason,
            "driver_version": snap.driver,
            "last_scrape": dict(self._last),
            "errors_total": dict(sorted(errors_total.items())),
            "not_reported": sorted(f"{what} on GPU {gpu} ({kind})" for (what, gpu), kind in unsupported.items()),
            "devices": [
                {"gpu": d.gpu, "uuid": d.uuid, "name": d.name, "mig_parent": d.mig_parent,
                 "memory": None if d.memory is None else {
                     "total_bytes": d.memory.total, "used_bytes": d.memory.used,
                     "free_bytes": d.memory.free, "reserved_bytes": d.memory.reserved},
                 "utilization_ratio": d.utilization,
                 "processes": None if d.processes is None else [
                     {"pid": p.pid, "used_bytes": p.used_bytes, "attributed": p.pid in att.pids}
                     for p in d.processes]}
                for d in snap.devices
            ],
            "processes": {
                "selectors": {"pids": list(self.config.pids), "process_names": list(self.config.process_names),
                              "cgroup": self.config.cgroup},
                "attributed": [{"gpu": g, "pid": p, "used_bytes": b} for g, p, b in self._process_rows(snap)],
                "reported": att.reported,
                "not_in_this_pid_namespace": att.invisible,
                "problem": problem,
                "fix": fix,
            },
            "models": [{"model": m.model, "extra_bytes": m.extra_bytes, "detail": m.detail} for m in self.demands],
            "headroom": [{"model": m, "gpu": g, "bytes": b} for m, g, b in self._headroom_rows(targets)],
            "headroom_basis": basis,
        }


def model_demands(models: Sequence[ModelConfig], registry_entries: Any = None) -> list[ModelDemand]:
    """Predicted extra need of each served model at its `max_batch`, from its registry entry.

    `registry_entries` is an iterable of `ModelEntry` or a mapping name → entry. Resolving
    an entry's architecture imports the reference model (and so torch).
    """
    from sentinel.gpu.memory import estimate

    entries: list[Any]
    if registry_entries is None:
        entries = []
    elif isinstance(registry_entries, Mapping):
        entries = list(registry_entries.values())
    else:
        entries = list(registry_entries)
    out = []
    for m in models:
        match = ([e for e in entries if e.name == m.name and e.version == m.version]
                 or [e for e in entries if e.name == m.name])
        if not match:
            out.append(ModelDemand(m.name, None, f"no registry entry for {m.name}:{m.version}; headroom unknown"))
            continue
        entry = match[-1]
        try:
            cfg = entry.densenet_config()
            shape = tuple(entry.manifest.input.shape)
            # Square inputs are the norm; for H≠W the larger side gives an upper bound.
            res = max(shape[-2:]) if len(shape) >= 2 else 224
            dtype = "fp16" if entry.manifest.input.dtype == "float16" else "fp32"
            est = estimate(cfg, batch=m.max_batch, resolution=int(res), dtype=dtype, backend="cuda")
        except Exception as exc:  # a bad manifest must not take the collector down
            out.append(ModelDemand(m.name, None, f"cannot estimate {entry.spec}: {exc}"))
            continue
        out.append(ModelDemand(m.name, est.extra_bytes,
                               f"{entry.spec} {entry.manifest.arch} batch {m.max_batch} at {res}px {dtype}, "
                               f"eager inference peak {est.activation_peak_bytes} B + input {est.input_bytes} B"))
    return out


def build_collector(gpu_config: GpuConfig, models: Sequence[ModelConfig] = (),
                    registry_entries: Any = None, *, nvml: Nvml | None = None,
                    proc: ProcFs | None = None) -> GpuCollector:
    """The daemon's GPU collector; `nvml` and `proc` are for tests (defaults: pynvml, /proc)."""
    if gpu_config.enabled == "off":
        return GpuCollector(None, config=gpu_config)
    demands = model_demands(models, registry_entries) if models else []
    return GpuCollector(nvml or PynvmlBackend(), config=gpu_config, demands=demands, proc=proc)
