"""Reading the sidecar's own /metrics into numbers the demo shows and reports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from sentinel import metricnames as mn

Key = tuple[str, frozenset]


@dataclass(frozen=True)
class Snapshot:
    """Every sample of one scrape, by (sample name, labels)."""

    t: float
    samples: dict[Key, float] = field(default_factory=dict)

    def total(self, name: str, **match: str) -> float:
        """Sum of the samples named `name` whose labels include `match`."""
        want = set(match.items())
        return sum(v for (n, labels), v in self.samples.items() if n == name and want <= labels)

    def values(self, name: str, label: str, **match: str) -> dict[str, float]:
        """Samples named `name` by the value of one label."""
        want = set(match.items())
        out: dict[str, float] = {}
        for (n, labels), v in self.samples.items():
            if n == name and want <= labels:
                d = dict(labels)
                if label in d:
                    out[d[label]] = out.get(d[label], 0.0) + v
        return out


def parse(text: str, t: float) -> Snapshot:
    samples: dict[Key, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return Snapshot(t, samples)


def quantile(q: float, buckets: dict[float, float]) -> float:
    """histogram_quantile over cumulative bucket counts {upper bound: count}, like PromQL's."""
    bounds = sorted(buckets)
    if not bounds:
        return math.nan
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    prev_b, prev_c = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_b
            if c == prev_c:
                return b
            return prev_b + (b - prev_b) * (rank - prev_c) / (c - prev_c)
        prev_b, prev_c = b, c
    return bounds[-1]


def latency_buckets(a: Snapshot, b: Snapshot, model: str) -> dict[float, float]:
    """Per-bucket request counts between two snapshots (all codes)."""
    name = mn.REQUEST_DURATION.name + "_bucket"
    now = b.values(name, "le", model=model)
    before = a.values(name, "le", model=model)
    return {float(le): now[le] - before.get(le, 0.0) for le in now}


@dataclass(frozen=True)
class Window:
    """What happened between two scrapes."""

    t: float
    rps: float
    p50_ms: float
    p99_ms: float
    error_ratio: float
    slow_ratio: float            # share of requests slower than the latency SLO threshold
    p_values: dict[str, float]
    alarms: dict[str, float]
    estimated_accuracy: dict[str, float]
    shadow_agreement: float
    canary_agreement: float
    samples: dict[str, float]
    estimate_reliable: float = math.nan   # sentinel_accuracy_estimate_reliable (1/0; NaN: not yet published)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def window(a: Snapshot, b: Snapshot, model: str, threshold_s: float) -> Window:
    dt = max(b.t - a.t, 1e-9)
    req = mn.REQUESTS.sample_name
    n = b.total(req, model=model) - a.total(req, model=model)
    errs = sum(b.total(req, model=model, code=c) - a.total(req, model=model, code=c)
               for c in {dict(k[1]).get("code", "") for k in b.samples if k[0] == req}
               if c.startswith("5") or c == mn.CODE_INCOMPLETE)   # as the availability SLI counts them
    buckets = latency_buckets(a, b, model)
    slow = math.nan
    if buckets:
        at = min((le for le in buckets if le >= threshold_s - 1e-12), default=None)
        total = buckets.get(math.inf, max(buckets.values()))
        if at is not None and total > 0:
            slow = 1.0 - buckets[at] / total
    agree = mn.REFERENCE_AGREEMENT.sample_name

    def agreement(source: str) -> float:
        ok = b.total(agree, model=model, source=source, result="agree")
        bad = b.total(agree, model=model, source=source, result="disagree")
        return _ratio(ok, ok + bad)

    return Window(
        t=b.t,
        rps=n / dt,
        p50_ms=quantile(0.5, buckets) * 1000,
        p99_ms=quantile(0.99, buckets) * 1000,
        error_ratio=_ratio(errs, n),
        slow_ratio=slow,
        p_values=b.values(mn.DRIFT_P_VALUE.name, "detector", model=model),
        alarms=b.values(mn.DRIFT_ALARM.name, "detector", model=model),
        estimated_accuracy=b.values(mn.ESTIMATED_ACCURACY.name, "method", model=model),
        shadow_agreement=agreement("shadow"),
        canary_agreement=agreement("replay"),
        samples=b.values(mn.SAMPLES.sample_name, "outcome", model=model),
        estimate_reliable=b.values(mn.ACCURACY_ESTIMATE_RELIABLE.name, "model").get(model, math.nan),
    )
