"""Recording replay outcomes as Prometheus metrics (canary registry, or a Pushgateway push)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from sentinel import metricnames as mn
from sentinel.replay.runner import Outcome


class ReplayMetrics:
    """sentinel_replay_duration_seconds, sentinel_replay_requests_total and
    sentinel_reference_agreement_total{source="replay"} on a given registry."""

    def __init__(self, registry: CollectorRegistry, buckets: tuple[float, ...] = mn.DEFAULT_LATENCY_BUCKETS):
        self.duration = Histogram(mn.REPLAY_DURATION.name, mn.REPLAY_DURATION.help,
                                  list(mn.REPLAY_DURATION.labels), registry=registry, buckets=buckets)
        self.requests = Counter(mn.REPLAY_REQUESTS.name, mn.REPLAY_REQUESTS.help,
                                list(mn.REPLAY_REQUESTS.labels), registry=registry)
        self.agreement = Counter(mn.REFERENCE_AGREEMENT.name, mn.REFERENCE_AGREEMENT.help,
                                 list(mn.REFERENCE_AGREEMENT.labels), registry=registry)

    def observe(self, model: str, outcome: Outcome, agrees: bool | None) -> None:
        """Record one finished replay request; `agrees` is None when it failed."""
        self.duration.labels(model=model).observe(outcome.latency_s)
        self.requests.labels(model=model, result="error" if outcome.error else "ok").inc()
        if agrees is not None:
            self.agreement.labels(model=model, source="replay", result="agree" if agrees else "disagree").inc()


def push(gateway: str, registry: CollectorRegistry, model: str, timeout: float = 5.0) -> None:
    """Push a run's metrics to a Pushgateway under job="sentinel_replay", grouped by model."""
    from prometheus_client import push_to_gateway

    from sentinel.errors import InfrastructureError

    try:
        push_to_gateway(gateway, job="sentinel_replay", registry=registry, grouping_key={"model": model},
                        timeout=timeout)
    except OSError as exc:  # urllib raises URLError (an OSError) for refused and failed pushes
        raise InfrastructureError(f"push to {gateway} failed: {exc}") from None
