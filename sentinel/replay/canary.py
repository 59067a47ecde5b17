"""The daemon's canary: every N seconds, replay M golden samples at a low rate to the model server.

Requests carry `X-Sentinel-Canary: 1` so the proxy leaves them out of traffic SLIs and
drift windows. Results feed, on the registry passed in:
    sentinel_replay_duration_seconds{model}            (latency from the intended send time)
    sentinel_replay_requests_total{model, result=ok|error}
    sentinel_reference_agreement_total{model, source="replay", result=agree|disagree}
Imports neither torch nor onnxruntime: safe to run beside the proxy (in a thread or a task).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from sentinel.protocols.names import CANARY_HEADER
from sentinel.replay.http import Target
from sentinel.replay.push import ReplayMetrics
from sentinel.replay.runner import LoadPlan, Outcome, Replayer, RunResult, Samples
from sentinel.replay.wire import WireFormat

log = logging.getLogger("sentinel.canary")



@dataclass(frozen=True)
class CanaryRun:
    """Summary of one canary round."""

    sent: int
    errors: int
    agreed: int
    disagreed: int
    p99_s: float | None


class Canary:
    """Periodic golden replay; `run_once` for one round, `start`/`stop` for a background thread."""

    def __init__(self, *, model: str, target: str, wire: WireFormat, samples: Samples,
                 registry: CollectorRegistry, interval_s: float = 300.0, count: int = 16, rate: float = 2.0,
                 timeout_s: float = 10.0):
        self.model = model
        self.wire = wire
        self.samples = samples
        self.interval_s = interval_s
        self.plan = LoadPlan(rate=rate, count=count, connections=4, timeout_s=timeout_s)
        self.metrics = ReplayMetrics(registry)
        if getattr(wire, "protocol", None) == "grpc":   # replay.protocol: grpc
            from sentinel.replay.grpc_client import GrpcReplayer, GrpcTarget

            self._replayer: Replayer = GrpcReplayer(GrpcTarget.parse(target), wire, samples,  # type: ignore[arg-type]
                                                    headers={CANARY_HEADER: "1"}, observer=self._observe)
        else:
            self._replayer = Replayer(Target.parse(target), wire, samples, headers={CANARY_HEADER: "1"},
                                      observer=self._observe)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: CanaryRun | None = None

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
        return cls(model=mc.name, target=target, wire=wire, samples=samples, registry=registry,
                   interval_s=r.canary_interval_s, count=r.canary_samples, rate=r.canary_rate)

    def _observe(self, o: Outcome) -> None:
        agrees = None if o.comparison is None else o.comparison.agrees(self.samples.tolerance)
        self.metrics.observe(self.model, o, agrees)

    def _summarize(self, r: RunResult) -> CanaryRun:
        agreed = sum(1 for c in r.comparisons if c.agrees(self.samples.tolerance))
        p99 = r.corrected.value_at(99) if r.completed else None
        run = CanaryRun(r.sent, sum(r.errors.values()), agreed, len(r.comparisons) - agreed, p99)
        self.last = run
        if run.errors or run.disagreed:
            log.warning("canary %s: %d errors, %d of %d answers disagree with the reference (%s)",
                        self.model, run.errors, run.disagreed, len(r.comparisons), dict(r.errors))
        return run

    def run_once(self) -> CanaryRun:
        """One round on a private event loop (blocking)."""
        return self._summarize(self._replayer.run(self.plan))

    async def run_once_async(self) -> CanaryRun:
        """One round on the caller's event loop."""
        return self._summarize(await self._replayer.run_async(self.plan))

    async def run_forever_async(self) -> None:
        """Rounds every interval until cancelled (for an asyncio task)."""
        while True:
            try:
                await self.run_once_async()
            except Exception:  # noqa: BLE001 - a failed round is logged; the next one runs
                log.exception("canary round for %s failed", self.model)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Run rounds every interval in a daemon thread (first round right away)."""
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sentinel-canary", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a failed round is logged; the next one runs
                log.exception("canary round for %s failed", self.model)
            self._stop.wait(self.interval_s)
