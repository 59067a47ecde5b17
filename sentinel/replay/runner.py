"""Driving load: open loop at a fixed rate (latency from the intended send time) or closed loop.

Open loop: request i is due at t0 + i/rate. It is sent on one of `connections` keep-alive
connections; when all are busy (a stalled server), the send waits, and that wait counts.
Its *corrected* latency runs from the intended time, its *uncorrected* latency from the
moment it was actually written, so a stall shows as many slow requests in the corrected
figures and as few in the uncorrected ones (coordinated omission, as wrk2 and
HdrHistogram define it). Closed loop: `concurrency` workers each send the next request as
soon as the previous answer arrives; there is no intended time, both figures are equal.
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sentinel.errors import DecodeError
from sentinel.golden import Tolerance
from sentinel.replay.compare import Comparison, Tally, compare
from sentinel.replay.histogram import LatencyHistogram
from sentinel.replay.http import Connection, HttpError, Target, build_head
from sentinel.replay.wire import WireFormat


@dataclass(frozen=True)
class LoadPlan:
    """How much load, and of which shape."""

    rate: float | None = None          # requests per second (open loop)
    concurrency: int | None = None     # workers (closed loop), when no rate is given
    count: int | None = None           # requests to send
    duration_s: float | None = None    # or: how long to send
    connections: int = 64              # open loop: keep-alive connections (in-flight limit)
    timeout_s: float = 30.0            # per request, from the actual send

    def validate(self) -> list[str]:
        p = []
        if self.rate is not None and self.concurrency is not None:
            p.append("--rate and --concurrency exclude each other")
        if self.count is not None and self.duration_s is not None:
            p.append("--count and --duration exclude each other (the count would win and the duration be ignored)")
        # `not 0 < v < inf` rather than `v <= 0`: NaN compares false with everything and slipped through
        if self.rate is not None and not 0 < self.rate < math.inf:
            p.append(f"--rate must be a positive number, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            p.append(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.count is not None and self.count < 1:
            p.append(f"--count must be at least 1, got {self.count}")
        if self.duration_s is not None and not 0 < self.duration_s < math.inf:
            p.append(f"--duration must be a positive number, got {self.duration_s}")
        if self.connections < 1:
            p.append(f"--connections must be at least 1, got {self.connections}")
        if not 0 < self.timeout_s < math.inf:
            p.append(f"--timeout must be a positive number, got {self.timeout_s}")
        return p

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


@dataclass(frozen=True)
class Samples:
    """What to send and what to expect: one row per golden sample."""

    ids: np.ndarray             # int64
    inputs: np.ndarray          # N × (raw or network shape)
    probabilities: np.ndarray   # N × classes, reference
    logits: np.ndarray          # N × classes, reference
    tolerance: Tolerance = field(default_factory=Tolerance)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Outcome:
    """One finished request, as observers see it."""

    sample_id: int
    latency_s: float               # corrected (from the intended send time)
    error: str | None              # error kind, or None
    comparison: Comparison | None  # None when the request failed


@dataclass
class RunResult:
    """Everything a run measured (see `report.build_report`)."""

    mode: str
    planned: int
    sent: int = 0
    completed: int = 0
    corrected: LatencyHistogram = field(default_factory=LatencyHistogram)
    uncorrected: LatencyHistogram = field(default_factory=LatencyHistogram)
    send_lag: LatencyHistogram = field(default_factory=LatencyHistogram)     # actual - intended send
    client_time: LatencyHistogram = field(default_factory=LatencyHistogram)  # per request, not waiting
    errors: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    comparisons: Tally | list[Comparison] = field(default_factory=Tally)   # the run's: a Tally (bounded)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    retried: int = 0            # requests resent on a fresh connection after a kept-alive one closed
    interrupted: bool = False   # Ctrl-C (SIGINT) ended the run early: what is here is what finished before
    abandoned: int = 0          # requests in flight when it was interrupted (not counted in `sent`)


# After Ctrl-C: how long requests in flight get to unwind before the run ends without them.
CANCEL_GRACE_S = 2.0

Observer = Callable[[Outcome], None]
Progress = Callable[[int, int], None]


class Replayer:
    """Sends golden samples to a target and measures latency and agreement."""

    offset = 0   # request i sends golden sample (i + offset) mod n (the canary moves it each round)

    def __init__(self, target: Target, wire: WireFormat, samples: Samples, *,
                 headers: dict[str, str] | None = None, observer: Observer | None = None,
                 progress: Progress | None = None):
        self.target = target
        self.wire = wire
        self.samples = samples
        self.observer = observer
        self.progress = progress
        extra = dict(headers or {})
        # Encode each distinct request once: the client's time must go to sending, not JSON.
        self._requests: list[bytes] = []
        for x in samples.inputs:
            hdrs, body = wire.encode(x)
            self._requests.append(build_head(target, "POST", wire.path, {**hdrs, **extra}, len(body)) + body)

    def new_connection(self) -> Connection:
        """One more connection to the target (the gRPC replayer hands out calls on one channel)."""
        return Connection(self.target)

    def planned_count(self, plan: LoadPlan) -> int:
        if plan.count is not None:
            return plan.count
        if plan.duration_s is not None and plan.rate is not None:
            return max(1, math.ceil(plan.rate * plan.duration_s))
        if plan.duration_s is not None:
            return 0  # closed loop until the time is up
        return len(self.samples)

    def run(self, plan: LoadPlan, *, partial_on_interrupt: bool = False) -> RunResult:
        """Run the plan on a fresh event loop (uvloop when installed).

        With `partial_on_interrupt` (the CLI; only on the main thread, and only when SIGINT is
        not ignored, as in a script's background job), the first SIGINT ends the run early:
        requests in flight are cancelled, their connections closed, and the result holds what
        finished, marked `interrupted`. The handler is the event loop's own (a wake-up fd, so it
        is seen even while the loop sleeps in C), and it puts back the default action at once,
        so a second SIGINT ends the process whatever the run is doing. The previous handler is
        restored when the run ends."""
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            loop = asyncio.new_event_loop()
        self._result: RunResult | None = None
        task = loop.create_task(self.run_async(plan))
        interrupted = False
        stopper: asyncio.Handle | None = None
        previous = None
        if partial_on_interrupt and threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is signal.SIG_IGN:
                previous = None   # ignored by whoever started us (a script's background job): leave it so

        def on_sigint() -> None:
            nonlocal interrupted, stopper
            interrupted = True
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_DFL)   # a second Ctrl-C: stop at once
            task.cancel()
            # Whatever does not unwind in time is left behind: the loop stops, the run ends.
            stopper = loop.call_later(CANCEL_GRACE_S, loop.stop)

        t0 = time.perf_counter()
        try:
            if previous is not None:
                loop.add_signal_handler(signal.SIGINT, on_sigint)
            try:
                return loop.run_until_complete(task)
            except (asyncio.CancelledError, RuntimeError):   # RuntimeError: stopped by `stopper`
                r = self._result
                if not interrupted or r is None:
                    raise
                r.interrupted = True
                r.abandoned = r.sent - r.completed
                r.sent = r.completed   # sent = answered + errors, as in a run that ran to its end
                r.wall_s = r.wall_s or time.perf_counter() - t0
                return r
        finally:
            try:
                if stopper is not None:
                    stopper.cancel()
                if previous is not None:
                    if not interrupted:
                        loop.remove_signal_handler(signal.SIGINT)
                    signal.signal(signal.SIGINT, previous)
                try:
                    _cancel_all(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                except RuntimeError:   # stopped again by what `stopper` left behind: we are ending anyway
                    if not interrupted:
                        raise
            finally:
                loop.close()

    async def run_async(self, plan: LoadPlan) -> RunResult:
        planned = self.planned_count(plan)
        result = RunResult("open" if plan.open_loop else "closed", planned,
                           comparisons=Tally(self.samples.tolerance))
        self._result = result
        cpu0, t0 = time.process_time(), time.perf_counter()
        try:
            if plan.open_loop:
                await self._open_loop(plan, planned, result)
            else:
                await self._closed_loop(plan, planned, result)
        finally:
            result.wall_s = time.perf_counter() - t0
            result.cpu_s = time.process_time() - cpu0
        return result

    async def _one(self, conn: Connection, i: int, intended: float, timeout: float, result: RunResult) -> None:
        """Send request i on `conn`; record latency, errors and the comparison."""
        k = (i + self.offset) % len(self.samples)
        t_send = time.perf_counter()
        error = None
        cmp = None
        t_wait = t_send
        retries = getattr(conn, "retries", 0)
        try:
            async with asyncio.timeout(timeout):   # not wait_for: see http.Connection._connect
                resp = await conn.request(self._requests[k], b"")
            t_done = time.perf_counter()
            t_wait = t_done
            if 200 <= resp.status < 300:
                try:
                    got = self.wire.decode(resp.headers, resp.body)
                    cmp = compare(int(self.samples.ids[k]), got, self.samples.probabilities[k],
                                  self.samples.logits[k], self.samples.tolerance)
                except DecodeError as exc:
                    error = "decode"
                    result.error_examples.setdefault(error, str(exc))
            else:
                error = f"http_{resp.status}"
                result.error_examples.setdefault(error, resp.body[:200].decode("utf-8", "replace"))
        except TimeoutError:
            conn.close()
            t_done = t_wait = time.perf_counter()
            error = "timeout"
            result.error_examples.setdefault(error, f"no answer within {timeout:g} s")
        except HttpError as exc:
            t_done = t_wait = time.perf_counter()
            error = exc.kind
            result.error_examples.setdefault(error, str(exc))
        result.completed += 1
        result.retried += getattr(conn, "retries", 0) - retries
        result.corrected.record(t_done - intended)
        result.uncorrected.record(t_done - t_send)
        result.send_lag.record(t_send - intended)
        if error:
            result.errors[error] += 1
        elif cmp is not None:
            result.comparisons.append(cmp)
        # Time spent here after the answer arrived: decoding and comparing.
        result.client_time.record(time.perf_counter() - t_wait)
        if self.observer is not None:
            self.observer(Outcome(int(self.samples.ids[k]), t_done - intended, error, cmp))
        if self.progress is not None:
            self.progress(result.completed, result.planned)

    async def _open_loop(self, plan: LoadPlan, planned: int, result: RunResult) -> None:
        assert plan.rate is not None
        idle: list[Connection] = []
        slots = asyncio.Semaphore(plan.connections)
        tasks: set[asyncio.Task] = set()

        async def send(i: int, intended: float) -> None:
            conn = idle.pop() if idle else self.new_connection()
            try:
                await self._one(conn, i, intended, plan.timeout_s, result)
            finally:
                idle.append(conn)
                slots.release()

        start = time.perf_counter()
        interval = 1.0 / plan.rate
        try:
            for i in range(planned):
                intended = start + i * interval
                delay = intended - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()   # all connections busy: this send is late, and that counts
                result.sent += 1
                t = asyncio.create_task(send(i, intended))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            # Cancelled (Ctrl-C): the requests still in flight are abandoned. Their connections
            # go back to `idle` as each task unwinds, and every connection is closed.
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CANCEL_GRACE_S)
            for c in idle:
                c.close()

    async def _closed_loop(self, plan: LoadPlan, planned: int, result: RunResult) -> None:
        workers = plan.concurrency or 1
        deadline = time.perf_counter() + plan.duration_s if plan.duration_s is not None else None
        counter = iter(range(planned) if planned else _count())

        async def worker() -> None:
            conn = self.new_connection()
            try:
                for i in counter:
                    if deadline is not None and time.perf_counter() >= deadline:
                        break
                    result.sent += 1
                    await self._one(conn, i, time.perf_counter(), plan.timeout_s, result)
            finally:
                conn.close()

        await asyncio.gather(*(worker() for _ in range(workers)))
        if not planned:
            result.planned = result.sent


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and reap every task still on `loop` (asyncio.Runner's clean-up, for our own loop), waiting
    at most `CANCEL_GRACE_S`."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:   # bounded: a task that swallows its cancellation must not keep the process
        loop.run_until_complete(asyncio.wait(pending, timeout=CANCEL_GRACE_S))


def _count():
    i = 0
    while True:
        yield i
        i += 1
