"""Runs the analysis worker process: a bounded lossy pipe of samples in, a pipe of results back.

Only this module talks to the worker. A full queue drops the sample (counted); a dead
worker is counted, logged once per kind and restarted with backoff; a worker that says
nothing for `hang_timeout_s` (stuck in a C call, SIGSTOPped) is killed and restarted the
same way, with reason "hung"; the proxy never waits.

What the event loop spends on one sample or one result is bounded. A sample is pickled into
its pieces (`_Frame`): its bodies are handed to the pipe as they are, never copied on the
loop, whatever their size. Results are read `READ_BYTES_PER_WAKEUP` at a time; a frame over
`MAX_RESULT_BYTES` is not read at all (the worker, whose stream can no longer be trusted, is
killed and restarted with reason "bad_result"). Metric updates wait in a backlog of at most
`MAX_PENDING_UPDATES` (the excess dropped, counted as `too_many_updates`) and are applied
`APPLY_PER_WAKEUP` per event-loop iteration; while the backlog holds `READ_PAUSE_UPDATES`
nothing more is read, so a flooding worker waits on its full pipe. An update over the
worker's size bounds is dropped (`update_too_large`). Drops are counted in
sentinel_analysis_errors_total{kind} by the number of updates and logged once per kind.

What the registry holds is bounded too: analysis updates create at most `MAX_SERIES_PER_METRIC`
label sets in one metric family and `MAX_SERIES` in all, each per configured model (a monitor
labelling by request id would otherwise add a series per sample, to the proxy's memory and to
every scrape). An update that would create one more is dropped, counted as `series_limit` and
logged once per metric; the series that exist keep updating.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import pickle
import signal
import struct
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from itertools import islice
from typing import Any

from sentinel import metricnames as mn
from sentinel.config import Config
from sentinel.proxy import worker
from sentinel.proxy.metrics import ProxyMetrics, _make
from sentinel.proxy.sampling import Sample

log = logging.getLogger("sentinel.analysis")

READ_BYTES_PER_WAKEUP = 64 * 1024    # results read per event-loop wakeup; the rest waits for the next one
MAX_RESULT_BYTES = 1024 * 1024       # one framed message from the worker (its frames are at most ~512 KiB)
MAX_PENDING_UPDATES = 50_000   # metric updates received and not yet applied; more are dropped (counted)
APPLY_PER_WAKEUP = 500         # metric updates applied per event-loop iteration (about 3 ms)
READ_PAUSE_UPDATES = 5_000     # no more results are read while this many updates wait to be applied
MAX_ERROR_KINDS = 64           # distinct `kind`s of analysis errors kept; more are counted as "other"
# Label sets (series; a histogram's buckets are one) analysis updates may create, per configured
# model: in one metric family (OpenTelemetry's default cardinality limit), and in all families.
# A model's legitimate ones are about 200 in all, at most 101 in one family (predictions: classes
# 0-99 and "other"), so neither cap is reached in normal use, whatever the number of models.
MAX_SERIES_PER_METRIC = 2_000
MAX_SERIES = 10_000
SERIES_LIMIT = "series_limit"  # `kind` of the updates dropped for a new series over either cap
WRITEV_BUFFERS = 64            # buffers handed to one writev() of the samples pipe
WRITE_BYTES_PER_WAKEUP = 1 << 20   # sample bytes written to the worker per event-loop wakeup (a 1 MiB copy)
QUARANTINE_SIZE = 64      # fingerprints of samples that ended a worker, remembered (oldest forgotten)
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
SUPERVISE_EVERY_S = 0.25   # how often a dead or silent worker is noticed
SAMPLE_PIPE_BYTES = 1 << 20   # kernel buffer of the samples pipe (the default max for unprivileged users)

# Why a worker was restarted (the `reason` label of sentinel_analysis_worker_restarts_total).
RESTART_EXIT = "exit"      # it exited by itself (an os._exit, a fatal error)
RESTART_KILLED = "killed"  # a signal from outside ended it (the kernel's OOM killer, an operator)
RESTART_HUNG = "hung"      # silent past hang_timeout_s; the manager killed it
RESTART_BAD_RESULT = "bad_result"   # it wrote a frame over MAX_RESULT_BYTES; the manager killed it
RESTART_REASONS = (RESTART_EXIT, RESTART_KILLED, RESTART_HUNG, RESTART_BAD_RESULT)
WORKER_LOST = "worker_lost"   # rejection reason of samples queued to a worker that died


# Signals a process raises against itself (a crash in native code, abort()); SIGKILL and SIGTERM
# come from outside (the OOM killer, an operator, the hang watchdog) and land on any sample.
_CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})


def _self_inflicted(exitcode: int | None, reason: str | None) -> bool:
    """Whether a worker's end can be blamed on the sample it was handling (for the quarantine):
    it exited by itself or crashed, not killed from outside or as hung. Blaming those put identical
    requests (a load test, a probe repeating one body) in quarantine for the process's life."""
    if reason is not None or exitcode is None:   # hung (killed by the watchdog), or unknown
        return False
    return exitcode > 0 or -exitcode in _CRASH_SIGNALS


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
        acfg = config.analysis
        self.hang_timeout_s = acfg.hang_timeout_s
        self.start_timeout_s = acfg.worker_start_timeout_s
        self._deadline = 0.0                 # the worker must say something by then
        self._last_heard: float | None = None
        self._inflight: Counter[str] = Counter()  # per model: samples the worker has and has not reported
        self.suspects: OrderedDict[bytes, str] = OrderedDict()    # fingerprint → model: was handled when a worker ended
        self.quarantine: OrderedDict[bytes, str] = OrderedDict()  # ... twice: never handed to a worker again
        self._slot: Any = None        # shared memory: the fingerprint of the sample the worker is handling
        self.rejections = _make(mn.SAMPLE_REJECTIONS, metrics.registry)
        self._pending: deque[tuple] = deque()   # metric updates received, applied APPLY_PER_WAKEUP at a time
        self._budget = APPLY_PER_WAKEUP          # updates that may still be applied in this loop iteration
        self._drain_handle: asyncio.Handle | None = None
        per_model = max(1, len(config.models))
        self.max_series_per_metric = acfg.max_series_per_metric * per_model
        self.max_series = acfg.max_series * per_model
        self._series: dict[str, set[frozenset]] = {}   # metric → label sets analysis updates created in it
        self._n_series = 0
        for reason in RESTART_REASONS:     # every reason's series exists from the start, at 0
            metrics.restarts.labels(reason)
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
        size = sample.size()
        if (w is None or w.broken or self.outstanding >= self.capacity
                or self.queued_bytes + size > self.max_bytes):   # restarting, full, or over the byte budget
            self.metrics.samples.labels(sample.model, "dropped").inc()
            return
        frame = _Frame()   # the bodies are not copied: pickling a 60 MB one took ~20 ms of the loop
        pickle.dump(sample, frame, protocol=pickle.HIGHEST_PROTOCOL)
        w.send(frame)
        self._inflight[sample.model] += 1
        self.outstanding += 1
        self.queued_bytes += size
        self.metrics.samples.labels(sample.model, "queued").inc()

    def _start(self) -> None:
        """Start a worker; if that fails (no memory, no fds, no processes left), retry later: never raise."""
        self._restart_at = None
        try:
            self._spawn()
        except Exception as exc:  # noqa: BLE001 - called on the request path (submit) and by the supervisor
            self._cleanup()
            self.metrics.analysis_errors.labels("worker_start").inc()
            self.errors["worker_start"] = f"cannot start the analysis worker: {exc!r}"[:500]
            self._log_once("worker_start", f"{self.errors['worker_start']}; retrying")
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < 30.0] + [now]
            self._restart_at = now + RESTART_BACKOFF_S[min(len(self._crashes), len(RESTART_BACKOFF_S)) - 1]
        if self._supervisor is None:
            self._supervisor = self.loop.create_task(self._supervise())

    def _spawn(self) -> None:
        sample_r, sample_w = self._mp.Pipe(duplex=False)
        grow_pipe(sample_w.fileno())
        reader, writer = self._mp.Pipe(duplex=False)
        try:
            self._slot = self._mp.RawArray("B", worker.SLOT_SIZE)
            self.proc = self._mp.Process(target=worker.main, name="sentinel-analysis", daemon=True,
                                         args=(self.config, self.factory, sample_r, writer),
                                         kwargs={"slot": self._slot, "quarantine": frozenset(self.quarantine)})
            self.proc.start()
        except BaseException:
            for conn in (sample_r, sample_w, reader, writer):
                conn.close()
            self.proc = None
            raise
        writer.close()     # so a dead worker shows up as EOF on our end
        sample_r.close()   # ... and a dead reader as a broken pipe on this one
        self.samples_q = PipeWriter(self.loop, sample_w)
        self.results = PipeReader(reader)
        self.loop.add_reader(reader.fileno(), self._on_readable)
        self._deadline = time.monotonic() + self.start_timeout_s   # spawning imports numpy & co.
        log.info("analysis worker started (pid %s)", self.proc.pid)

    def _on_readable(self, limit: int | None = READ_BYTES_PER_WAKEUP) -> None:
        """Read what the worker wrote, without ever waiting for it, and apply the complete messages.

        At most `limit` bytes per wakeup (None: all there is), so a flood of results is applied
        a slice per event-loop iteration between requests; a message the worker has only half
        written (it was stopped, or is not scheduled) stays buffered until the rest arrives.
        While `READ_PAUSE_UPDATES` metric updates wait to be applied, a wakeup only applies
        (the worker waits on its full pipe); `limit` None reads regardless.
        """
        r = self.results
        if r is None:
            return
        if limit is not None and len(self._pending) >= READ_PAUSE_UPDATES:
            self._apply_some()
            return
        while True:
            got = r.read(limit)
            if got:
                self._last_heard = time.monotonic()
                self._deadline = self._last_heard + self.hang_timeout_s   # any byte is a sign of life
            for msg in r.messages():
                try:
                    self._handle(msg)
                except Exception as exc:  # noqa: BLE001 - a malformed message is counted, never raised into the loop
                    self.metrics.analysis_errors.labels("bad_result").inc()
                    self._log_once("bad_result", f"unusable message from the worker: {exc!r}"[:500])
            if limit is not None or not got or r.eof:
                break
        if r.too_large is not None and r is self.results:
            message, r.too_large = r.too_large, None   # once: restarting reads what is left again
            self._on_bad_result(message)
        elif r.eof:
            try:
                self.loop.remove_reader(r.fileno())   # the supervisor sees the dead process and restarts
            except (OSError, ValueError):
                pass

    def _on_bad_result(self, message: str) -> None:
        """The worker wrote a frame over MAX_RESULT_BYTES: it was not read, so what it reported (which
        samples were done) is lost and the stream cannot be trusted; kill the worker and restart it
        (the samples it had are counted as worker_lost)."""
        p = self.proc
        if p is None:
            return
        try:
            p.kill()
        except OSError:   # it ended by itself meanwhile
            pass
        self._on_crash(None, RESTART_BAD_RESULT, f"analysis worker (pid {p.pid}) {message}; killed")

    def _handle(self, msg: tuple) -> None:
        """Apply one message from the worker; one branch per tag (see sentinel.proxy.worker)."""
        tag = msg[0]
        if tag == "batch":         # several messages in one write, in order
            for m in msg[1]:
                self._handle(m)
        elif tag == "samples":     # n samples of one model: outcomes, rejections and summed updates
            _, model, n, rejected, updates, size = msg
            self.queued_bytes = max(0, self.queued_bytes - size)
            self.outstanding = max(0, self.outstanding - n)
            self._reported(model, n)
            n_rejected = sum(rejected.values())
            if n > n_rejected:
                self.metrics.samples.labels(model, "decoded").inc(n - n_rejected)
            if n_rejected:
                self.metrics.samples.labels(model, "rejected").inc(n_rejected)
                for err, k in rejected.items():
                    self.rejections.labels(model, err).inc(k)
                    self._log_once(f"decode:{err}", f"a sample of {model} did not decode ({err})")
            self._enqueue(updates)
        elif tag == "updates":     # more updates of the "samples" message that follows
            self._enqueue(msg[2])
        elif tag == "sample":      # one sample (the unbatched form)
            _, model, outcome, err, updates, size = msg
            self.queued_bytes = max(0, self.queued_bytes - size)
            self.outstanding = max(0, self.outstanding - 1)
            self._reported(model, 1)
            self.metrics.samples.labels(model, outcome).inc()
            if err:
                self.rejections.labels(model, err).inc()
                self._log_once(f"decode:{err}", f"a sample of {model} did not decode ({err})")
            self._enqueue(updates)
        elif tag == "error":
            _, kind, message = msg
            kind = self._error_kind(kind)
            message = str(message)[:1000]
            self.metrics.analysis_errors.labels(kind).inc()
            self.errors[kind] = message
            self._log_once(kind, f"analysis failed: {kind}: {message}")
        elif tag == "dropped":     # updates (or results) the worker did not send, over its bounds
            _, kind, n, message = msg
            self._dropped(self._error_kind(kind), int(n), str(message)[:1000])
        elif tag == "status":
            self.statuses[msg[1]] = msg[2]
        elif tag == "buckets":
            self.metrics.pending_buckets.update(msg[1])
        elif tag == "busy":        # building a monitor: the next message may take this long
            self._deadline = time.monotonic() + max(float(msg[1]), self.hang_timeout_s)
        elif tag == "heartbeat":   # nothing to do: receiving it moved the deadline
            pass

    def _reported(self, model: str, n: int) -> None:
        left = self._inflight[model] - n
        if left > 0:
            self._inflight[model] = left
        else:
            self._inflight.pop(model, None)

    def _enqueue(self, updates: Any) -> None:
        """Add a message's metric updates to the backlog (the excess over MAX_PENDING_UPDATES is
        dropped and counted) and apply what this loop iteration's budget allows."""
        if not updates:
            return
        if type(updates) is not list:
            self.metrics.analysis_errors.labels("bad_update").inc()
            self._log_once("bad_update", f"metric updates from the worker are a {type(updates).__name__}, "
                                         f"not a list; dropped")
            return
        pending = self._pending
        room = MAX_PENDING_UPDATES - len(pending)
        if len(updates) > room:
            room = max(room, 0)
            self._dropped(worker.TOO_MANY_UPDATES, len(updates) - room,
                          f"more than MAX_PENDING_UPDATES ({MAX_PENDING_UPDATES}) metric updates waiting to "
                          f"be applied; {len(updates) - room} of a message of {len(updates)} dropped")
            updates = updates[:room]
        pending.extend(updates)
        self._apply_some()

    def _apply_some(self) -> None:
        """Apply what is left of this iteration's budget of the backlog; the next iteration goes on."""
        pending = self._pending
        n = min(self._budget, len(pending))
        if n > 0:
            self._budget -= n
            self._apply([pending.popleft() for _ in range(n)])
        if ((pending or self._budget < APPLY_PER_WAKEUP) and self._drain_handle is None
                and not self.loop.is_closed()):
            self._drain_handle = self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Once per loop iteration while updates wait (or some were applied): a fresh budget."""
        self._drain_handle = None
        self._budget = APPLY_PER_WAKEUP
        self._apply_some()

    def _apply(self, updates: list[tuple]) -> None:
        bounds = (worker.MAX_METRIC_CHARS, worker.MAX_LABELS, worker.MAX_LABEL_CHARS)
        too_large = 0
        series = self._series
        over: Counter[str] = Counter()   # metric → updates dropped for a new series over a cap
        for update in updates:
            try:
                metric, labels, op, value = update
                if not _within(metric, labels, *bounds):
                    too_large += 1
                    continue
                key = frozenset(labels.items())
                known = series.get(metric)
                if (known is None or key not in known) and not self._new_series(metric, labels, key):
                    over[metric] += 1
                    continue
                self.metrics.apply(metric, labels, op, value)
            except Exception as exc:  # noqa: BLE001 - a bad update is counted, never raised into the loop
                self.metrics.analysis_errors.labels("bad_update").inc()
                name = update[0] if type(update) is tuple and update and type(update[0]) is str else "?"
                self._log_once(f"bad_update:{name[:worker.MAX_METRIC_CHARS]}", str(exc)[:500])
        if too_large:
            self._dropped(worker.UPDATE_TOO_LARGE, too_large,
                          f"{too_large} metric updates over a bound (metric name {worker.MAX_METRIC_CHARS} "
                          f"characters, {worker.MAX_LABELS} labels, a label value {worker.MAX_LABEL_CHARS} "
                          f"characters); dropped")
        for metric, n in over.items():
            self._series_dropped(metric, n)

    def _new_series(self, metric: str, labels: dict[str, str], key: frozenset) -> bool:
        """Whether an update may create the series `key` of `metric` (recorded when it may); False
        when a cap is reached. An update the registry rejects before creating a series (an unknown
        metric, wrong label names) passes, so that `apply` counts it as a bad update; one it would
        reject after (a negative increment) takes its place under the caps like any other."""
        names = _LABEL_NAMES.get(metric)
        if names is None or len(labels) != len(names) or not names.issuperset(labels):
            return True
        known = self._series.get(metric)
        if known is None:
            known = self._series[metric] = set()
        if len(known) >= self.max_series_per_metric or self._n_series >= self.max_series:
            return False
        known.add(key)
        self._n_series += 1
        return True

    def _series_dropped(self, metric: str, n: int) -> None:
        """Count `n` updates of `metric` dropped for a new series over a cap; log once per metric."""
        known = len(self._series.get(metric, ()))
        which = (f"MAX_SERIES_PER_METRIC ({self.max_series_per_metric})" if known >= self.max_series_per_metric
                 else f"MAX_SERIES ({self.max_series}, in all metrics)")
        message = (f"{metric} has {known} series made by analysis and the cap is {which}; {n} updates that "
                   f"would have made new series were dropped (the monitor labels by a value that does not "
                   f"repeat, e.g. a request id?); its {known} series keep updating")
        self.metrics.analysis_errors.labels(SERIES_LIMIT).inc(n)
        self.errors[SERIES_LIMIT] = message
        self._log_once(f"{SERIES_LIMIT}:{metric}", f"analysis results dropped: {SERIES_LIMIT}: {message}")

    def _dropped(self, kind: str, n: int, message: str) -> None:
        """Count `n` updates (or results) dropped for `kind`; log the first time."""
        if n <= 0:
            return
        self.metrics.analysis_errors.labels(kind).inc(n)
        self.errors[kind] = message
        self._log_once(kind, f"analysis results dropped: {kind}: {message}")

    def _error_kind(self, kind: Any) -> str:
        """The `kind` label of an analysis error, its cardinality capped (MAX_ERROR_KINDS, then "other")."""
        kind = str(kind)[:64]
        if kind not in self.errors and len(self.errors) >= MAX_ERROR_KINDS:
            return "other"
        return kind

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
            if p is None or self.stopping:
                continue
            if not p.is_alive():
                self._on_crash(p.exitcode)
            elif time.monotonic() > self._deadline:
                self._on_readable_safe()   # a busy event loop may not have read what did arrive
                if time.monotonic() > self._deadline:
                    self._on_hang(p)

    def _on_hang(self, p: Any) -> None:
        """Kill a worker that stopped answering (SIGKILL also ends a SIGSTOPped process)."""
        silent = time.monotonic() - (self._deadline - self.hang_timeout_s)
        try:
            p.kill()
        except OSError:   # it ended by itself meanwhile
            pass
        self._on_crash(None, RESTART_HUNG, f"analysis worker (pid {p.pid}) silent for {silent:.1f} s "
                                           f"(hang_timeout_s {self.hang_timeout_s:g}); killed")

    def _on_crash(self, exitcode: int | None, reason: str | None = None, message: str | None = None) -> None:
        self._on_readable_safe()   # results the worker sent before it ended still count
        own = _self_inflicted(exitcode, reason)   # before `reason` is filled in below
        if reason is None:
            reason = RESTART_KILLED if exitcode is not None and exitcode < 0 else RESTART_EXIT
        kind = f"worker_{reason}"
        self.metrics.analysis_errors.labels(kind).inc()
        self.metrics.restarts.labels(reason).inc()
        self.restarts += 1
        message = message or f"analysis worker ended with exit code {exitcode}"
        culprit = self._culprit() if own else None
        if culprit is not None:   # it ended itself inside one sample
            fingerprint, model = culprit
            # Twice the same sample: a poison, not bad luck (a kill from outside lands on any sample);
            # identical samples are rejected from now on instead of ending worker after worker.
            again = self.suspects.pop(fingerprint, None) is not None or fingerprint in self.quarantine
            remember(self.quarantine if again else self.suspects, fingerprint, model)
            message += f", handling a sample of {model} (fingerprint {fingerprint.hex()[:16]})"
            if again:
                message += (f" for the second time: identical samples are rejected as "
                            f"{worker.QUARANTINED!r} from now on")
        self.errors[kind] = message
        self._log_once(kind, f"{message}; restarting")
        for model, n in self._inflight.items():   # what the worker had is lost with it: counted, not vanished
            self.metrics.samples.labels(model, "rejected").inc(n)
            self.rejections.labels(model, WORKER_LOST).inc(n)
        self._inflight.clear()
        self._cleanup()
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < 30.0] + [now]
        delay = RESTART_BACKOFF_S[min(len(self._crashes), len(RESTART_BACKOFF_S)) - 1]
        self._restart_at = now + delay

    def _culprit(self) -> tuple[bytes, str] | None:
        """The fingerprint and model of the sample the worker was handling when it ended, if any."""
        slot = self._slot
        return worker.read_slot(slot) if slot is not None else None

    def _cleanup(self) -> None:
        if self.results is not None:
            try:
                self.loop.remove_reader(self.results.fileno())
            except (OSError, ValueError):
                pass
            self.results.close()
            self.results = None
        self._slot = None
        if self.samples_q is not None:
            self.samples_q.close()
            self.samples_q = None
        self.proc = None
        self.queued_bytes = 0   # whatever was queued died with the worker
        self.outstanding = 0
        self._inflight.clear()

    async def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to finish, then terminate it if it does not."""
        self.stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        p = self.proc
        if p is None:
            self._stop_updates()
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
        self._stop_updates()

    def _stop_updates(self) -> None:
        """Apply the whole backlog of updates now: stopping, no later loop iteration will."""
        pending = self._pending
        while pending:
            self._apply([pending.popleft() for _ in range(min(len(pending), APPLY_PER_WAKEUP))])
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None

    def _on_readable_safe(self) -> None:
        """Everything the worker has written so far (it is gone or silent: there is no more coming)."""
        if self.results is not None:
            try:
                self._on_readable(limit=None)
            except Exception:  # pragma: no cover - best effort at shutdown
                pass

    def state(self) -> dict:
        p = self.proc
        return {"worker_pid": p.pid if p is not None else None,
                "worker_alive": bool(p is not None and p.is_alive()),
                "restarts": self.restarts, "queue_depth": self.depth(), "queue_capacity": self.capacity,
                "queued_bytes": self.queued_bytes, "queue_max_bytes": self.max_bytes,
                "last_message_age_s": (round(time.monotonic() - self._last_heard, 3)
                                       if self._last_heard is not None else None),
                "quarantined": len(self.quarantine),
                "pending_updates": len(self._pending),
                "errors": dict(self.errors)}


# Label names of each metric analysis may update (the registry rejects the others before making a series).
_LABEL_NAMES: dict[str, frozenset[str]] = {s.name: frozenset(s.labels) for s in mn.METRICS if s.kind != "info"}


def _within(metric: Any, labels: Any, max_metric: int, max_labels: int, max_chars: int) -> bool:
    """Whether an update's metric name and labels are within the bounds a worker keeps to
    (ValueError when they are not a str and a dict of str: a malformed update)."""
    if type(metric) is not str or type(labels) is not dict:
        raise ValueError(f"malformed metric update: metric {type(metric).__name__}, labels {type(labels).__name__}")
    if len(metric) > max_metric or len(labels) > max_labels:
        return False
    for v in labels.values():
        if type(v) is not str:
            raise ValueError(f"malformed metric update: a label value is a {type(v).__name__}")
        if len(v) > max_chars:
            return False
    return True


class _Frame:
    """A file for pickle.dump that keeps what it is given: the pickler hands a bytes object of
    64 KiB or more to write() as it is, so a sample's bodies reach the pipe without a copy."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: Any) -> int:
        if type(data) is not bytes:   # a bytearray (or view) could change before it is written: copy it
            data = bytes(data)
        if data:
            self.parts.append(data)
            self.size += len(data)
        return len(data)


def remember(table: OrderedDict[bytes, str], fingerprint: bytes, model: str) -> None:
    """Add to a bounded table of fingerprints (the oldest forgotten beyond QUARANTINE_SIZE)."""
    table[fingerprint] = model
    table.move_to_end(fingerprint)
    while len(table) > QUARANTINE_SIZE:
        table.popitem(last=False)


def grow_pipe(fd: int, size: int = SAMPLE_PIPE_BYTES) -> None:
    """Enlarge a pipe's kernel buffer (Linux F_SETPIPE_SZ), so one large sample is one write; best effort."""
    import fcntl

    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsz is None:
        return
    try:
        fcntl.fcntl(fd, setsz, size)
    except OSError:   # over /proc/sys/fs/pipe-max-size or the user's pipe quota: keep the default
        pass


class PipeReader:
    """Non-blocking reads of framed messages from the worker's results pipe.

    `Connection.recv()` waits until a whole message has arrived: a worker stopped or
    descheduled in the middle of writing one larger than the pipe's buffer would hold the
    proxy's event loop (and the supervisor that runs on it) for as long. This reads what is
    there and keeps a partial message until the rest comes. The framing is Connection's
    (a 4-byte big-endian length, or -1 and an 8-byte length), as the worker writes it.
    """

    def __init__(self, conn: Any, max_frame: int = MAX_RESULT_BYTES):
        self.conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.buf = bytearray()
        self.eof = False
        self.max_frame = max_frame
        self.too_large: str | None = None   # why reading stopped at a frame over max_frame

    def fileno(self) -> int:
        return self.fd

    def read(self, limit: int | None) -> int:
        """Read up to `limit` bytes (None: all there is, or until the buffer holds more than one
        frame may: `messages()` first); the number read."""
        got = 0
        full = self.max_frame + 12 + 65536
        while not self.eof and (limit is None or got < limit) and len(self.buf) <= full:
            try:
                chunk = os.read(self.fd, 65536 if limit is None else min(65536, limit - got))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
            got += len(chunk)
        return got

    def messages(self) -> Iterator[Any]:
        """The complete messages buffered, in order (a partial one stays)."""
        buf = self.buf
        pos = 0
        try:
            while True:
                if len(buf) - pos < 4:
                    break
                (n,) = struct.unpack_from("!i", buf, pos)
                head = 4
                if n < -1:   # no frame length: the stream is garbled past resynchronising, so drop what came
                    pos = len(buf)
                    yield ("error", "bad_result", f"unreadable frame length {n} from the worker; dropped its output")
                    break
                if n == -1:
                    if len(buf) - pos < 12:
                        break
                    (n,) = struct.unpack_from("!Q", buf, pos + 4)
                    head = 12
                if n > self.max_frame:   # not read: the manager restarts the worker that wrote it
                    pos = len(buf)
                    self.eof = True
                    self.too_large = (f"wrote a result frame of {n} bytes, over MAX_RESULT_BYTES "
                                      f"({self.max_frame}); not read")
                    yield ("error", worker.RESULT_TOO_LARGE, self.too_large)
                    break
                if len(buf) - pos - head < n:
                    break
                start = pos + head
                pos = start + n
                try:
                    msg = pickle.loads(bytes(buf[start:pos]))
                except Exception as exc:  # noqa: BLE001 - a garbled message is counted, not fatal
                    msg = ("error", "bad_result", f"unreadable message from the worker: {exc!r}"[:500])
                yield msg
        finally:
            del buf[:pos]

    def close(self) -> None:
        self.buf = bytearray()
        self.conn.close()


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

    def send(self, payload: bytes | _Frame) -> None:
        """Frame one message: bytes, or a `_Frame`'s pieces (not copied)."""
        if self.broken:
            return
        parts, size = (payload.parts, payload.size) if isinstance(payload, _Frame) else ([payload], len(payload))
        head = struct.pack("!i", size) if size <= 0x7fffffff else struct.pack("!iQ", -1, size)   # as Connection
        self.buf.append(memoryview(head))
        self.buf.extend(memoryview(p) for p in parts if p)
        if not self.waiting:
            self._drain()

    def _drain(self) -> None:
        """Write what the pipe takes, at most WRITE_BYTES_PER_WAKEUP (a worker reading as fast
        as it is written would otherwise keep one call copying a 60 MB sample); the rest when
        the pipe is writable again, on a later wakeup."""
        buf = self.buf
        room = WRITE_BYTES_PER_WAKEUP
        while buf and room > 0:
            iov: list[memoryview] = []
            left = room
            for b in islice(buf, WRITEV_BUFFERS):
                if len(b) >= left:
                    iov.append(b[:left])
                    break
                iov.append(b)
                left -= len(b)
            try:
                n = os.writev(self.fd, iov) if len(iov) > 1 else os.write(self.fd, iov[0])
            except BlockingIOError:
                break
            except OSError:           # the worker is gone; the supervisor restarts it
                self.broken = True
                buf.clear()
                break
            room -= n
            while n:
                first = buf[0]
                if n >= len(first):
                    n -= len(first)
                    buf.popleft()
                else:
                    buf[0] = first[n:]
                    n = 0
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
