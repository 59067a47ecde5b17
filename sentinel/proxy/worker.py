"""The analysis worker process: decode sampled pairs, feed the model's monitor, report back.

Runs in a spawned process so decoding and analysis never hold the proxy's GIL. It reads
pickled `Sample`s from one pipe and writes plain tuples to another:

    ("samples", model, n, {reject_reason: count}, [(metric, labels, op, value)...], payload_bytes)
                                              n samples of one model handled since the last write
                                              (counter increments summed, observations kept)
    ("batch", [message, ...])                 several of these messages in one pipe write
    ("error", kind, message)                  an exception in a monitor
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
import signal
import time
from collections.abc import Callable
from typing import Any

DEFAULT_FACTORY = "sentinel.analysis.monitor:build_monitor"
STATUS_EVERY_S = 1.0
RESULTS_LINGER_S = 0.25    # after a sample arrives, wait this long for others (at most heartbeat_s)
MAX_BATCH = 256            # at most this many samples share one write

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

    def send(self, msg: tuple, now: bool = False) -> None:
        """Queue a message for the next write; `now`: write it (and everything queued) at once."""
        self.outbox.append(msg)
        if now:
            self.flush()

    def flush(self) -> None:
        """Write what is queued: the messages in order, then one "samples" message per model."""
        msgs = self.outbox
        if self.pending:
            msgs.extend(t.message(model) for model, t in self.tallies.items())
            self.tallies = {}
            self.pending = 0
        if msgs:
            self._write(msgs)

    def _write(self, msgs: list) -> None:
        """Send `msgs` (the outbox, and what joins it) in one write; the outbox starts afresh."""
        self.outbox = []
        self.results.send(msgs[0] if len(msgs) == 1 else ("batch", msgs))
        self.last_sent = time.monotonic()

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
                self.send(("buckets", dict(buckets())))
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
                    updates = [(u.metric, dict(u.labels), u.op, float(u.value)) for u in observed]
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
                self.send(("status", model, status))


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
    writes after MAX_BATCH samples or `budget` seconds of handling at the latest, so the
    manager hears from it as often as one sample at a time would let it. Returns (input goes
    on, it stopped with samples possibly still waiting); what was handled before the end of
    input is still reported.
    """
    if linger > 0:
        time.sleep(linger)
    going = behind = True
    stop = time.monotonic() + budget
    while True:
        if worker.pending >= MAX_BATCH or time.monotonic() >= stop:
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
