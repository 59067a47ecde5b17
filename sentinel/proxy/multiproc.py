"""Multi-process mode (`proxy.workers: N`): N proxy processes share the listen port.

The main process runs the admin listener, the analysis worker and proxy worker 0; it
starts N-1 more proxy processes (spawned, so none inherits the event loop) that listen on the
same address with SO_REUSEPORT, so the kernel spreads new client connections across them.

Each extra worker's listening socket belongs to its slot, not to the process: the main
process opens it (`listen_socket`), keeps it, and hands the same socket to every start of that
slot. The kernel hashes each new connection to one socket of the port and queues it there
until someone accepts it; a socket closed with connections in its queue resets them. So a
worker's death no longer closes its socket: the connections queued on it wait, and while
the slot has no worker that takes from it (not yet started or ready, dead, or silent for
`STALE_S`) the main process accepts from it too (`serving`), so they are answered. Before, each
worker bound a socket of its own, and the connections queued on a dead one were reset and
counted nowhere.
Each extra worker has its own upstream pool, limits and deadline sweep (the limits are per
process) and its own metrics; it ships to the main process over a pipe:

- every `SHIP_INTERVAL_S` the deltas of its request counters, duration histograms, proxy
  errors and sample outcomes since the last shipment, and its in-flight count; the main
  process adds them to its own, so /metrics is one correct sum, with the latest exemplar
  of each bucket (every worker exports its own spans when tracing is on, so an exemplar
  from any worker links to a recorded trace);
- each sample it copies, which the main process hands to the one analysis worker.

What a worker counts lives in a `Ledger`: memory shared with the main process, written by
the worker's hot path (`WorkerMetrics`), cumulative over that start of the worker. The
shipments are deltas of the ledger; the main process keeps the sum of what it applied. When
the worker dies (SIGKILL by the OOM killer, a crash, a hang kill), the main process reads
the ledger, which no one writes any more, and adds what the worker counted but never
shipped (final values minus the sum applied: nothing counted twice, whatever shipment was
lost in the pipe). The ledger also holds the exact number of requests in flight (the
worker's `inflight_count`) and, from every shipment, their labels: those requests, whose
clients got a reset, are counted `502` (`incomplete` when their response had begun) and in
`sentinel_proxy_errors_total{reason="proxy_worker_died_inflight"}`.

Limits that are the sidecar's, not a process's: `sampling.max_per_second` is one budget in
shared memory (`SharedSampler`), so a worker holding the only busy keep-alive connection may
still use all of it; `proxy.max_connections` is split evenly over the N processes.

A worker that stops reporting (its loop blocked, SIGSTOP) still holds its share of the
listen socket, so the kernel keeps handing it new connections that it does not answer: after
`STALE_S` without a shipment it is shown as not responding (/status, /readyz says not
ready) and the main process accepts from its socket too, after `HANG_TIMEOUT_S` it is killed, counted in
`sentinel_proxy_errors_total{reason="proxy_worker_hung"}`, and started again. A worker
may hold part of the port from the moment it begins to bind, which it writes in its ledger
just before: from then on, its first report has the same bounds (a worker stopped between
binding and its first report is as harmful as one stopped later). Before that, a starting
worker takes nothing from its socket (the main process accepts from it) and /readyz stays
ready; one that has not begun listening within its startup grace (`STARTUP_GRACE_S`,
doubled after each consecutive start that timed out, at most `STARTUP_GRACE_MAX_S`) is
killed, counted in `reason="proxy_worker_start_timeout"`, and started again.

A worker that dies (SIGKILL, a crash) is started again after `RESTART_DELAY_S` and the
death is logged and counted in `sentinel_proxy_errors_total{reason="proxy_worker_died"}`;
the connections it had accepted are lost, as with any crashed proxy (those in flight are
counted, see above); those still queued on its socket are served by the main process. SIGTERM to the main process
drains every worker (each stops accepting, finishes its exchanges up to
`proxy.drain_timeout_s`) before the main process exits. A worker whose main process is
gone stops by itself.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import gc
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import threading
import time
from typing import Any

from sentinel import metricnames as mn
from sentinel.config import Config, parse_hostport
from sentinel.proxy.metrics import ProxyMetrics, _exemplar
from sentinel.proxy.sampling import Sampler

log = logging.getLogger("sentinel.proxy")

SHIP_INTERVAL_S = 0.5
RESTART_DELAY_S = 1.0
SEND_QUEUE = 64   # messages (samples, metric deltas) a worker may have waiting for the pipe
STALE_S = 3.0         # no shipment for this long: the worker is shown as not responding (readyz: not ready)
HANG_TIMEOUT_S = 10.0  # no shipment for this long: the worker is killed and started again
STARTUP_GRACE_S = 20.0      # spawn → beginning to listen (about 1 s on an idle machine): killed and started again past it
STARTUP_GRACE_MAX_S = 120.0  # the grace doubles after each consecutive start that timed out, up to this
LEDGER_VALUES = 1 << 14      # float64 slots of a worker's ledger (128 KiB): about 780 request series
LEDGER_KEY_BYTES = 1 << 16   # the keys of its series
LISTEN_BACKLOG = 2048        # as the main process's own listener (sidecar._listen)

# cut: the requests in flight when a worker died
DIED_INFLIGHT = "proxy_worker_died_inflight"
CUT_BEFORE_RESPONSE = "502"   # as a pipelined request the proxy never answered
CUT_MID_RESPONSE = mn.CODE_INCOMPLETE


# --- what a worker ships -------------------------------------------------------------

def _counter_values(metric: Any) -> dict[tuple[str, ...], float]:
    children = getattr(metric, "_metrics", None)
    if not children:
        return {(): metric._value.get()} if not metric._labelnames else {}
    return {lv: child._value.get() for lv, child in list(children.items())}


SHIPPED_COUNTERS = ("proxy_errors", "samples", "overflow")


def snapshot(metrics: Any) -> dict:
    """Cumulative values of a worker's hot-path metrics: request children and shipped counters."""
    if isinstance(metrics, WorkerMetrics):
        return metrics.snapshot()
    out: dict = {}
    for key, ch in list(metrics._children.items()):
        out[("r", key)] = (ch.count.get(), ch.sum.get(), tuple(b.get() for b in ch.buckets),
                           tuple(getattr(b, "_exemplar", None) for b in ch.buckets))
    for attr in SHIPPED_COUNTERS:
        for lv, v in _counter_values(getattr(metrics, attr)).items():
            out[("c", attr, lv)] = v
    return out


def delta(now: dict, before: dict) -> dict:
    """What grew between two snapshots."""
    out: dict = {}
    for k, v in now.items():
        old = before.get(k)
        if k[0] == "r":
            if old is None:
                d = v[:3]
                ex = tuple((i, e) for i, e in enumerate(v[3]) if e is not None)
            else:
                d = (v[0] - old[0], v[1] - old[1], tuple(a - b for a, b in zip(v[2], old[2], strict=True)))
                ex = tuple((i, e) for i, (e, o) in enumerate(zip(v[3], old[3], strict=True))
                           if e is not None and e is not o)
            if d[0]:
                out[k] = (*d, ex)   # count, sum, per-bucket counts, (bucket index, exemplar) that changed
        else:
            d = v - (old or 0.0)
            if d:
                out[k] = d
    return out


def accumulate(applied: dict, d: dict) -> None:
    """Add a shipment's deltas to `applied`, the sum of what the main process counted of one worker start."""
    for k, v in d.items():
        if k[0] == "r":
            old = applied.get(k)
            applied[k] = (v[0], v[1], tuple(v[2])) if old is None else (
                old[0] + v[0], old[1] + v[1], tuple(a + b for a, b in zip(old[2], v[2], strict=True)))
        else:
            applied[k] = applied.get(k, 0.0) + v


def unshipped(final: dict, applied: dict) -> dict:
    """What a dead worker's ledger (`Ledger.read`) holds beyond `applied`, as deltas `merge` takes."""
    out: dict = {}
    for k, vals in final.items():
        if k[0] == "r":
            key = ("r", tuple(k[1:]))
            old = applied.get(key)
            total, buckets = vals[0], tuple(vals[1:])
            count = float(sum(buckets))
            if old is not None:
                count, total = count - old[0], total - old[1]
                buckets = tuple(a - b for a, b in zip(buckets, old[2], strict=True))
            if count > 0:
                out[key] = (count, total, buckets, ())
        elif k[0] == "c":
            key = ("c", k[1], tuple(k[2:]))
            d = vals[0] - applied.get(key, 0.0)
            if d > 0:
                out[key] = d
    return out


def _fold_model(metrics: Any, key: tuple[str, str, str], count: float) -> tuple[str, str, str]:
    """`key` with its model label passed through the main process's cardinality cap.

    Each worker caps its own unknown model names at `proxy.max_model_labels`, but different
    workers see different names: without this, N workers exported up to N times the cap.
    The main process's `model_label` decides every label it exports; a label it folds into
    `other` counts the worker's requests in `sentinel_unmatched_path_overflow_total`.
    """
    from sentinel.proxy.metrics import NO_MODEL, OVERFLOW_MODEL

    model = key[0]
    if model in (NO_MODEL, OVERFLOW_MODEL):
        return key
    label = metrics.model_label(model)   # counts one overflow when it folds
    if label == OVERFLOW_MODEL and count > 1:
        metrics.overflow.inc(count - 1)
    return key if label == model else (label, key[1], key[2])


def merge(metrics: Any, d: dict) -> None:
    """Add a worker's deltas to the main process's metrics."""
    for k, v in d.items():
        if k[0] == "r":
            metrics.merge_requests(_fold_model(metrics, k[1], v[0]), v[0], v[1], v[2], v[3] if len(v) > 3 else ())
        else:
            m = getattr(metrics, k[1])
            (m.labels(*k[2]) if k[2] else m).inc(v)


def apportion(n: int, weights: dict) -> dict:
    """`n` split over the keys of `weights` in proportion (largest remainder), or {} when they are all 0."""
    total = sum(w for w in weights.values() if w > 0)
    if n <= 0 or total <= 0:
        return {}
    shares = {k: n * w / total for k, w in weights.items() if w > 0}
    out = {k: int(s) for k, s in shares.items()}
    for k in sorted(shares, key=lambda k: shares[k] - out[k], reverse=True)[:n - sum(out.values())]:
        out[k] += 1
    return {k: c for k, c in out.items() if c}


# --- what a worker keeps in shared memory ----------------------------------------------

_INFLIGHT, _SERIES, _LISTEN_AT, _SCAN_AT = 0, 1, 2, 3   # the ledger's header
_HEADER = 4


class Ledger:
    """One start of a worker's cumulative counts, in memory shared with the main process.

    The worker is its only writer; the main process reads it when the worker has died (and
    reads `listening_at` while it starts). Layout, float64 but for the key area: the header
    (requests in flight now, series published, monotonic time the worker began to bind its
    listen socket, time of the last in-flight scan), the series' values, then their keys
    (2-byte length, JSON array). A series is published (its key, then the count of series)
    before its first value is written, so a worker killed between any two stores leaves a
    block the main process can read: a series not yet published has no value yet. No lock
    (a process killed holding one would leave it held); an aligned 8-byte store is atomic.

    Series: `("r", model, protocol, code)` → sum, one count per histogram bucket (their total is
    the count: one store less per request);
    `("c", counter, *labels)` → value; `("i", model, protocol, code)` → requests in flight
    at the last scan and their summed age (the labels of what a death cuts).
    """

    def __init__(self, raw: Any, buckets: int = 0):
        self.raw = raw
        mem = memoryview(raw).cast("B")
        self.v = mem.cast("d")
        self.keys = mem[(_HEADER + LEDGER_VALUES) * 8:]
        self.buckets = buckets   # histogram buckets of a request series, +Inf included
        self._value_end = _HEADER   # writer side: where the next series goes
        self._key_end = 0
        self._series = 0

    @staticmethod
    def allocate() -> Any:
        """A zeroed block (made in the main process, passed to the worker it is for)."""
        return mp.get_context("spawn").RawArray("d", _HEADER + LEDGER_VALUES + LEDGER_KEY_BYTES // 8)

    def _width(self, kind: str) -> int:
        return 1 + self.buckets if kind == "r" else 2 if kind == "i" else 1

    def publish(self, key: tuple[str, ...]) -> int:
        """Room for a new series: the offset of its values, or -1 when the block is full."""
        data = json.dumps(key).encode()
        at, k = self._value_end, self._key_end
        width = self._width(key[0])
        if at + width > _HEADER + LEDGER_VALUES or k + 2 + len(data) > LEDGER_KEY_BYTES:
            return -1
        self.keys[k + 2:k + 2 + len(data)] = data
        self.keys[k:k + 2] = len(data).to_bytes(2, "little")
        self._value_end, self._key_end = at + width, k + 2 + len(data)
        self._series += 1
        self.v[_SERIES] = self._series   # published: the main process reads this many series
        return at

    def read(self) -> dict[tuple[str, ...], list[float]]:
        """Every published series and its values (the main process, once the worker is dead)."""
        out: dict[tuple[str, ...], list[float]] = {}
        at, k = _HEADER, 0
        for _ in range(int(self.v[_SERIES])):
            n = int.from_bytes(self.keys[k:k + 2], "little")
            key = tuple(json.loads(bytes(self.keys[k + 2:k + 2 + n])))
            k += 2 + n
            width = self._width(key[0])
            out[key] = self.v[at:at + width].tolist()
            at += width
        return out

    @property
    def inflight(self) -> int:
        return int(round(self.v[_INFLIGHT]))

    @property
    def listening_at(self) -> float:
        """Monotonic time the worker began to bind the listen socket (0: not yet)."""
        return self.v[_LISTEN_AT]

    def mark_listening(self) -> None:
        self.v[_LISTEN_AT] = time.monotonic()

    @property
    def scanned_at(self) -> float:
        return self.v[_SCAN_AT]


class _SharedValue:
    __slots__ = ("_v", "_at")

    def __init__(self, v: Any, at: int):
        self._v, self._at = v, at

    def inc(self, amount: float = 1.0) -> None:
        self._v[self._at] += amount


class SharedCounter:
    """A Counter's `labels(...).inc(n)` and `inc(n)`, kept in a worker's ledger (in the Counter once it is full)."""

    def __init__(self, metrics: WorkerMetrics, attr: str, fallback: Any):
        self._metrics = metrics
        self.attr = attr
        self.fallback = fallback   # the registry's Counter
        self.slots: dict[tuple[str, ...], int] = {}
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *labelvalues: str) -> Any:
        child = self._children.get(labelvalues)
        if child is None:
            at = self.slots[labelvalues] = self._metrics.publish(("c", self.attr, *labelvalues))
            if at < 0:
                child = self.fallback.labels(*labelvalues) if labelvalues else self.fallback
            else:
                child = _SharedValue(self._metrics.ledger.v, at)
            self._children[labelvalues] = child
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class WorkerMetrics(ProxyMetrics):
    """A proxy worker's hot-path metrics, written to its `Ledger` so that they outlive a SIGKILL.

    `observe_request`, the shipped counters and `inflight_count` write the shared block
    instead of the worker's registry (which no one scrapes: the main process exports the
    sum); a series that finds the block full stays in the registry, shipped as before (and
    lost with the worker). Exemplars stay in the worker (shipped, not needed after a death).
    """

    def __init__(self, known_models: dict[str, str], max_model_labels: int, latency_thresholds: tuple[float, ...],
                 ledger: Ledger):
        self.ledger = ledger
        self._v = ledger.v   # before ProxyMetrics.__init__, which sets inflight_count
        super().__init__(known_models, max_model_labels, latency_thresholds)
        self._bounds = [*self.buckets, math.inf]
        ledger.buckets = len(self._bounds)
        # request series → (offset of its sum and buckets (-1: in the registry), newest exemplar per bucket)
        self._slots: dict[tuple[str, str, str], tuple[int, list]] = {}
        self._scan_at: dict[tuple[str, str, str], int] = {}  # in-flight labels → offset
        self._full_logged = False
        self.proxy_errors = SharedCounter(self, "proxy_errors", self.proxy_errors)
        self.samples = SharedCounter(self, "samples", self.samples)
        self.overflow = SharedCounter(self, "overflow", self.overflow)

    @property   # type: ignore[override]
    def inflight_count(self) -> float:
        return self._v[_INFLIGHT]

    @inflight_count.setter
    def inflight_count(self, n: float) -> None:
        self._v[_INFLIGHT] = n   # exact at any instant: what a death cuts

    def publish(self, key: tuple[str, ...]) -> int:
        at = self.ledger.publish(key)
        if at < 0 and not self._full_logged:
            self._full_logged = True
            log.warning("proxy worker ledger full (%d series): further series are shipped every %.1f s "
                        "and lost if the worker dies", self.ledger._series, SHIP_INTERVAL_S)
        return at

    def observe_request(self, model: str, protocol: str, code: str, seconds: float, trace_id: str | None) -> None:
        slot = self._slots.get((model, protocol, code))
        if slot is None:
            slot = self._slots[(model, protocol, code)] = (self.publish(("r", model, protocol, code)),
                                                           [None] * len(self._bounds))
        at = slot[0]
        if at < 0:
            ProxyMetrics.observe_request(self, model, protocol, code, seconds, trace_id)
            return
        i = bisect.bisect_left(self._bounds, seconds)
        v = self._v
        v[at + 1 + i] += 1.0
        v[at] += seconds
        if trace_id:
            slot[1][i] = _exemplar(({"trace_id": trace_id}, seconds, time.time()))

    def snapshot(self) -> dict:
        """As `snapshot`: the ledger's series, and those the registry holds because the ledger was full."""
        out: dict = {}
        v, width = self._v, len(self._bounds)
        for key, (at, exemplars) in list(self._slots.items()):
            if at >= 0:
                buckets = tuple(v[at + 1:at + 1 + width])
                out[("r", key)] = (float(sum(buckets)), v[at], buckets, tuple(exemplars))
        for key, ch in list(self._children.items()):
            out[("r", key)] = (ch.count.get(), ch.sum.get(), tuple(b.get() for b in ch.buckets),
                               tuple(getattr(b, "_exemplar", None) for b in ch.buckets))
        for attr in SHIPPED_COUNTERS:
            counter = getattr(self, attr)
            for lv, at in list(counter.slots.items()):
                if at >= 0:
                    out[("c", attr, lv)] = v[at]
            for lv, value in _counter_values(counter.fallback).items():
                if counter.slots.get(lv, -1) < 0:
                    out[("c", attr, lv)] = value
        return out

    def scan_inflight(self, connections: Any) -> None:
        """Write the labels of the requests in flight now to the ledger (what a death would cut).

        Reads the connections' exchanges (server.ClientConnection.queue, exchange.Exchange);
        the exact number in flight is `inflight_count`, this gives their model, protocol,
        whether their response had begun, and how long they had been waiting.
        """
        now = time.perf_counter()
        found: dict[tuple[str, str, str], tuple[int, float]] = {}
        for c in list(connections):
            for ex in c.queue:
                if ex.started and not ex.finished and not ex.canary:
                    key = (ex.model, ex.protocol, CUT_MID_RESPONSE if ex.response_started else CUT_BEFORE_RESPONSE)
                    n, age = found.get(key, (0, 0.0))
                    found[key] = (n + 1, age + now - ex.t0)
        v = self._v
        for key, at in self._scan_at.items():
            if at >= 0 and key not in found:
                v[at] = v[at + 1] = 0.0
        for key, (n, age) in found.items():
            at = self._scan_at.get(key)
            if at is None:
                at = self._scan_at[key] = self.publish(("i", *key))
            if at >= 0:
                v[at + 1] = age
                v[at] = n
        v[_SCAN_AT] = time.monotonic()


def worker_connections(max_connections: int, workers: int) -> int:
    """A process's share of `proxy.max_connections`, so the N processes together hold at most the cap."""
    return max_connections if workers <= 1 else max(1, max_connections // workers)


class SharedSampler(Sampler):
    """A `Sampler` whose per-second cap is shared by every proxy process of the sidecar.

    The budget is one float in shared memory (`slot[index]`): the theoretical arrival time
    of the next sample (GCRA, the token bucket's single-number form: a burst of
    `max_per_second` samples, then one per 1/`max_per_second` s). No lock: a process killed
    or stopped (SIGSTOP) while holding a cross-process lock would stop every other one's
    hot path; an aligned 8-byte store is atomic, and the race of two processes reading the
    same value lets through at most one extra sample each.
    """

    __slots__ = ("_slot", "_index", "_interval", "_tau", "_tat")

    def __init__(self, cfg: Any, slot: Any, index: int):
        super().__init__(cfg)
        self._slot = slot
        self._index = index
        self._interval = 1.0 / cfg.max_per_second
        self._tau = max(0.0, cfg.max_per_second - 1.0) * self._interval   # how far ahead a burst may run
        self._tat = 0.0   # the arrival time read by the last `_has_budget`

    def _has_budget(self) -> bool:
        now = self._clock()
        self._tat = max(self._slot[self._index], now)
        return self._tat - now <= self._tau

    def _spend(self) -> None:
        self._slot[self._index] = self._tat + self._interval

    def state(self) -> dict:
        ahead = max(0.0, self._slot[self._index] - self._clock())
        tokens = min(self.max_per_second, self.max_per_second - ahead / self._interval)
        return {**super().state(), "tokens": round(tokens, 2), "shared_by_workers": True}


def shared_budget(n: int) -> Any:
    """The shared memory `SharedSampler`s of `n` models use (made in the main process, passed to workers)."""
    return mp.get_context("spawn").RawArray("d", max(1, n))


def make_samplers(config: Config, budget: Any = None) -> dict:
    """Path model name and model name → (configured model name, sampler), for one proxy process."""
    out: dict = {}
    for i, m in enumerate(config.models):
        sc = config.sampling_for(m)
        s = (m.name, Sampler(sc) if budget is None else SharedSampler(sc, budget, i))
        out[m.path_name] = s
        out.setdefault(m.name, s)
    return out


# --- the worker process --------------------------------------------------------------

def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on the proxy's port (SO_REUSEPORT), for one worker slot (see the module doc)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:   # as asyncio's create_server: the IPv6 address only
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def worker_main(config: Config, index: int, conn: Any, buckets: tuple[float, ...] = (),
                budget: Any = None, ledger: Any = None, sock: socket.socket | None = None) -> None:
    """Entry point of proxy worker `index` (>= 1), spawned by `WorkerSet` (`sock`: its slot's socket)."""
    import uvloop

    logging.basicConfig(level=getattr(logging, str(config.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_worker(config, index, conn, buckets, budget, ledger, sock))


async def _worker(config: Config, index: int, conn: Any, buckets: tuple[float, ...], budget: Any = None,
                  ledger_block: Any = None, sock: socket.socket | None = None) -> None:
    from sentinel.proxy import tracing
    from sentinel.proxy.context import Limits, ProxyContext, fd_budget
    from sentinel.proxy.server import ClientConnection
    from sentinel.proxy.sidecar import TRACER_SHUTDOWN_S, upstream_address
    from sentinel.proxy.upstream import UpstreamPool

    loop = asyncio.get_running_loop()
    cfg = config
    n = cfg.proxy.workers
    known = {m.path_name: m.name for m in cfg.models} | {m.name: m.name for m in cfg.models}
    ledger = Ledger(ledger_block) if ledger_block is not None else None
    # the main process's bounds (SLO thresholds); counted in shared memory when the main process gave some
    metrics = (WorkerMetrics(known, cfg.proxy.max_model_labels, buckets, ledger) if ledger is not None
               else ProxyMetrics(known, cfg.proxy.max_model_labels, buckets))
    samplers = make_samplers(cfg, budget)
    host, port = upstream_address(cfg)
    pool = UpstreamPool(host, port, cfg.proxy.connect_timeout_s, cfg.proxy.upstream_pool_size)
    out: queue.Queue = queue.Queue(SEND_QUEUE)
    ctx_box: list = []
    # Every worker exports its own spans: with worker 0 alone exporting, the other N-1 workers'
    # requests (and their exemplars) pointed at traces no collector ever received.
    tracer = (tracing.SpanExporter(cfg.tracing.otlp_endpoint, cfg.tracing.service_name)
              if cfg.tracing.otlp_endpoint else None)

    def submit(sample: Any) -> None:
        try:
            out.put_nowait(("s", pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL)))
        except queue.Full:
            ctx_box[0].count_sample(sample.model, "dropped")

    limits = Limits.from_config(cfg.proxy)
    limits = dataclasses.replace(limits, max_connections=worker_connections(limits.max_connections, n))
    budget_fds = fd_budget(limits.max_connections, cfg.proxy.upstream_pool_size + 64)
    if budget_fds < limits.max_connections:
        limits = dataclasses.replace(limits, max_connections=budget_fds)
    ctx = ProxyContext(loop=loop, pool=pool, metrics=metrics, max_body=cfg.proxy.max_body_bytes,
                       samplers=samplers, submit=submit, tracer=tracer, limits=limits)
    ctx_box.append(ctx)
    lhost, lport = parse_hostport(cfg.listen)
    if ledger is not None:   # from here on this process may hold part of the port: its silence counts
        ledger.mark_listening()
    if sock is not None:   # the slot's socket, which outlives this process (see the module doc)
        server = await loop.create_server(lambda: ClientConnection(ctx), sock=sock, backlog=LISTEN_BACKLOG)
    else:
        server = await loop.create_server(lambda: ClientConnection(ctx), lhost, lport, backlog=LISTEN_BACKLOG,
                                          reuse_address=True, reuse_port=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # as the main process: drain, then stop
        loop.add_signal_handler(sig, stop.set)

    def sender() -> None:
        while True:
            msg = out.get()
            if msg is None:
                return
            try:
                conn.send(msg)
            except (OSError, ValueError):   # the main process is gone
                loop.call_soon_threadsafe(stop.set)
                return

    shipping = threading.Thread(target=sender, name="sentinel-ship", daemon=True)
    shipping.start()
    gc.freeze()   # start-up objects: out of the collector's scans (as in the main process)
    out.put(("ready", os.getpid()))
    sent: dict = {}
    scan_failed = False

    def ship(block: bool = False) -> None:
        nonlocal sent, scan_failed
        if isinstance(metrics, WorkerMetrics) and not scan_failed:
            try:
                metrics.scan_inflight(ctx.connections)
            except Exception:   # the exchange's fields changed: the labels of what a death cuts are guessed
                scan_failed = True
                log.exception("proxy worker %d: cannot scan the requests in flight", index)
        now = snapshot(metrics)
        d = delta(now, sent)
        msg = ("m", d, int(metrics.inflight_count))
        try:
            out.put(msg, timeout=5.0) if block else out.put_nowait(msg)
        except queue.Full:
            return   # tried again next time; the deltas keep growing
        sent = now

    async def shipper() -> None:
        parent = os.getppid()
        while not stop.is_set():
            await asyncio.sleep(SHIP_INTERVAL_S)
            ship()
            if os.getppid() != parent:   # orphaned: the main process died without draining us
                stop.set()

    tasks = [loop.create_task(ctx.run_sweeper()), loop.create_task(shipper())]
    await stop.wait()
    # Drain as the main process does: stop accepting, close idle connections, let exchanges finish.
    ctx.draining = True
    server.close()
    for c in list(ctx.connections):
        if c.idle():
            c._close_transport()   # answers still leaving our buffer count as their status
    deadline = time.monotonic() + cfg.proxy.drain_timeout_s
    while ctx.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for c in list(ctx.connections):
        c.cut("drain_timeout", f"in flight when the drain deadline ({cfg.proxy.drain_timeout_s} s) passed",
              unanswered="502")
    pool.close()
    for t in tasks:
        t.cancel()
    ship(block=True)
    if tracer is not None:
        await loop.run_in_executor(None, tracer.shutdown_within, TRACER_SHUTDOWN_S)
    out.put(None)
    # The final shipment must leave before the interpreter exits (it does not wait for daemon threads).
    await loop.run_in_executor(None, shipping.join, 10.0)


# --- the main process's side ---------------------------------------------------------

def _close_server(task: asyncio.Task) -> None:
    """Close the server a `WorkerSet._serve` task made (once it is made)."""
    if task.cancelled() or task.exception() is not None:
        return
    server = task.result()
    if server is not None:
        server.close()


class _Run:
    """One start of a worker: its process, its ledger, and what the main process counted of it."""

    __slots__ = ("proc", "ledger", "applied", "spawned_at", "settled")

    def __init__(self, proc: Any, ledger: Ledger):
        self.proc = proc
        self.ledger = ledger
        self.applied: dict = {}   # the sum of the deltas it shipped that were applied
        self.spawned_at = time.monotonic()
        self.settled = False      # its ledger was read after its death


class _Worker:
    __slots__ = ("index", "run", "conn", "pid", "ready", "inflight", "requests", "restarts", "thread",
                 "last_seen", "exitcode", "hung", "start_timeouts", "recovered", "cut", "sock", "serving")

    def __init__(self, index: int):
        self.index = index
        self.run: _Run | None = None
        self.conn: Any = None
        self.pid: int | None = None
        self.ready = False
        self.inflight = 0
        self.requests = 0.0
        self.restarts = 0
        self.thread: threading.Thread | None = None
        self.last_seen = 0.0   # monotonic time of its last message
        self.exitcode: int | None = None   # of its last death
        self.hung = False      # killed by the main process for not reporting (or not starting)
        self.start_timeouts = 0   # consecutive starts killed for not listening within the grace
        self.recovered = 0.0   # requests counted from the ledger after a death (served, never shipped)
        self.cut = 0           # requests in flight at its deaths
        self.sock: socket.socket | None = None   # the slot's listening socket, handed to every start
        self.serving: asyncio.Task | None = None   # the main process accepting from it too (its server)

    @property
    def proc(self) -> Any:
        return self.run.proc if self.run is not None else None

    def alive(self) -> bool:
        return self.run is not None and self.run.proc.exitcode is None

    def phase(self) -> str:
        if not self.alive():
            return "down"
        if self.ready:
            return "serving"
        assert self.run is not None
        return "listening" if self.run.ledger.listening_at else "starting"


class WorkerSet:
    """The extra proxy processes of `proxy.workers: N` (N-1 of them), seen from the main process."""

    def __init__(self, config: Config, metrics: Any, submit: Any, fail: Any,
                 loop: asyncio.AbstractEventLoop, budget: Any = None, serve: Any = None):
        self.config = config
        # `serve(sock)`: a coroutine making the main process's server on a slot's socket (None: never)
        self.serve = serve
        self.metrics = metrics
        self.submit = submit
        self.fail = fail
        self.loop = loop
        self.budget = budget   # the shared sampling budget (SharedSampler), or None
        self.stopping = False
        self._mp = mp.get_context("spawn")
        self.workers = [_Worker(i) for i in range(1, config.proxy.workers)]
        self._watch: asyncio.Task | None = None
        self._bounds = [*metrics.buckets, math.inf]
        metrics.remote_inflight = lambda: sum(w.inflight for w in self.workers)

    def start(self) -> None:
        host, port = parse_hostport(self.config.listen)
        try:
            for w in self.workers:
                w.sock = listen_socket(host, port)
        except OSError:
            for w in self.workers:
                if w.sock is not None:
                    w.sock.close()
            raise
        for w in self.workers:
            self._take_over(w)   # until its worker is ready
            self._spawn(w)
        self._watch = self.loop.create_task(self._watchdog())

    def _take_over(self, w: _Worker) -> None:
        """The main process accepts from slot `w`'s socket too: no worker of it takes from it now."""
        if self.serve is None or self.stopping or w.sock is None or w.serving is not None:
            return
        w.serving = self.loop.create_task(self._serve(w.sock))

    async def _serve(self, sock: socket.socket) -> Any:
        dup = sock.dup()   # closing the server closes this descriptor, not the slot's socket
        try:
            return await self.serve(dup)
        except Exception:   # the slot's connections wait for its next worker instead
            dup.close()
            log.exception("cannot accept on a proxy worker's socket from the main process")
            return None

    def _hand_back(self, w: _Worker) -> None:
        """Slot `w`'s worker takes from its socket again: the main process stops (what it accepted stays)."""
        task, w.serving = w.serving, None
        if task is not None:
            task.add_done_callback(_close_server)

    def _spawn(self, w: _Worker) -> None:
        parent, child = self._mp.Pipe(duplex=True)
        w.ready, w.inflight, w.pid, w.hung = False, 0, None, False
        block = Ledger.allocate()   # a new one per start: a late write of the dead one lands nowhere counted
        proc = self._mp.Process(target=worker_main, name=f"sentinel-proxy-{w.index}", daemon=True,
                                args=(self.config, w.index, child, tuple(self.metrics.buckets), self.budget, block,
                                      w.sock))
        run = w.run = _Run(proc, Ledger(block, len(self._bounds)))
        proc.start()
        w.pid = proc.pid
        child.close()
        w.conn = parent
        w.thread = threading.Thread(target=self._read, args=(w, parent, run), name=f"sentinel-w{w.index}",
                                    daemon=True)
        w.thread.start()

    def _read(self, w: _Worker, conn: Any, run: _Run) -> None:
        """Thread: receive one worker's messages and apply them on the event loop."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:   # an undecodable message: a bug, not a reason to stop listening
                log.exception("proxy worker %d sent an unreadable message", w.index)
                continue
            try:
                self.loop.call_soon_threadsafe(self._apply, w, run, msg)
            except RuntimeError:   # the event loop is closed: the sidecar is gone
                return
        proc = run.proc
        proc.join(timeout=5.0)
        if proc.exitcode is None:   # its pipe closed but it lives on: its ledger must stop changing before it is read
            proc.kill()
            proc.join(timeout=5.0)
        try:
            self.loop.call_soon_threadsafe(self._exited, w, run)
        except RuntimeError:
            pass

    def _apply(self, w: _Worker, run: _Run, msg: tuple) -> None:
        kind = msg[0]
        if kind == "m":
            if run.settled:
                return   # cannot happen (its messages come before its death is handled); never count twice
            merge(self.metrics, msg[1])
            accumulate(run.applied, msg[1])
            w.requests += sum(v[0] for k, v in msg[1].items() if k[0] == "r")
            if run is w.run:   # not a dead predecessor's last words
                w.inflight = msg[2]
                w.last_seen = time.monotonic()
                if w.serving is not None and w.ready:   # silent for a while, then back
                    self._hand_back(w)
        elif kind == "s":
            try:
                sample = pickle.loads(msg[1])
            except Exception:
                log.exception("proxy worker %d sent an unreadable sample", w.index)
                return
            self.submit(sample)
        elif kind == "ready" and run is w.run:
            w.ready, w.pid, w.last_seen = True, msg[1], time.monotonic()
            w.start_timeouts = 0
            self._hand_back(w)

    def _settle(self, w: _Worker, run: _Run) -> tuple[int, int]:
        """Count what a dead worker served and never shipped, and the requests it had in flight.

        Returns (requests recovered, requests cut). Runs once per start, after the last of
        its shipments was applied (the reader applies them in order, then reports the exit).
        """
        if run.settled:
            return 0, 0
        run.settled = True
        try:
            final = run.ledger.read()
            served = unshipped(final, run.applied)
            merge(self.metrics, served)
            recovered = int(sum(v[0] for k, v in served.items() if k[0] == "r"))
            cut = self._count_cut(run, final)
        except Exception:   # a bug here must not stop the restart
            log.exception("proxy worker %d: cannot read its counts after its death", w.index)
            return 0, 0
        w.requests += recovered
        w.recovered += recovered
        w.cut += cut
        return recovered, cut

    def _count_cut(self, run: _Run, final: dict) -> int:
        """Count the requests in flight at the death (exact number; labels from the last scan)."""
        n = run.ledger.inflight
        if n <= 0:
            return 0
        scan = {k[1:]: (v[0], v[1]) for k, v in final.items() if k[0] == "i" and v[0] > 0}
        since = time.monotonic() - (run.ledger.scanned_at or run.ledger.listening_at or run.spawned_at)
        shares = apportion(n, {k: c for k, (c, _) in scan.items()}) or {self._guess_labels(final): n}
        for key, count in shares.items():
            seen, age = scan.get(key, (0, 0.0))
            # how long they had waited: their age at the last scan and the time since (at most that, for later ones)
            seconds = max(0.0, (age / seen if seen else 0.0) + since)
            buckets = [0.0] * len(self._bounds)
            buckets[bisect.bisect_left(self._bounds, seconds)] = float(count)
            self.metrics.merge_requests(_fold_model(self.metrics, key, count), float(count), count * seconds,
                                        tuple(buckets))
        self.metrics.proxy_errors.labels(DIED_INFLIGHT).inc(n)
        return n

    def _guess_labels(self, final: dict) -> tuple[str, str, str]:
        """Labels for requests cut before any scan saw them: the worker's busiest model, or the first configured."""
        busiest: dict[tuple[str, str], float] = {}
        for k, v in final.items():
            if k[0] == "r" and k[1] != "none":
                busiest[(k[1], k[2])] = busiest.get((k[1], k[2]), 0.0) + sum(v[1:])
        if busiest:
            model, protocol = max(busiest, key=busiest.__getitem__)
        elif self.config.models:
            model, protocol = self.config.models[0].name, self.config.models[0].protocol
        else:
            model, protocol = "none", "other"
        return model, protocol, CUT_BEFORE_RESPONSE

    def _exited(self, w: _Worker, run: _Run) -> None:
        recovered, cut = self._settle(w, run)   # first: what it served is counted whatever happens next
        if run is not w.run:
            return
        w.inflight = 0
        w.ready = False
        w.exitcode = run.proc.exitcode
        self._take_over(w)   # what is queued on its socket, and what comes until the next start is ready
        lost = (f"; {recovered} request(s) it served since its last report were counted from shared memory"
                f", {cut} in flight were cut (counted {CUT_BEFORE_RESPONSE}/{CUT_MID_RESPONSE})")
        if self.stopping:
            if cut:
                log.warning("proxy worker %d (pid %s) ended while stopping%s", w.index, run.proc.pid, lost)
            return
        if not w.hung:   # a hung worker was counted when it was killed
            self.fail("proxy_worker_died", f"proxy worker {w.index} (pid {run.proc.pid}) ended with exit code "
                                           f"{run.proc.exitcode}{lost}; starting it again in {RESTART_DELAY_S} s")
        elif recovered or cut:
            log.warning("proxy worker %d (pid %s) killed%s", w.index, run.proc.pid, lost)
        w.restarts += 1
        self.loop.call_later(RESTART_DELAY_S, self._restart, w)

    def startup_grace(self, w: _Worker) -> float:
        """Seconds a start of `w` may take to begin listening: `STARTUP_GRACE_S`, doubled per consecutive timeout."""
        return min(STARTUP_GRACE_MAX_S, STARTUP_GRACE_S * 2 ** w.start_timeouts)

    def _silent_since(self, w: _Worker) -> float | None:
        """When the silence of a live worker that may hold part of the listen port began (None: it holds none).

        From its last message once it reported; before its first report, from the moment it
        began to bind (its ledger), since a worker stopped right after binding is as harmful
        as one stopped later. A worker still starting up holds no part of the port.
        """
        if not w.alive():
            return None
        if w.ready:
            return w.last_seen
        assert w.run is not None
        return w.run.ledger.listening_at or None

    def unresponsive(self, now: float | None = None) -> list[_Worker]:
        """Live workers that may hold part of the port and sent nothing for `STALE_S` (a blocked loop, SIGSTOP)."""
        now = time.monotonic() if now is None else now
        out = []
        for w in self.workers:
            since = self._silent_since(w)
            if since is not None and now - since > STALE_S:
                out.append(w)
        return out

    def check(self, now: float | None = None) -> None:
        """Kill every worker silent for `HANG_TIMEOUT_S`, or not listening within its startup grace;
        its reader then restarts it as any death."""
        if self.stopping:
            return
        now = time.monotonic() if now is None else now
        for w in self.workers:
            if w.hung or not w.alive():
                continue
            assert w.run is not None
            since = self._silent_since(w)
            if since is not None:
                if now - since > STALE_S:   # it takes nothing from its socket: the main process does
                    self._take_over(w)
                if now - since > HANG_TIMEOUT_S:
                    first = "" if w.ready else " since it began to listen (no first report)"
                    self._kill(w, "proxy_worker_hung",
                               f"proxy worker {w.index} (pid {w.pid}) sent nothing for {now - since:.1f} s{first} "
                               f"(blocked or stopped) while holding part of the listen port; killing it and "
                               f"starting it again")
            elif not w.ready and now - w.run.spawned_at > self.startup_grace(w):
                grace = self.startup_grace(w)
                w.start_timeouts += 1
                self._kill(w, "proxy_worker_start_timeout",
                           f"proxy worker {w.index} (pid {w.pid}) did not begin listening within {grace:.0f} s of "
                           f"its start (stuck or stopped); killing it and starting it again (next grace "
                           f"{self.startup_grace(w):.0f} s)")

    def _kill(self, w: _Worker, reason: str, message: str) -> None:
        w.hung = True
        w.inflight = 0
        self.fail(reason, message)
        try:
            w.proc.kill()   # SIGKILL also ends a SIGSTOPped process
        except (OSError, ValueError, AttributeError):
            pass

    async def _watchdog(self) -> None:
        while not self.stopping:
            await asyncio.sleep(SHIP_INTERVAL_S)
            try:
                self.check()
            except Exception:   # a bug here must not stop the watch for good
                log.exception("proxy worker watchdog failed")

    def _restart(self, w: _Worker) -> None:
        if not self.stopping:
            self._spawn(w)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker (each drains), wait up to `timeout` + 5 s, then kill what is left."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for w in self.workers:   # no new connections: the main process's copies go (a draining worker closes its own)
            self._hand_back(w)
            if w.sock is not None:
                w.sock.close()
                w.sock = None
        for w in self.workers:
            if w.proc is not None and w.proc.is_alive():
                w.proc.terminate()
        deadline = time.monotonic() + timeout + 5.0
        for w in self.workers:
            if w.proc is None:
                continue
            left = max(0.0, deadline - time.monotonic())
            await self.loop.run_in_executor(None, w.proc.join, left)
            if w.proc.is_alive():
                log.warning("proxy worker %d did not drain in time; killing it", w.index)
                w.proc.kill()
                await self.loop.run_in_executor(None, w.proc.join, 5.0)
        for w in self.workers:   # let the readers apply the final shipments (and read the ledgers)
            if w.thread is not None:
                await self.loop.run_in_executor(None, w.thread.join, 5.0)
        await asyncio.sleep(0)

    def state(self) -> list[dict]:
        now = time.monotonic()
        out = []
        for w in self.workers:
            alive = w.alive()
            phase = w.phase()
            out.append({"index": w.index, "pid": w.pid if alive else None, "alive": alive,
                        "ready": w.ready and alive, "responding": alive and w.ready and now - w.last_seen <= STALE_S,
                        "phase": phase,
                        "starting_s": (round(now - w.run.spawned_at, 1)
                                       if w.run is not None and phase in ("starting", "listening") else None),
                        "last_report_s": round(now - w.last_seen, 1) if w.last_seen else None,
                        "inflight": w.inflight, "requests": int(w.requests), "restarts": w.restarts,
                        "recovered_requests": int(w.recovered), "cut_requests": w.cut,
                        "served_by_main": w.serving is not None,
                        "last_exit_code": w.exitcode})
        return out

    def readiness(self) -> tuple[bool, str]:
        """Whether every live worker that may hold part of the port answers, and a line saying how many serve."""
        now = time.monotonic()
        stale = self.unresponsive(now)
        serving = sum(1 for w in self.workers if w.ready and w.alive() and w not in stale)
        why = f"{serving + 1} of {len(self.workers) + 1} proxy processes serving"
        down = [w.index for w in self.workers if not w.alive()]
        starting = [w.index for w in self.workers if w.alive() and not w.ready and w not in stale]
        if down:
            why += f"; down (restarting): {down}"
        if starting:
            why += f"; starting (not yet listening, or listening for under {STALE_S:.0f} s): {starting}"
        if stale:
            why += (f"; not responding (holding part of the listen port; the main process accepts their "
                    f"connections until they are killed and started again): {[w.index for w in stale]}")
        return not stale, why
