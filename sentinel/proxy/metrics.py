"""The daemon's Prometheus registry: hot-path request metrics and metrics sent by analysis."""

from __future__ import annotations

import bisect
import functools
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.samples import Exemplar
from prometheus_client.values import MutexValue

from sentinel import __version__
from sentinel import metricnames as mn

log = logging.getLogger(__name__)
# Exemplar((labels, value, timestamp)) without the namedtuple's Python __new__ (once per request)
_exemplar = functools.partial(tuple.__new__, Exemplar)

# The codes whose request counters exist from the start (zero_codes): the
# availability SLI's 5xx the model server and the proxy give most, and a cut response.
ZERO_CODES = ("200", "500", "502", "503", "504", "incomplete")
NO_MODEL = "none"        # label of requests to non-inference paths
OVERFLOW_MODEL = "other"  # label of models beyond the cardinality cap


class _RequestChildren:
    """The duration-histogram and request-counter children of one (model, protocol, code), bound once.

    `observe` does what `Histogram.observe` + `Counter.inc` do, without per-call label
    lookups, exemplar validation (a trace id is 32 hex characters, always valid) or a
    linear bucket scan. It writes the values directly when they are prometheus_client's
    in-process `MutexValue`s (the proxy's loop is their only writer; /metrics reads them
    from another thread, and a float store is atomic under the GIL); otherwise it falls
    back to the public API.
    """

    __slots__ = ("hist", "counter", "bounds", "buckets", "sum", "count", "fast")

    def __init__(self, hist: Any, counter: Any):
        self.hist = hist
        self.counter = counter
        self.bounds = list(hist._upper_bounds)
        self.buckets = list(hist._buckets)
        self.sum = hist._sum
        self.count = counter._value
        self.fast = all(type(v) is MutexValue for v in (*self.buckets, self.sum, self.count))

    def observe(self, seconds: float, trace_id: str | None) -> None:
        if not self.fast:
            self.hist.observe(seconds, {"trace_id": trace_id} if trace_id else None)
            self.counter.inc()
            return
        b = self.buckets[bisect.bisect_left(self.bounds, seconds)]
        b._value += 1.0
        if trace_id:
            b._exemplar = Exemplar({"trace_id": trace_id}, seconds, time.time())
        self.sum._value += seconds
        self.count._value += 1.0


def _make(spec: mn.MetricSpec, registry: CollectorRegistry, buckets: tuple[float, ...] | None = None) -> Any:
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "histogram":
        if buckets is None:
            buckets = (mn.confidence_buckets() if spec.unit == "ratio" else mn.latency_buckets())
        return Histogram(spec.name, spec.help, spec.labels, buckets=buckets, registry=registry)
    return Info(spec.name, spec.help, registry=registry)  # the spec's labels are the info's keys


class ProxyMetrics:
    """Owns the registry; cheap `observe_request` for the hot path, `apply` for analysis updates."""

    def __init__(self, known_models: dict[str, str], max_model_labels: int,
                 latency_thresholds: tuple[float, ...] = (), versions: dict[str, str] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.buckets = mn.latency_buckets(latency_thresholds)
        self.duration = Histogram(mn.REQUEST_DURATION.name, mn.REQUEST_DURATION.help,
                                  mn.REQUEST_DURATION.labels, buckets=self.buckets, registry=r)
        self.requests = _make(mn.REQUESTS, r)
        self.proxy_errors = _make(mn.PROXY_ERRORS, r)
        self.overflow = _make(mn.UNMATCHED_PATHS, r)
        self.inflight = _make(mn.INFLIGHT, r)
        self.samples = _make(mn.SAMPLES, r)
        self.queue_depth = _make(mn.SAMPLE_QUEUE_DEPTH, r)
        self.queue_capacity = _make(mn.SAMPLE_QUEUE_CAPACITY, r)
        self.analysis_errors = _make(mn.ANALYSIS_ERRORS, r)
        self.restarts = _make(mn.ANALYSIS_RESTARTS, r)
        self.ingest_events = _make(mn.INGEST_EVENTS, r)
        _make(mn.BUILD_INFO, r).info({"version": __version__})
        model_info = getattr(mn, "MODEL_INFO", None)
        if model_info is not None and versions:
            info = Info(model_info.name, model_info.help, ("model",), registry=r)
            for model, version in versions.items():
                info.labels(model).info({"version": version})
        self._by_name: dict[str, Any] = {}   # analysis metrics, created on first update
        self._children: dict[tuple[str, str, str], _RequestChildren] = {}
        self._known = dict(known_models)      # path name → configured model name
        self._labels: dict[str, str] = {}     # path name → label actually used
        self._max_labels = max_model_labels
        self.pending_buckets: dict[str, tuple[float, ...]] = {}
        self.inflight_count = 0
        self.remote_inflight: Any = None   # multi-process mode: the other workers' in-flight count
        self.inflight.set_function(
            lambda: self.inflight_count + (self.remote_inflight() if self.remote_inflight else 0))

    def zero_codes(self, model: str, protocols: tuple[str, ...]) -> None:
        """Create `model`'s request counters of the common codes at 0 (`ZERO_CODES`).

        A series Prometheus first scrapes already holding N loses those N: `rate()` and
        `increase()` count from a series' first sample. The sidecar made each code's series at
        its first event, so the first burst of 503s of every sidecar's life was missing from
        the availability SLI, the burn-rate alerts and the controller templates (a burst between
        two scrapes: all of it), and the first scrape's successes from every request count
        (a dashboard's inferences in the range read 523 of 547). Codes outside this list (a 404,
        a 501) still begin at their first event.
        """
        for protocol in protocols:
            for code in ZERO_CODES:
                self.requests.labels(model, protocol, code)

    # --- hot path -------------------------------------------------------------------
    def model_label(self, path_model: str) -> str:
        """The model label for a path's model name, folding unknown names past the cap into `other`."""
        label = self._labels.get(path_model)
        if label is not None:
            return label
        label = self._known.get(path_model)
        if label is None:
            unknown = sum(1 for k in self._labels if k not in self._known)
            if unknown >= self._max_labels:
                self.overflow.inc()
                return OVERFLOW_MODEL
            label = path_model[:64]
        self._labels[path_model] = label
        return label

    def models_seen(self) -> list[str]:
        """Model labels requests have been counted under."""
        return sorted(set(self._labels.values()))

    def observe_request(self, model: str, protocol: str, code: str, seconds: float, trace_id: str | None) -> None:
        key = (model, protocol, code)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _RequestChildren(
                self.duration.labels(model, protocol, code), self.requests.labels(model, protocol, code))
        if not children.fast:
            children.observe(seconds, trace_id)
            return
        # _RequestChildren.observe's fast path, inline (once per request)
        b = children.buckets[bisect.bisect_left(children.bounds, seconds)]
        b._value += 1.0
        if trace_id:
            b._exemplar = _exemplar(({"trace_id": trace_id}, seconds, time.time()))
        children.sum._value += seconds
        children.count._value += 1.0

    def merge_requests(self, key: tuple[str, str, str], count: float, total: float,
                       buckets: tuple[float, ...], exemplars: tuple[tuple[int, Any], ...] = ()) -> None:
        """Add another proxy worker's requests (count, sum, per-bucket counts) under `key` (multiproc.py),
        with its newest exemplars as (bucket index, Exemplar)."""
        children = self._children.get(key)
        if children is None:
            model, protocol, code = key
            children = self._children[key] = _RequestChildren(
                self.duration.labels(model, protocol, code), self.requests.labels(model, protocol, code))
        for b, n in zip(children.buckets, buckets, strict=True):
            if n:
                b.inc(n)
        children.sum.inc(total)
        children.count.inc(count)
        if children.fast:
            for i, exemplar in exemplars:
                children.buckets[i]._exemplar = exemplar

    # --- analysis updates -----------------------------------------------------------
    def apply(self, metric: str, labels: dict[str, str], op: str, value: float) -> None:
        """Apply one MetricUpdate (as a plain tuple); raises ValueError on a bad update."""
        m = self._by_name.get(metric)
        if m is None:
            spec = next((s for s in mn.METRICS if s.name == metric), None)
            if spec is None:
                raise ValueError(f"unknown metric {metric!r} (not in sentinel.metricnames)")
            if spec.kind == "info":
                raise ValueError(f"metric {metric!r} is an info metric; analysis cannot update it")
            existing = self.registry._names_to_collectors.get(spec.name) or \
                self.registry._names_to_collectors.get(spec.name + "_total")
            m = existing if existing is not None else _make(spec, self.registry, self.pending_buckets.get(metric))
            self._by_name[metric] = m
        if set(labels) != set(m._labelnames):
            raise ValueError(f"metric {metric!r} takes labels {list(m._labelnames)}, got {sorted(labels)}")
        child = m.labels(**labels) if labels else m
        if op == "inc":
            child.inc(value)
        elif op == "set":
            child.set(value)
        elif op == "observe":
            child.observe(value)
        else:
            raise ValueError(f"unknown op {op!r} for metric {metric!r}")

    def add_collector(self, collector: Any) -> None:
        """Register another collector (an object with `collect()`), e.g. the GPU collector."""
        self.registry.register(collector)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """Scrape body and content type; OpenMetrics (with exemplars) when the scraper asks for it."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


