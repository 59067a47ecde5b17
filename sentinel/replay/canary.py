"""The daemon's canary: every N seconds, replay M golden samples at a low rate to the model server.

Requests carry `X-Sentinel-Canary: 1` so the proxy leaves them out of traffic SLIs and
drift windows. Results feed, on the registry passed in:
    sentinel_replay_duration_seconds{model}            (latency from the intended send time)
    sentinel_replay_requests_total{model, result=ok|error}
    sentinel_reference_agreement_total{model, source="replay", result=agree|disagree}
Every canary on one registry (one per configured model) records into the same three metrics,
and into a `sentinel_reference_agreement_total` the shadow's updates already made there.
Before its first round the canary waits for the model server to say it is ready (the
protocol's readiness endpoint, polled with exponential backoff up to `ready_timeout_s`), so a
server that is still loading its model is not counted as canary errors.
Imports neither torch nor onnxruntime: safe to run beside the proxy (in a thread or a task).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from sentinel import metricnames as mn
from sentinel.protocols.names import CANARY_HEADER
from sentinel.replay.compare import Tally
from sentinel.replay.http import Target
from sentinel.replay.push import ReplayMetrics
from sentinel.replay.runner import LoadPlan, Outcome, Replayer, RunResult, Samples
from sentinel.replay.wire import WireFormat

log = logging.getLogger("sentinel.canary")

READY_BACKOFF_S = (0.1, 2.0)  # first and longest pause between readiness polls


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()

_METRICS_LOCK = threading.Lock()


def replay_metrics(registry: CollectorRegistry) -> ReplayMetrics:
    """The replay metrics on `registry`, shared: a collector already registered under one of the
    names (another model's canary, or the shadow's agreement counter made by an analysis update)
    is used as it is, the others are registered. A second `ReplayMetrics(registry)` would raise
    "Duplicated timeseries", and the sidecar would run a canary for its first model only."""
    with _METRICS_LOCK:
        fresh = ReplayMetrics(CollectorRegistry(auto_describe=True))
        have = registry._names_to_collectors  # what prometheus_client itself checks duplicates against
        for attr, spec in (("duration", mn.REPLAY_DURATION), ("requests", mn.REPLAY_REQUESTS),
                           ("agreement", mn.REFERENCE_AGREEMENT)):
            found = have.get(spec.name)
            if found is None:
                registry.register(getattr(fresh, attr))
                continue
            if tuple(getattr(found, "_labelnames", ())) != tuple(spec.labels):
                raise ValueError(f"{spec.name} is already registered with labels "
                                 f"{list(getattr(found, '_labelnames', ()))}, not {list(spec.labels)}")
            setattr(fresh, attr, found)
        return fresh


def readiness_path(protocol: str, model: str) -> str:
    """The model server's readiness endpoint for one model (OIP v2, KServe v1, TorchServe)."""
    if protocol == "v2":
        return f"/v2/models/{model}/ready"
    if protocol == "v1":
        return f"/v1/models/{model}"
    return "/ping"


def check_ready(target: Target, path: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """One readiness poll: (ready, why). A 404 means the server has no such endpoint: it answers, so ready."""
    cls = http.client.HTTPSConnection if target.tls else http.client.HTTPConnection
    conn = cls(target.host, target.port, timeout=timeout_s)
    try:
        conn.request("GET", target.prefix + path, headers={CANARY_HEADER: "1"})
        resp = conn.getresponse()
        resp.read(65536)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{target.authority}: {exc or type(exc).__name__}"
    finally:
        conn.close()
    if resp.status == 200:
        return True, f"{target.authority}{path}: ready"
    if resp.status == 404:
        return True, f"{target.authority}{path}: 404 (no readiness endpoint; the server answers)"
    return False, f"{target.authority}{path}: HTTP {resp.status}"


def wait_ready(target: Target, path: str, timeout_s: float, *,
               sleep: Callable[[float], bool] | None = None,
               report: Callable[[str], None] | None = None) -> tuple[bool, str]:
    """Poll readiness with exponential backoff until ready or `timeout_s` has passed.

    `sleep(seconds)` returns True to give up early (a stop event's `wait`); default time.sleep.
    `report(why)` hears each poll's answer (what /status shows while the first round waits).
    """
    deadline = time.monotonic() + timeout_s
    pause, longest = READY_BACKOFF_S
    while True:
        ok, why = check_ready(target, path, min(2.0, max(0.1, timeout_s)))
        if report is not None:
            report(why)
        left = deadline - time.monotonic()
        if ok or left <= 0:
            return ok, why
        step = min(pause, left)
        if sleep is None:
            time.sleep(step)
        elif sleep(step):
            return False, f"stopped while waiting ({why})"
        pause = min(pause * 2, longest)


@dataclass(frozen=True)
class CanaryRun:
    """Summary of one canary round."""

    sent: int
    errors: int
    agreed: int
    disagreed: int
    p99_s: float | None
    top1_disagreed: int = 0            # of `disagreed`: another class (not only scores out of tolerance)
    prob_max_abs: float | None = None  # largest |served - reference| probability in the round
    error_kinds: dict[str, int] = field(default_factory=dict)  # e.g. {"http_500": 3, "timeout": 1}
    error_example: str = ""            # the first error's message (what /status shows as why)


class Canary:
    """Periodic golden replay; `run_once` for one round, `start`/`stop` for a background thread."""

    def __init__(self, *, model: str, target: str, wire: WireFormat, samples: Samples,
                 registry: CollectorRegistry, interval_s: float = 300.0, count: int = 16, rate: float = 2.0,
                 timeout_s: float = 10.0, ready_path: str | None = None, ready_timeout_s: float = 120.0,
                 grpc_target: str | None = None):
        self.model = model
        self.target = Target.parse(target)  # HTTP endpoint: readiness, and the rounds unless gRPC
        self.ready_path = ready_path if ready_path is not None else readiness_path(wire.protocol, wire.model)
        self.ready_timeout_s = ready_timeout_s
        self.wire = wire
        self.samples = samples
        self.interval_s = interval_s
        self.plan = LoadPlan(rate=rate, count=count, connections=4, timeout_s=timeout_s)
        self.metrics = replay_metrics(registry)
        if getattr(wire, "protocol", None) == "grpc":   # replay.protocol: grpc
            from sentinel.replay.grpc_client import GrpcReplayer, GrpcTarget

            self._replayer: Replayer = GrpcReplayer(GrpcTarget.parse(grpc_target or target), wire, samples,  # type: ignore[arg-type]
                                                    headers={CANARY_HEADER: "1"}, observer=self._observe)
        else:
            self._replayer = Replayer(self.target, wire, samples, headers={CANARY_HEADER: "1"},
                                      observer=self._observe)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round_lock = threading.Lock()
        self._round: tuple[asyncio.AbstractEventLoop, asyncio.Task] | None = None   # the thread's round in flight
        self.last: CanaryRun | None = None
        self.waiting = "not started"   # before the first round: what the readiness polls say
        self._bodies: tuple[frozenset[int], frozenset[bytes]] | None = None   # for `sends`

    @classmethod
    def from_config(cls, config, model_name: str | None, registry: CollectorRegistry) -> Canary:
        """Build from a parsed `Config`: the model's endpoint and protocol, its golden set, replay settings."""
        from sentinel.golden import golden_for
        from sentinel.registry import Registry
        from sentinel.replay.session import select_samples

        mc = config.model(model_name)
        entry = Registry(config.resolve(config.registry), default_model=mc.name).resolve(f"{mc.name}:{mc.version}")
        golden = golden_for(entry, Path(config.resolve(config.golden_sets)))
        samples = select_samples(entry, golden)
        wire = WireFormat(mc.protocol, mc.path_name, classes=entry.manifest.classes)
        r = config.replay
        target = mc.endpoint
        if r.protocol == "grpc":
            from sentinel.replay.grpc_client import GrpcWire

            if config.grpc_upstream is None:
                raise ValueError("replay.protocol is grpc but grpc_upstream (the model server's gRPC host:port) "
                                 "is not set")
            wire, target = GrpcWire(mc.path_name, classes=entry.manifest.classes), config.grpc_upstream  # type: ignore[assignment]
        # The model label is the configured name, as on every other sentinel metric (rules match on it).
        # Readiness is polled on the model's HTTP endpoint even when the rounds go over gRPC.
        return cls(model=mc.name, target=mc.endpoint, wire=wire, samples=samples, registry=registry,
                   interval_s=r.canary_interval_s, count=r.canary_samples, rate=r.canary_rate,
                   ready_path=readiness_path(mc.protocol, mc.path_name),
                   ready_timeout_s=getattr(r, "canary_ready_timeout_s", 120.0),
                   grpc_target=target if r.protocol == "grpc" else None)

    def sends(self, body: bytes) -> bool:
        """Whether `body` is one of the request bodies this canary sends over HTTP (by length, then
        a blake2b-128 digest; both sets made on first use).

        The model server's payload logger (KServe's, posting to the sidecar's /ingest) reports
        canary requests as ordinary traffic; the sidecar drops the bodies its canary sent. gRPC
        canaries send none of these (the logger sees HTTP only)."""
        if self._bodies is None:
            bodies = [r.partition(b"\r\n\r\n")[2] for r in getattr(self._replayer, "_requests", ())]
            self._bodies = frozenset(len(b) for b in bodies), frozenset(_digest(b) for b in bodies)
        lengths, digests = self._bodies
        return len(body) in lengths and _digest(body) in digests   # the usual body: no hash at all

    def _observe(self, o: Outcome) -> None:
        agrees = None if o.comparison is None else o.comparison.agrees(self.samples.tolerance)
        self.metrics.observe(self.model, o, agrees)

    def _summarize(self, r: RunResult) -> CanaryRun:
        t = r.comparisons if isinstance(r.comparisons, Tally) else Tally.of(r.comparisons, self.samples.tolerance)
        p99 = r.corrected.value_at(99) if r.completed else None
        # the next round replays the next golden samples: over rounds every class is covered (the
        # first 16 digits hold no 4, 8 or 9, and a fault in one class showed in no round)
        self._replayer.offset = (self._replayer.offset + (self.plan.count or 0)) % len(self.samples)
        kinds = {k: int(n) for k, n in r.errors.most_common()}
        example = next((f"{k}: {r.error_examples[k]}" for k in kinds if k in r.error_examples), "")
        run = CanaryRun(r.sent, sum(r.errors.values()), t.agreed, t.answered - t.agreed, p99,
                        top1_disagreed=t.answered - t.top1_agreed,
                        prob_max_abs=None if t.prob_max_abs is None else float(f"{t.prob_max_abs:.6g}"),
                        error_kinds=kinds, error_example=example[:300])
        self.last = run
        if run.errors or run.disagreed:
            log.warning("canary %s: %d errors, %d of %d answers disagree with the reference "
                        "(%d on the top-1 class, max |Δp| %s) (%s)", self.model, run.errors, run.disagreed,
                        t.answered, run.top1_disagreed, run.prob_max_abs, example or kinds)
        return run

    def run_once(self) -> CanaryRun:
        """One round on a private event loop (blocking)."""
        return self._summarize(self._replayer.run(self.plan))

    async def run_once_async(self) -> CanaryRun:
        """One round on the caller's event loop."""
        return self._summarize(await self._replayer.run_async(self.plan))

    def _waiting_for(self, why: str) -> None:
        self.waiting = f"waiting for the model server to be ready: {why}"

    def status(self) -> dict | str:
        """What /status shows: the last round, or why there has been none yet."""
        if self.last is not None:
            return vars(self.last)
        return f"first round pending ({self.waiting})"

    def _log_readiness(self, ok: bool, why: str) -> None:
        self.waiting = "model server ready; the first round is running" if ok else \
            f"model server not ready after {self.ready_timeout_s:.0f} s ({why}); the first round is running"
        if ok:
            log.info("canary %s: model server ready (%s)", self.model, why)
        else:
            log.warning("canary %s: model server not ready after %.0f s (%s); starting rounds anyway",
                        self.model, self.ready_timeout_s, why)

    async def run_forever_async(self) -> None:
        """Rounds every interval until cancelled (for an asyncio task); waits for readiness first."""
        loop = asyncio.get_running_loop()
        ok, why = await loop.run_in_executor(None, wait_ready, self.target, self.ready_path, self.ready_timeout_s)
        self._log_readiness(ok, why)
        while True:
            try:
                await self.run_once_async()
            except Exception:  # noqa: BLE001 - a failed round is logged; the next one runs
                log.exception("canary round for %s failed", self.model)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Run rounds every interval in a daemon thread (the first once the model server is ready)."""
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sentinel-canary", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; a round in flight is cancelled (its connections closed), not waited for:
        against a slow or stalled model server a round lasts up to count/rate + timeout seconds,
        and the sidecar stops its canaries one after the other on its event loop."""
        self._stop.set()
        with self._round_lock:
            if self._round is not None:
                loop, task = self._round
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:   # the loop has just closed: the round is over
                    pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        ok, why = wait_ready(self.target, self.ready_path, self.ready_timeout_s, sleep=self._stop.wait,
                             report=self._waiting_for)
        if self._stop.is_set():
            return
        self._log_readiness(ok, why)
        while not self._stop.is_set():
            try:
                self._run_stoppable_round()
            except Exception:  # noqa: BLE001 - a failed round is logged; the next one runs
                log.exception("canary round for %s failed", self.model)
            self._stop.wait(self.interval_s)

    def _run_stoppable_round(self) -> CanaryRun | None:
        """One round on a private event loop that `stop()` can cancel (None when it did)."""
        from sentinel.replay.runner import _cancel_all

        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(self._replayer.run_async(self.plan))
            with self._round_lock:
                self._round = (loop, task)
            if self._stop.is_set():   # stop() came before the round was registered
                task.cancel()
            try:
                result = loop.run_until_complete(task)
            except asyncio.CancelledError:
                log.info("canary %s: stopped during a round", self.model)
                return None
            return self._summarize(result)
        finally:
            with self._round_lock:
                self._round = None
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
