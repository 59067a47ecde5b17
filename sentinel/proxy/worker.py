"""The analysis worker process: decode sampled pairs, feed the model's monitor, report back.

Runs in a spawned process so decoding and analysis never hold the proxy's GIL. It reads
pickled `Sample`s from one pipe and writes plain tuples to another:

    ("samples", model, n, {reject_reason: count}, [(metric, labels, op, value)...], payload_bytes)
                                              n samples of one model handled since the last write
                                              (counter increments summed, observations kept)
    ("updates", model, [(metric, labels, op, value)...])
                                              more updates of the "samples" message of `model` after it
    ("batch", [message, ...])                 several of these messages in one pipe write
    ("error", kind, message)                  an exception in a monitor
    ("dropped", kind, count, message)         `count` metric updates (or results) not sent, and why:
                                              TOO_MANY_UPDATES, UPDATE_TOO_LARGE, RESULT_TOO_LARGE
    ("status", model, dict)                   a monitor's status, at most once a second
    ("buckets", {metric: bounds})             histogram bounds a monitor asks for
    ("heartbeat",)                            sign of life while idle, every `heartbeat_s`
    ("busy", seconds)                         the next message may take this long (building a monitor)

Samples are taken in bursts: when one arrives the worker sleeps `RESULTS_LINGER_S` (0.25 s,
at most `heartbeat_s`), then handles every sample waiting and writes all their results at
once (after MAX_BATCH samples or as long again of handling at the latest), so at modest
rates the worker and the proxy's event loop pay one wake-up, one pickle and one write per
burst rather than per sample (results reach the metrics that much later). "busy" and
"heartbeat" go out at once.

What a monitor returns is bounded before it is sent, so neither this process nor the proxy
holds, pickles or applies an unbounded amount: at most `MAX_UPDATES_PER_SAMPLE` updates of
one sample are kept; an update whose metric name, label count or a label's key or value is
over `MAX_METRIC_CHARS`/`MAX_LABELS`/`MAX_LABEL_CHARS` is dropped whole; a burst writes
early once it holds `MAX_UPDATES_PER_WRITE`; a status over `MAX_STATUS_BYTES` (or
histogram bounds over `MAX_BUCKETS_BYTES`) is not sent. Each of these is reported in a
"dropped" message (sentinel_analysis_errors_total{kind}, by the number dropped). A write
goes out as frames of about `FRAME_BYTES` each (the updates of a "samples" message split
into "updates" messages), so the proxy unpickles and applies a little at a time.

No payload can end the worker: every exception of decoding one sample rejects that sample
with a reason (a decode error kind, or one of `REJECT_REASONS`), every exception of a
monitor is reported as an "error"; one sample gets `sample_timeout_s` of wall-clock time
(SIGALRM), and the data segment can be capped (`worker_memory_limit_bytes`) so a
pathological payload fails with MemoryError here instead of taking the pod's memory. A
hang the alarm cannot break (a stuck C call, SIGSTOP) shows as missing heartbeats, and the
manager kills and restarts the worker.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

DEFAULT_FACTORY = "sentinel.analysis.monitor:build_monitor"
STATUS_EVERY_S = 1.0
RESULTS_LINGER_S = 0.25    # after a sample arrives, wait this long for others (at most heartbeat_s)
MAX_BATCH = 256            # at most this many samples share one write

# Bounds on what a monitor's results may cost the proxy (see the module docstring).
MAX_UPDATES_PER_SAMPLE = 16_384    # metric updates kept from one sample; the rest are dropped and counted
MAX_UPDATES_PER_WRITE = 32_768     # a burst writes early once its samples' updates reach this many
MAX_METRIC_CHARS = 128             # an update whose metric name is longer is dropped
MAX_LABELS = 8                     # ... that has more labels
MAX_LABEL_CHARS = 256              # ... a label key or value longer than this (a Prometheus series each)
MAX_STATUS_BYTES = 256 * 1024      # a monitor's status, pickled; a larger one is not sent
MAX_BUCKETS_BYTES = 64 * 1024      # the histogram bounds a monitor asks for, pickled
FRAME_BYTES = 64 * 1024            # about this much (estimated) per pipe write

# `kind`s of "dropped" messages (sentinel_analysis_errors_total{kind}, counted per update dropped).
TOO_MANY_UPDATES = "too_many_updates"    # over MAX_UPDATES_PER_SAMPLE (or the proxy's backlog of updates)
UPDATE_TOO_LARGE = "update_too_large"    # metric name, label count or a label over its bound
RESULT_TOO_LARGE = "result_too_large"    # a status or bucket message over its bound (or unpicklable)

# Reasons a sample is rejected besides the decoders' own DecodeError kinds.
TOO_DEEP = "too_deep"                # RecursionError: nesting deeper than Python's stack
OUT_OF_MEMORY = "out_of_memory"      # MemoryError: over the worker's memory limit
TIMEOUT = "timeout"                  # over sample_timeout_s
UNEXPECTED = "unexpected_error"      # any other exception a decoder let escape (a decoder bug; logged)
QUARANTINED = "quarantined"          # identical to a sample that twice ended the worker: not handled again
REJECT_REASONS = (TOO_DEEP, OUT_OF_MEMORY, TIMEOUT, UNEXPECTED, QUARANTINED)

# The slot: shared memory where the worker says which sample it is handling, so that the manager
# knows the culprit when the worker dies (os._exit, a segfault, a kill) in the middle of one.
# Layout: [0] 1 while handling; [1:17] the sample's fingerprint; [17] n; [18:18+n] its model, UTF-8.
FINGERPRINT_BYTES = 16
_MODEL_AT = 1 + FINGERPRINT_BYTES + 1
SLOT_SIZE = _MODEL_AT + 128

log = logging.getLogger("sentinel.analysis.worker")


def fingerprint(sample: Any) -> bytes:
    """What identifies a sample for the quarantine: a hash of its model and request body.

    Not the response: the same request's response often differs byte for byte (an id, a
    timestamp, a gzip header's mtime), and a poison comes in through the request.
    """
    h = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    for part in (sample.model.encode(), sample.request_body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def write_slot(view: memoryview, fp: bytes, model: str) -> None:
    """Say (in shared memory, no system call) that the sample `fp` of `model` is being handled."""
    name = model.encode()[:SLOT_SIZE - _MODEL_AT]
    view[0] = 0
    view[1:_MODEL_AT - 1] = fp
    view[_MODEL_AT - 1] = len(name)
    view[_MODEL_AT:_MODEL_AT + len(name)] = name
    view[0] = 1


def read_slot(slot: Any) -> tuple[bytes, str] | None:
    """(fingerprint, model) of the sample the worker was handling, or None if it was between samples."""
    view = memoryview(slot).cast("B")
    if view[0] != 1:
        return None
    n = view[_MODEL_AT - 1]
    return bytes(view[1:_MODEL_AT - 1]), bytes(view[_MODEL_AT:_MODEL_AT + n]).decode(errors="replace")


class SampleTimeout(BaseException):
    """One sample used up its time budget.

    A BaseException so that decoders' and monitors' own `except Exception` cannot swallow it.
    """


class Budget:
    """A wall-clock budget for one sample, enforced by SIGALRM in the worker's main thread.

    `with budget:` arms the timer; when it fires inside the block, SampleTimeout is raised
    there. The handler raises only while a block is active, so an alarm that lands just as
    the block ends cannot escape into the code that writes to the results pipe.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = False
        if seconds > 0:
            signal.signal(signal.SIGALRM, self._fire)

    def _fire(self, signum: int, frame: Any) -> None:
        if self.active:
            self.active = False
            raise SampleTimeout(f"over the per-sample budget of {self.seconds:g} s")

    def __enter__(self) -> Budget:
        if self.seconds > 0:
            self.active = True
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.seconds > 0:
            self.active = False
            signal.setitimer(signal.ITIMER_REAL, 0)


def limit_memory(limit_bytes: int) -> None:
    """Cap this process's data segment (RLIMIT_DATA) so big allocations raise MemoryError.

    RLIMIT_DATA counts heap and private writable mappings (numpy arrays, decoded images),
    not shared libraries or address space merely reserved, which RLIMIT_AS would count.
    """
    if limit_bytes <= 0:
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, hard))
    except (ValueError, OSError) as exc:   # e.g. already using more than the limit
        log.warning("cannot limit the analysis worker's memory to %d bytes: %s", limit_bytes, exc)


def lower_priority(nice: int) -> None:
    """Raise this process's niceness by `nice`: analysis is best-effort, the proxy is on the request path.

    On a busy pod the kernel then gives a contended core to the proxy first, so a burst of
    analysis delays metrics rather than requests. Lowering priority needs no privilege.
    """
    if nice > 0:
        try:
            os.nice(nice)
        except OSError as exc:
            log.warning("cannot lower the analysis worker's CPU priority by %d: %s", nice, exc)


def set_scheduling(policy: str) -> None:
    """`batch`: SCHED_BATCH (Linux), so the worker's wake-ups do not preempt the proxy mid-request.

    The worker keeps its fair share of a contended core (unlike a raised niceness); only the
    wake-up preemption the kernel grants interactive tasks is given up. Needs no privilege.
    """
    if policy != "batch":
        return
    setter = getattr(os, "sched_setscheduler", None)
    if setter is None or not hasattr(os, "SCHED_BATCH"):
        log.warning("analysis.worker_scheduling: batch needs Linux; the worker runs with normal scheduling")
        return
    try:
        setter(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        log.warning("cannot give the analysis worker batch scheduling: %s", exc)


def load_factory(spec: str) -> Callable[[Any, Any], Any]:
    """`module:function` → the function; the built-in monitor when the default module is absent."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if spec == DEFAULT_FACTORY and exc.name in (mod_name, "sentinel.analysis.monitor"):
            from sentinel.proxy.builtin_monitor import build_builtin
            return build_builtin
        raise
    return getattr(mod, fn_name)


_warned: set[str] = set()


def reject_reason(exc: BaseException) -> str:
    """The rejection reason of an exception that escaped a decoder."""
    from sentinel.protocols import DecodeError

    if isinstance(exc, DecodeError):
        return exc.kind
    if isinstance(exc, RecursionError):
        return TOO_DEEP
    if isinstance(exc, MemoryError):
        return OUT_OF_MEMORY
    key = type(exc).__name__
    if key not in _warned:   # a decoder should have raised DecodeError: say which exception escaped
        _warned.add(key)
        log.warning("a decoder raised %s: %s (sample rejected as %s)", key, str(exc)[:200], UNEXPECTED)
    return UNEXPECTED


_decoders: tuple[Any, ...] = ()


def _imports() -> tuple[Any, ...]:
    """DecodedBatch, DecodeHints, decode_request, decode_response: imported once, on first use."""
    global _decoders
    if not _decoders:
        from sentinel.analysis.contract import DecodedBatch
        from sentinel.protocols import DecodeHints, decode_request, decode_response

        _decoders = (DecodedBatch, DecodeHints, decode_request, decode_response)
    return _decoders


def decode(sample: Any, model: str, hints: Any = None):
    """A DecodedBatch from a Sample, and the reason the first half failed to decode (or None).

    `hints` (sentinel.protocols.DecodeHints) say what the model's inputs look like: raw
    tensor shape and dtype, the pixel bound of encoded images. Never raises an Exception:
    whatever a decoder raises becomes a reason.
    """
    DecodedBatch, DecodeHints, decode_request, decode_response = _decoders or _imports()
    hints = hints or DecodeHints()

    inputs = form = outputs = kind = None
    err: str | None = None
    try:
        req = decode_request(sample.protocol, sample.request_body, sample.request_headers, hints)
        inputs, form = req.inputs, req.form
    except SampleTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001 - a payload must never end the worker (not even SystemExit)
        err = reject_reason(exc)
    try:
        resp = decode_response(sample.protocol, sample.response_body, sample.response_headers, hints)
        outputs, kind = resp.outputs, resp.kind
    except SampleTimeout:
        raise
    except BaseException as exc:  # noqa: BLE001
        err = err or reject_reason(exc)
    batch = DecodedBatch(model=model, inputs=inputs, input_form=form, outputs=outputs, output_kind=kind,
                         source=sample.source, request_id=sample.request_id, timestamp=sample.timestamp)
    return batch, err


def plain_update(u: Any) -> tuple | None:
    """A MetricUpdate as the plain tuple sent to the proxy, or None when it is over a bound.

    Labels become str → str (as Prometheus would make them); an unknown op is left for the
    proxy to reject as a bad update (a non-str one as its type's name). Raises what reading
    `u` raises (a monitor's bug, reported as its error).
    """
    metric, labels, op = u.metric, u.labels, u.op
    value = float(u.value)
    if type(op) is not str:
        op = type(op).__name__
    if type(metric) is not str:
        metric = type(metric).__name__
    if len(metric) > MAX_METRIC_CHARS or len(op) > MAX_METRIC_CHARS:
        return None
    if not isinstance(labels, dict):
        labels = dict(labels)
    if len(labels) > MAX_LABELS:
        return None
    plain: dict[str, str] = {}
    for k, v in labels.items():
        if type(k) is not str:
            k = str(k)
        if type(v) is not str:
            v = str(v)
        if len(k) > MAX_LABEL_CHARS or len(v) > MAX_LABEL_CHARS:
            return None
        plain[k] = v
    return (metric, plain, op, value)


def bounded_updates(observed: Any) -> tuple[list[tuple], int, int]:
    """A monitor's updates as plain tuples: (kept, dropped over MAX_UPDATES_PER_SAMPLE, dropped as too large)."""
    kept: list[tuple] = []
    too_large = seen = 0
    it = iter(observed)
    for u in it:
        seen += 1
        if len(kept) >= MAX_UPDATES_PER_SAMPLE:
            over = len(observed) - seen + 1 if hasattr(observed, "__len__") else 1 + sum(1 for _ in it)
            return kept, over, too_large
        t = plain_update(u)
        if t is None:
            too_large += 1
        else:
            kept.append(t)
    return kept, 0, too_large


def _update_cost(u: tuple) -> int:
    """About what one plain update adds to a pickled message (an estimate, in characters)."""
    return 32 + len(u[0]) + sum(len(k) + len(v) for k, v in u[1].items())


def _chunks(updates: list[tuple]) -> Iterator[tuple[list[tuple], int]]:
    """`updates` in consecutive pieces of about FRAME_BYTES each, with their estimated cost."""
    chunk: list[tuple] = []
    cost = 0
    for u in updates:
        c = _update_cost(u)
        if chunk and cost + c > FRAME_BYTES:
            yield chunk, cost
            chunk, cost = [], 0
        chunk.append(u)
        cost += c
    yield chunk, cost


def _pieces(msgs: list[tuple]) -> Iterator[tuple[tuple, int]]:
    """The messages to write, each with its estimated size; a "samples" message with more updates
    than fit a frame is preceded by "updates" messages with all but the last piece (so when the
    proxy counts the samples reported, all their updates have arrived)."""
    for msg in msgs:
        if msg[0] == "samples" and msg[4]:
            pieces = list(_chunks(msg[4]))
            for chunk, cost in pieces[:-1]:
                yield ("updates", msg[1], chunk), cost + 48
            chunk, cost = pieces[-1]
            yield (*msg[:4], chunk, msg[5]), cost + 64 + 48 * len(msg[3])
        else:
            yield msg, _message_cost(msg)


def _message_cost(msg: tuple) -> int:
    if msg[0] in ("heartbeat", "busy", "dropped", "samples"):
        return 256
    try:
        return len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - sent as it is; Connection.send raises the same
        return FRAME_BYTES


class _Tally:
    """What the samples of one model handled since the last write add up to."""

    __slots__ = ("n", "rejected", "incs", "others", "size")

    def __init__(self) -> None:
        self.n = 0
        self.rejected: dict[str, int] = {}
        self.incs: dict[tuple, list] = {}     # (metric, label items) → [metric, labels, "inc", total]
        self.others: list[tuple] = []         # observations and sets, in order
        self.size = 0

    def add(self, err: str | None, updates: list[tuple], size: int) -> None:
        """One sample: its rejection reason (or None), its (metric, labels, op, value) updates, its bytes."""
        self.n += 1
        self.size += size
        if err:
            self.rejected[err] = self.rejected.get(err, 0) + 1
        incs = self.incs
        for u in updates:
            if u[2] == "inc":
                key = (u[0], tuple(u[1].items()))
                acc = incs.get(key)
                if acc is None:
                    incs[key] = list(u)
                else:
                    acc[3] += u[3]
            else:
                self.others.append(u)

    def message(self, model: str) -> tuple:
        updates = [tuple(a) for a in self.incs.values()]
        updates.extend(self.others)
        return ("samples", model, self.n, self.rejected, updates, self.size)


class Worker:
    """The worker's state: one monitor per model, the budget, and the results pipe."""

    def __init__(self, config: Any, factory: Callable[[Any, Any], Any], results: Any, *,
                 slot: Any = None, quarantine: frozenset[bytes] = frozenset()):
        acfg = config.analysis
        self.slot = memoryview(slot).cast("B") if slot is not None else None
        self.quarantine = quarantine           # fingerprints of samples not to handle (they ended workers)
        self.heartbeat_s = acfg.heartbeat_s
        self.config = config
        self.factory = factory
        self.results = results
        self.models = {m.name: m for m in config.models}
        self.monitors: dict[str, Any] = {}
        self.last_status: dict[str, float] = {}
        self.last_windows: dict[str, Any] = {}
        self.hints: dict[str, Any] = {}
        self.budget = Budget(acfg.sample_timeout_s)
        self.build_timeout_s = acfg.worker_start_timeout_s
        self.last_sent = time.monotonic()
        self.outbox: list[tuple] = []          # messages not yet written, in order
        self.tallies: dict[str, _Tally] = {}   # samples not yet reported, per model
        self.pending = 0                       # samples in the tallies
        self.pending_updates = 0               # updates in the tallies (before counters are summed)
        self.dropped: dict[str, list] = {}     # kind → [updates or results not sent, what the last one was]

    def send(self, msg: tuple, now: bool = False) -> None:
        """Queue a message for the next write; `now`: write it (and everything queued) at once."""
        self.outbox.append(msg)
        if now:
            self.flush()

    def flush(self) -> None:
        """Write what is queued: the messages in order, what was dropped, then one "samples"
        message per model."""
        msgs = self.outbox
        if self.dropped:
            msgs.extend(("dropped", kind, n, why) for kind, (n, why) in self.dropped.items())
            self.dropped = {}
        if self.pending:
            msgs.extend(t.message(model) for model, t in self.tallies.items())
            self.tallies = {}
            self.pending = 0
            self.pending_updates = 0
        if msgs:
            self._write(msgs)

    def _write(self, msgs: list) -> None:
        """Send `msgs` (the outbox, and what joins it) in order, in frames of about FRAME_BYTES
        (usually one); the outbox starts afresh."""
        self.outbox = []
        frame: list[tuple] = []
        size = 0
        for msg, cost in _pieces(msgs):
            if frame and size + cost > FRAME_BYTES:
                self._send_frame(frame)
                frame, size = [], 0
            frame.append(msg)
            size += cost
        if frame:
            self._send_frame(frame)
        self.last_sent = time.monotonic()

    def _send_frame(self, frame: list[tuple]) -> None:
        self.results.send(frame[0] if len(frame) == 1 else ("batch", frame))

    def drop(self, kind: str, n: int, why: str) -> None:
        """Count `n` updates (or results) not sent, for the next write's "dropped" message."""
        entry = self.dropped.get(kind)
        if entry is None:
            self.dropped[kind] = [n, why]
        else:
            entry[0] += n
            entry[1] = why

    def send_bounded(self, msg: tuple, limit: int, what: str) -> None:
        """Queue a status or buckets message unless its pickle is over `limit` bytes (or it has none)."""
        try:
            size = len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:  # noqa: BLE001 - an unpicklable status would end the worker in send()
            self.drop(RESULT_TOO_LARGE, 1, f"{what} cannot be pickled: {str(exc)[:200]}")
            return
        if size > limit:
            self.drop(RESULT_TOO_LARGE, 1, f"{what} is {size} bytes pickled, over {limit}; not sent")
            return
        self.send(msg)

    def keep_alive(self) -> None:
        """Between the phases of a slow sample: tell the manager we are alive (it kills a silent worker)."""
        if time.monotonic() - self.last_sent >= self.heartbeat_s:   # the tallies wait for the burst's write
            self._write(self.outbox + [("heartbeat",)])

    def monitor(self, model: str) -> Any:
        mon = self.monitors.get(model)
        if mon is None:
            self.send(("busy", self.build_timeout_s), now=True)   # building may load a reference model
            mon = self.monitors[model] = self.factory(self.config, self.models[model])
            buckets = getattr(mon, "buckets", None)
            if callable(buckets):
                self.send_bounded(("buckets", dict(buckets())), MAX_BUCKETS_BYTES, f"{model}: histogram bounds")
        return mon

    def hints_for(self, model: str) -> Any:
        if model not in self.hints:
            from sentinel.protocols.hints import hints_for

            try:
                self.hints[model] = hints_for(self.config, self.models[model]) if model in self.models else None
            except SampleTimeout:   # pragma: no cover - no budget is armed here
                raise
            except BaseException as exc:  # noqa: BLE001 - default hints rather than a dead worker
                self.send(("error", type(exc).__name__, f"{model} decode hints: {str(exc)[:500]}"))
                self.hints[model] = None
        return self.hints[model]

    def handle(self, sample: Any) -> None:
        """Decode and analyse one sample and tally it, whatever it contains (`flush` reports it)."""
        try:
            sample = sample.joined()   # bodies captured in pieces (sampling.Sample)
        except AttributeError:   # not a Sample: decode() rejects it
            pass
        model = sample.model
        fp = fingerprint(sample) if self.slot is not None or self.quarantine else b""
        if fp in self.quarantine:
            self._tally(model, QUARANTINED, [], sample)
            return
        if self.slot is not None:
            write_slot(self.slot, fp, model)
        try:
            self._handle(sample, model)
        finally:
            if self.slot is not None:
                self.slot[0] = 0

    def _handle(self, sample: Any, model: str) -> None:
        updates: list = []
        err: str | None = None
        hints = self.hints_for(model)   # first sample of a model: may read its registry entry
        try:
            with self.budget:
                batch, err = decode(sample, model, hints)
        except SampleTimeout:
            batch, err = None, TIMEOUT
        except BaseException as exc:  # noqa: BLE001 - raised outside a decoder (building the batch)
            batch, err = None, reject_reason(exc)
        self.keep_alive()   # decoding may have taken most of a budget; the monitor may take another
        if batch is not None and (batch.inputs is not None or batch.outputs is not None):
            try:
                mon = self.monitor(model)
                with self.budget:
                    observed = mon.observe(batch)
                    updates, over, too_large = bounded_updates(observed)
                    observed = None
                if over:
                    total = len(updates) + too_large + over
                    self.drop(TOO_MANY_UPDATES, over,
                              f"a sample of {model} gave {total} metric updates, over MAX_UPDATES_PER_SAMPLE "
                              f"({MAX_UPDATES_PER_SAMPLE}); the rest were dropped")
                if too_large:
                    self.drop(UPDATE_TOO_LARGE, too_large,
                              f"a sample of {model} gave {too_large} metric updates over a bound (metric name "
                              f"{MAX_METRIC_CHARS} characters, {MAX_LABELS} labels, a label's key or value "
                              f"{MAX_LABEL_CHARS} characters); dropped")
            except SampleTimeout as exc:
                self.send(("error", TIMEOUT, f"{model}: analysis {exc}"))
            except BaseException as exc:  # noqa: BLE001 - any monitor failure is reported, never fatal
                self.send(("error", type(exc).__name__, f"{model}: {str(exc)[:500]}"))
            self.keep_alive()
        batch = None   # free a large batch before the next recv
        self._tally(model, err, updates, sample)
        self.report_status(model)

    def _tally(self, model: str, err: str | None, updates: list, sample: Any) -> None:
        tally = self.tallies.get(model)
        if tally is None:
            tally = self.tallies[model] = _Tally()
        tally.add(err, updates, len(sample.request_body) + len(sample.response_body))
        self.pending += 1
        self.pending_updates += len(updates)

    def report_status(self, model: str) -> None:
        now = time.monotonic()
        mon = self.monitors.get(model)
        evaluated = getattr(mon, "windows", None)       # a new evaluation: /status follows it at once
        if mon is not None and (now - self.last_status.get(model, 0.0) >= STATUS_EVERY_S
                                or evaluated != self.last_windows.get(model)):
            self.last_status[model] = now
            self.last_windows[model] = evaluated
            try:
                with self.budget:
                    status = mon.status()
            except SampleTimeout:
                self.send(("error", TIMEOUT, f"{model}: status() over the time budget"))
            except BaseException as exc:  # noqa: BLE001
                self.send(("error", type(exc).__name__, f"{model} status: {str(exc)[:500]}"))
            else:
                self.send_bounded(("status", model, status), MAX_STATUS_BYTES, f"{model}: status")


def main(config: Any, factory_spec: str, samples: Any, results: Any, *,
         slot: Any = None, quarantine: frozenset[bytes] = frozenset()) -> None:
    """Worker entry point (spawned): loop until `samples` is closed (or a None arrives).

    `slot`: shared memory where the sample being handled is named (see `write_slot`);
    `quarantine`: fingerprints of samples to reject unhandled.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides when we stop
    acfg = config.analysis
    limit_memory(acfg.worker_memory_limit_bytes)
    lower_priority(acfg.worker_nice)
    set_scheduling(acfg.worker_scheduling)
    worker = Worker(config, load_factory(factory_spec), results, slot=slot, quarantine=quarantine)
    heartbeat = acfg.heartbeat_s
    pause = min(RESULTS_LINGER_S, heartbeat)
    linger = pause
    try:
        worker.send(("heartbeat",), now=True)
        while True:
            try:
                if not samples.poll(heartbeat):   # idle: say so every heartbeat
                    worker.send(("heartbeat",), now=True)
                    continue
            except (EOFError, OSError):   # the daemon closed the pipe (stopping) or is gone
                break
            going, behind = burst(worker, samples, linger, pause)
            if not going:
                break
            linger = 0.0 if behind else pause   # behind: no pause until it catches up
    except (BrokenPipeError, OSError):   # the daemon is gone: nothing to report to
        return


def burst(worker: Worker, samples: Any, linger: float, budget: float) -> tuple[bool, bool]:
    """A sample has arrived: wait `linger` for others, handle all that are waiting, write their results.

    Rather than waking for each sample, the worker sleeps and then takes everything waiting
    with warm caches, so at modest rates it wakes and writes once per RESULTS_LINGER_S. It
    writes after MAX_BATCH samples (or MAX_UPDATES_PER_WRITE of their updates) or `budget`
    seconds of handling at the latest, so the manager hears from it as often as one sample at
    a time would let it. Returns (input goes on, it stopped with samples possibly still
    waiting); what was handled before the end of input is still reported.
    """
    if linger > 0:
        time.sleep(linger)
    going = behind = True
    stop = time.monotonic() + budget
    while True:
        if (worker.pending >= MAX_BATCH or worker.pending_updates >= MAX_UPDATES_PER_WRITE
                or time.monotonic() >= stop):
            break
        try:
            if not samples.poll(0):
                behind = False
                break
            sample = samples.recv()
        except (EOFError, OSError):
            going = False
            break
        if sample is None:
            going = False
            break
        worker.handle(sample)   # every sample is reported in the next write
    worker.flush()
    return going, behind
