"""Multi-process mode (`proxy.workers: N`): N proxy processes share the listen port.

The main process runs the admin listener, the analysis worker and proxy worker 0; it
starts N-1 more proxy processes (spawned, so none inherits the event loop) that bind the
same address with SO_REUSEPORT, so the kernel spreads new client connections across them.
Each extra worker has its own upstream pool, limits and deadline sweep (the limits are per
process) and its own registry; it ships to the main process over a pipe:

- every `SHIP_INTERVAL_S` the deltas of its request counters, duration histograms, proxy
  errors and sample outcomes since the last shipment, and its in-flight count; the main
  process adds them to its own, so /metrics is one correct sum, with the latest exemplar
  of each bucket (every worker exports its own spans when tracing is on, so an exemplar
  from any worker links to a recorded trace);
- each sample it copies, which the main process hands to the one analysis worker.

Limits that are the sidecar's, not a process's: `sampling.max_per_second` is one budget in
shared memory (`SharedSampler`), so a worker holding the only busy keep-alive connection may
still use all of it; `proxy.max_connections` is split evenly over the N processes.

A worker that stops reporting (its loop blocked, SIGSTOP) still holds its share of the
listen socket, so the kernel keeps handing it new connections that nobody answers: after
`STALE_S` without a shipment it is shown as not responding (/status, /readyz says not
ready), after `HANG_TIMEOUT_S` it is killed, counted in
`sentinel_proxy_errors_total{reason="proxy_worker_hung"}`, and started again.

A worker that dies (SIGKILL, a crash) is started again after `RESTART_DELAY_S` and the
death is logged and counted in `sentinel_proxy_errors_total{reason="proxy_worker_died"}`;
the connections it held are lost, as with any crashed proxy. SIGTERM to the main process
drains every worker (each stops accepting, finishes its exchanges up to
`proxy.drain_timeout_s`) before the main process exits. A worker whose main process is
gone stops by itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
from typing import Any

from sentinel.config import Config, parse_hostport
from sentinel.proxy.sampling import Sampler

log = logging.getLogger("sentinel.proxy")

SHIP_INTERVAL_S = 0.5
RESTART_DELAY_S = 1.0
SEND_QUEUE = 64   # messages (samples, metric deltas) a worker may have waiting for the pipe
STALE_S = 3.0         # no shipment for this long: the worker is shown as not responding (readyz: not ready)
HANG_TIMEOUT_S = 10.0  # no shipment for this long: the worker is killed and started again


# --- what a worker ships -------------------------------------------------------------

def _counter_values(metric: Any) -> dict[tuple[str, ...], float]:
    children = getattr(metric, "_metrics", None)
    if not children:
        return {(): metric._value.get()} if not metric._labelnames else {}
    return {lv: child._value.get() for lv, child in list(children.items())}


SHIPPED_COUNTERS = ("proxy_errors", "samples", "overflow")


def snapshot(metrics: Any) -> dict:
    """Cumulative values of a worker's hot-path metrics: request children and shipped counters."""
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

def worker_main(config: Config, index: int, conn: Any, buckets: tuple[float, ...] = (),
                budget: Any = None) -> None:
    """Entry point of proxy worker `index` (>= 1), spawned by `WorkerSet`."""
    import uvloop

    logging.basicConfig(level=getattr(logging, str(config.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_worker(config, index, conn, buckets, budget))


async def _worker(config: Config, index: int, conn: Any, buckets: tuple[float, ...], budget: Any = None) -> None:
    from sentinel.proxy import tracing
    from sentinel.proxy.context import Limits, ProxyContext, fd_budget
    from sentinel.proxy.metrics import ProxyMetrics
    from sentinel.proxy.server import ClientConnection
    from sentinel.proxy.sidecar import TRACER_SHUTDOWN_S, upstream_address
    from sentinel.proxy.upstream import UpstreamPool

    loop = asyncio.get_running_loop()
    cfg = config
    n = cfg.proxy.workers
    known = {m.path_name: m.name for m in cfg.models} | {m.name: m.name for m in cfg.models}
    metrics = ProxyMetrics(known, cfg.proxy.max_model_labels, buckets)   # the main process's bounds (SLO thresholds)
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
    server = await loop.create_server(lambda: ClientConnection(ctx), lhost, lport, backlog=2048,
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

    def ship(block: bool = False) -> None:
        nonlocal sent
        now = snapshot(metrics)
        d = delta(now, sent)
        msg = ("m", d, metrics.inflight_count)
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
            c.transport.close()
    deadline = time.monotonic() + cfg.proxy.drain_timeout_s
    while ctx.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for c in list(ctx.connections):
        c.abort()
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

class _Worker:
    __slots__ = ("index", "proc", "conn", "pid", "ready", "inflight", "requests", "restarts", "thread",
                 "last_seen", "exitcode", "hung")

    def __init__(self, index: int):
        self.index = index
        self.proc: Any = None
        self.conn: Any = None
        self.pid: int | None = None
        self.ready = False
        self.inflight = 0
        self.requests = 0.0
        self.restarts = 0
        self.thread: threading.Thread | None = None
        self.last_seen = 0.0   # monotonic time of its last message
        self.exitcode: int | None = None   # of its last death
        self.hung = False      # killed by the main process for not reporting

    def alive(self) -> bool:
        return self.proc is not None and self.pid is not None and self.proc.exitcode is None


class WorkerSet:
    """The extra proxy processes of `proxy.workers: N` (N-1 of them), seen from the main process."""

    def __init__(self, config: Config, metrics: Any, submit: Any, fail: Any,
                 loop: asyncio.AbstractEventLoop, budget: Any = None):
        self.config = config
        self.metrics = metrics
        self.submit = submit
        self.fail = fail
        self.loop = loop
        self.budget = budget   # the shared sampling budget (SharedSampler), or None
        self.stopping = False
        self._mp = mp.get_context("spawn")
        self.workers = [_Worker(i) for i in range(1, config.proxy.workers)]
        self._watch: asyncio.Task | None = None
        metrics.remote_inflight = lambda: sum(w.inflight for w in self.workers)

    def start(self) -> None:
        for w in self.workers:
            self._spawn(w)
        self._watch = self.loop.create_task(self._watchdog())

    def _spawn(self, w: _Worker) -> None:
        parent, child = self._mp.Pipe(duplex=True)
        w.ready, w.inflight, w.pid, w.hung = False, 0, None, False
        w.proc = self._mp.Process(target=worker_main, name=f"sentinel-proxy-{w.index}", daemon=True,
                                  args=(self.config, w.index, child, tuple(self.metrics.buckets), self.budget))
        w.proc.start()
        child.close()
        w.conn = parent
        w.thread = threading.Thread(target=self._read, args=(w, parent, w.proc), name=f"sentinel-w{w.index}",
                                    daemon=True)
        w.thread.start()

    def _read(self, w: _Worker, conn: Any, proc: Any) -> None:
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
                self.loop.call_soon_threadsafe(self._apply, w, proc, msg)
            except RuntimeError:   # the event loop is closed: the sidecar is gone
                return
        proc.join(timeout=5.0)
        try:
            self.loop.call_soon_threadsafe(self._exited, w, proc)
        except RuntimeError:
            pass

    def _apply(self, w: _Worker, proc: Any, msg: tuple) -> None:
        kind = msg[0]
        if kind == "m":
            merge(self.metrics, msg[1])
            w.requests += sum(v[0] for k, v in msg[1].items() if k[0] == "r")
            if proc is w.proc:   # not a dead predecessor's last words
                w.inflight = msg[2]
                w.last_seen = time.monotonic()
        elif kind == "s":
            try:
                sample = pickle.loads(msg[1])
            except Exception:
                log.exception("proxy worker %d sent an unreadable sample", w.index)
                return
            self.submit(sample)
        elif kind == "ready" and proc is w.proc:
            w.ready, w.pid, w.last_seen = True, msg[1], time.monotonic()

    def _exited(self, w: _Worker, proc: Any) -> None:
        if proc is not w.proc:
            return
        w.inflight = 0
        w.ready = False
        w.exitcode = proc.exitcode
        if self.stopping:
            return
        if not w.hung:   # a hung worker was counted when it was killed
            self.fail("proxy_worker_died", f"proxy worker {w.index} (pid {proc.pid}) ended with exit code "
                                           f"{proc.exitcode}; starting it again in {RESTART_DELAY_S} s")
        w.restarts += 1
        self.loop.call_later(RESTART_DELAY_S, self._restart, w)

    def unresponsive(self, now: float | None = None) -> list[_Worker]:
        """Workers alive and ready that sent nothing for `STALE_S` (a blocked loop, SIGSTOP)."""
        now = time.monotonic() if now is None else now
        return [w for w in self.workers if w.ready and w.alive() and now - w.last_seen > STALE_S]

    def check(self, now: float | None = None) -> None:
        """Kill every worker silent for `HANG_TIMEOUT_S`; its reader then restarts it as any death."""
        if self.stopping:
            return
        now = time.monotonic() if now is None else now
        for w in self.unresponsive(now):
            if now - w.last_seen > HANG_TIMEOUT_S and not w.hung:
                w.hung = True
                w.inflight = 0
                self.fail("proxy_worker_hung",
                          f"proxy worker {w.index} (pid {w.pid}) sent nothing for {now - w.last_seen:.1f} s "
                          f"(blocked or stopped) while holding part of the listen port; killing it and "
                          f"starting it again")
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
        for w in self.workers:   # let the readers apply the final shipments
            if w.thread is not None:
                await self.loop.run_in_executor(None, w.thread.join, 5.0)
        await asyncio.sleep(0)

    def state(self) -> list[dict]:
        now = time.monotonic()
        out = []
        for w in self.workers:
            alive = w.alive()
            out.append({"index": w.index, "pid": w.pid if alive else None, "alive": alive,
                        "ready": w.ready and alive, "responding": alive and w.ready and now - w.last_seen <= STALE_S,
                        "last_report_s": round(now - w.last_seen, 1) if w.last_seen else None,
                        "inflight": w.inflight, "requests": int(w.requests), "restarts": w.restarts,
                        "last_exit_code": w.exitcode})
        return out

    def readiness(self) -> tuple[bool, str]:
        """Whether every live worker answers, and a line saying how many of the N processes serve."""
        now = time.monotonic()
        stale = self.unresponsive(now)
        serving = sum(1 for w in self.workers if w.ready and w.alive()) - len(stale)
        why = f"{serving + 1} of {len(self.workers) + 1} proxy processes serving"
        down = [w.index for w in self.workers if not (w.ready and w.alive())]
        if down:
            why += f"; down or starting: {down}"
        if stale:
            why += (f"; not responding (holding part of the listen port, their connections unanswered): "
                    f"{[w.index for w in stale]}")
        return not stale, why
