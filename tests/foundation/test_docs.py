"""The README's metric reference is generated from sentinel.metricnames and cannot go stale."""

from __future__ import annotations

from testpaths import REPO

from sentinel import metricnames as mn
from sentinel.docs import BEGIN, END, metric_reference


def test_readme_metric_reference_is_current():
    text = (REPO / "README.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == metric_reference(), "README metric reference is stale: run `python -m sentinel.docs`"


def test_metric_names_are_unique_and_prefixed():
    names = [m.name for m in mn.METRICS]
    assert len(names) == len(set(names))
    assert all(n.startswith("sentinel_") for n in names)
    for m in mn.METRICS:
        if m.kind == "counter":
            assert not m.name.endswith("_total"), m.name  # prometheus_client adds it
        if m.unit == "seconds":
            assert m.name.endswith("_seconds"), m.name
        if m.unit == "bytes":
            assert m.name.endswith("_bytes"), m.name


def test_latency_buckets_include_slo_thresholds():
    b = mn.latency_buckets([0.15, 0.123])
    assert 0.123 in b and 0.15 in b and list(b) == sorted(b)
