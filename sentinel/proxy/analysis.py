"""Runs the analysis worker process: a bounded lossy queue in, a pipe of results back.

Only this module talks to the worker. A full queue drops the sample (counted); a dead
worker is counted, logged once per kind and restarted with backoff; the proxy never waits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import time
from typing import Any

from sentinel.config import Config
from sentinel.proxy import worker
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.sampling import Sample

log = logging.getLogger("sentinel.analysis")

MAX_MESSAGES_PER_WAKEUP = 200
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class AnalysisManager:
    """Owns the worker process; started on the first sample."""

    def __init__(self, config: Config, metrics: ProxyMetrics, loop: asyncio.AbstractEventLoop,
                 factory: str = worker.DEFAULT_FACTORY):
        self.config = config
        self.metrics = metrics
        self.loop = loop
        self.factory = factory
        self.capacity = config.analysis.queue_size
        self._mp = mp.get_context("spawn")
        self.proc: Any = None
        self.samples_q: Any = None
        self.results: Any = None
        self.statuses: dict[str, dict] = {}
        self.errors: dict[str, str] = {}         # kind → last message
        self.restarts = 0
        self._crashes: list[float] = []
        self._logged: set[str] = set()
        self._supervisor: asyncio.Task | None = None
        self._restart_at: float | None = None
        self.stopping = False
        metrics.queue_capacity.set(self.capacity)
        metrics.queue_depth.set_function(self.depth)

    def depth(self) -> int:
        q = self.samples_q
        try:
            return q.qsize() if q is not None else 0
        except (NotImplementedError, OSError):
            return 0

    # --- main-process side ------------------------------------------------------------
    def submit(self, sample: Sample) -> None:
        """Queue a sample without waiting; count it as queued or dropped."""
        if self.stopping:
            self.metrics.samples.labels(sample.model, "dropped").inc()
            return
        if self.proc is None and self._restart_at is None:
            self._start()
        q = self.samples_q
        if q is None:   # waiting out a restart backoff
            self.metrics.samples.labels(sample.model, "dropped").inc()
            return
        try:
            q.put_nowait(sample)
        except queue.Full:
            self.metrics.samples.labels(sample.model, "dropped").inc()
            return
        self.metrics.samples.labels(sample.model, "queued").inc()

    def _start(self) -> None:
        self._restart_at = None
        self.samples_q = self._mp.Queue(maxsize=self.capacity)
        reader, writer = self._mp.Pipe(duplex=False)
        self.proc = self._mp.Process(target=worker.main, name="sentinel-analysis", daemon=True,
                                     args=(self.config, self.factory, self.samples_q, writer))
        self.proc.start()
        writer.close()   # so a dead worker shows up as EOF on our end
        self.results = reader
        self.loop.add_reader(reader.fileno(), self._on_readable)
        if self._supervisor is None:
            self._supervisor = self.loop.create_task(self._supervise())
        log.info("analysis worker started (pid %s)", self.proc.pid)

    def _on_readable(self) -> None:
        r = self.results
        try:
            for _ in range(MAX_MESSAGES_PER_WAKEUP):
                if not r.poll():
                    break
                self._handle(r.recv())
        except (EOFError, OSError):
            self.loop.remove_reader(r.fileno())   # the supervisor sees the dead process and restarts

    def _handle(self, msg: tuple) -> None:
        tag = msg[0]
        if tag == "sample":
            _, model, outcome, err, updates = msg
            self.metrics.samples.labels(model, outcome).inc()
            if err:
                self._log_once(f"decode:{err}", f"a sample of {model} did not decode ({err})")
            for metric, labels, op, value in updates:
                try:
                    self.metrics.apply(metric, labels, op, value)
                except ValueError as exc:
                    self.metrics.analysis_errors.labels("bad_update").inc()
                    self._log_once(f"bad_update:{metric}", str(exc))
        elif tag == "error":
            _, kind, message = msg
            self.metrics.analysis_errors.labels(kind).inc()
            self.errors[kind] = message
            self._log_once(kind, f"analysis failed: {kind}: {message}")
        elif tag == "status":
            self.statuses[msg[1]] = msg[2]
        elif tag == "buckets":
            self.metrics.pending_buckets.update(msg[1])

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("%s (further occurrences are only counted)", message)

    async def _supervise(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.1)
            if self._restart_at is not None:
                if time.monotonic() >= self._restart_at and not self.stopping:
                    self._start()
                continue
            p = self.proc
            if p is None or p.is_alive() or self.stopping:
                continue
            self._on_crash(p.exitcode)

    def _on_crash(self, exitcode: int | None) -> None:
        kind = "worker_killed" if exitcode is not None and exitcode < 0 else "worker_exit"
        self.metrics.analysis_errors.labels(kind).inc()
        self.metrics.restarts.inc()
        self.restarts += 1
        self.errors[kind] = f"analysis worker ended with exit code {exitcode}"
        self._log_once(kind, f"analysis worker died (exit code {exitcode}); restarting")
        self._cleanup()
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < 30.0] + [now]
        delay = RESTART_BACKOFF_S[min(len(self._crashes), len(RESTART_BACKOFF_S)) - 1]
        self._restart_at = now + delay

    def _cleanup(self) -> None:
        if self.results is not None:
            try:
                self.loop.remove_reader(self.results.fileno())
            except (OSError, ValueError):
                pass
            self.results.close()
            self.results = None
        if self.samples_q is not None:
            self.samples_q.cancel_join_thread()   # never block on a dead reader
            self.samples_q.close()
            self.samples_q = None
        self.proc = None

    async def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to finish, then terminate it if it does not."""
        self.stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        p = self.proc
        if p is None:
            return
        try:
            self.samples_q.put_nowait(None)
        except (queue.Full, ValueError):
            p.terminate()
        deadline = time.monotonic() + timeout
        while p.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if p.is_alive():
            p.terminate()
            await asyncio.sleep(0.05)
        if p.is_alive():
            p.kill()
        p.join(timeout=1.0)
        self._on_readable_safe()
        self._cleanup()

    def _on_readable_safe(self) -> None:
        if self.results is not None:
            try:
                self._on_readable()
            except Exception:  # pragma: no cover - best effort at shutdown
                pass

    def state(self) -> dict:
        p = self.proc
        return {"worker_pid": p.pid if p is not None else None,
                "worker_alive": bool(p is not None and p.is_alive()),
                "restarts": self.restarts, "queue_depth": self.depth(), "queue_capacity": self.capacity,
                "errors": dict(self.errors)}
