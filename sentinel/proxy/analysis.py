"""Runs the analysis worker process: a bounded lossy pipe of samples in, a pipe of results back.

Only this module talks to the worker. A full queue drops the sample (counted); a dead
worker is counted, logged once per kind and restarted with backoff; the proxy never waits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import pickle
import struct
import time
from collections import deque
from typing import Any

from sentinel.config import Config
from sentinel.proxy import worker
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.sampling import Sample

log = logging.getLogger("sentinel.analysis")

MAX_MESSAGES_PER_WAKEUP = 200
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
SUPERVISE_EVERY_S = 0.25   # how often a dead worker is noticed


class AnalysisManager:
    """Owns the worker process; started on the first sample."""

    def __init__(self, config: Config, metrics: ProxyMetrics, loop: asyncio.AbstractEventLoop,
                 factory: str = worker.DEFAULT_FACTORY):
        self.config = config
        self.metrics = metrics
        self.loop = loop
        self.factory = factory
        self.capacity = config.analysis.queue_size
        self.max_bytes = config.analysis.queue_max_bytes
        self.queued_bytes = 0   # payload bytes submitted and not yet reported back by the worker
        self.outstanding = 0    # samples submitted and not yet reported back
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
        """Samples handed to the worker and not yet reported back (in the pipe or being analysed)."""
        return self.outstanding

    # --- main-process side ------------------------------------------------------------
    def submit(self, sample: Sample) -> None:
        """Queue a sample without waiting; count it as queued or dropped."""
        if self.stopping:
            self.metrics.samples.labels(sample.model, "dropped").inc()
            return
        if self.proc is None and self._restart_at is None:
            self._start()
        w = self.samples_q
        size = len(sample.request_body) + len(sample.response_body)
        if (w is None or w.broken or self.outstanding >= self.capacity
                or self.queued_bytes + size > self.max_bytes):   # restarting, full, or over the byte budget
            self.metrics.samples.labels(sample.model, "dropped").inc()
            return
        w.send(pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL))
        self.outstanding += 1
        self.queued_bytes += size
        self.metrics.samples.labels(sample.model, "queued").inc()

    def _start(self) -> None:
        self._restart_at = None
        sample_r, sample_w = self._mp.Pipe(duplex=False)
        reader, writer = self._mp.Pipe(duplex=False)
        self.proc = self._mp.Process(target=worker.main, name="sentinel-analysis", daemon=True,
                                     args=(self.config, self.factory, sample_r, writer))
        self.proc.start()
        writer.close()     # so a dead worker shows up as EOF on our end
        sample_r.close()   # ... and a dead reader as a broken pipe on this one
        self.samples_q = PipeWriter(self.loop, sample_w)
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
            _, model, outcome, err, updates, size = msg
            self.queued_bytes = max(0, self.queued_bytes - size)
            self.outstanding = max(0, self.outstanding - 1)
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
            await asyncio.sleep(SUPERVISE_EVERY_S)
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
            self.samples_q.close()
            self.samples_q = None
        self.proc = None
        self.queued_bytes = 0   # whatever was queued died with the worker
        self.outstanding = 0

    async def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to finish, then terminate it if it does not."""
        self.stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        p = self.proc
        if p is None:
            return
        self.samples_q.close()   # end of input: the worker finishes what it has and exits
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
                "queued_bytes": self.queued_bytes, "queue_max_bytes": self.max_bytes,
                "errors": dict(self.errors)}


class PipeWriter:
    """Non-blocking writes of framed messages to the worker's pipe, driven by the event loop.

    The framing is multiprocessing.Connection's (a 4-byte big-endian length), so the worker
    reads with `Connection.recv()`. Unlike multiprocessing.Queue there is no feeder thread
    contending for the GIL; the caller bounds what is outstanding.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Any):
        self.loop = loop
        self.conn = conn            # kept so its finalizer does not close the fd under us
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.buf: deque[memoryview] = deque()
        self.waiting = False
        self.broken = False

    def send(self, payload: bytes) -> None:
        if self.broken:
            return
        self.buf.append(memoryview(struct.pack("!i", len(payload))))
        self.buf.append(memoryview(payload))
        if not self.waiting:
            self._drain()

    def _drain(self) -> None:
        buf = self.buf
        while buf:
            try:
                n = os.write(self.fd, buf[0])
            except BlockingIOError:
                break
            except OSError:           # the worker is gone; the supervisor restarts it
                self.broken = True
                buf.clear()
                break
            if n == len(buf[0]):
                buf.popleft()
            else:
                buf[0] = buf[0][n:]
        if buf and not self.waiting:
            self.loop.add_writer(self.fd, self._drain)
            self.waiting = True
        elif not buf and self.waiting:
            self.loop.remove_writer(self.fd)
            self.waiting = False

    def close(self) -> None:
        if self.waiting:
            self.loop.remove_writer(self.fd)
            self.waiting = False
        self.buf.clear()
        self.conn.close()
