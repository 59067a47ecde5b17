"""OpenSLO v1 ratio SLOs over sentinel's metrics load as the same SLOs as slo.yaml."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sentinel.errors import ConfigError
from sentinel.slo.rules import generate_rule_files
from sentinel.slo.spec import load_slo_file

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_openslo_ratio_slos_match_the_native_ones():
    opens = load_slo_file(HERE / "data" / "openslo.yaml")
    native = load_slo_file(REPO / "slo.yaml")
    assert opens.period == "30d"
    assert opens.slos == native.slos[:3]  # the three ratio SLIs; estimated accuracy is a gauge
    native_ratio = dataclasses.replace(native, slos=native.slos[:3])
    assert [f.as_dict() for f in generate_rule_files(opens)] == \
        [f.as_dict() for f in generate_rule_files(native_ratio)]


def _load(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "openslo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_slo_file(path)
    return [p.replace(str(path), "openslo.yaml") for p in info.value.problems]


def test_foreign_queries_are_refused_naming_the_field(tmp_path):
    text = (HERE / "data" / "openslo.yaml").read_text().replace("sentinel_reference_agreement_total",
                                                                 "http_requests_total")
    probs = _load(tmp_path, text)
    assert len(probs) == 1
    assert probs[0].startswith("openslo.yaml: documents[3].spec.indicator.spec.ratioMetric: only ratio SLIs over "
                               "sentinel's metrics are understood")


def test_timeslices_and_mixed_periods_are_refused(tmp_path):
    text = (HERE / "data" / "openslo.yaml").read_text()
    text = text.replace("  service: digits\n  budgetingMethod: Occurrences\n  timeWindow:\n    - duration: 30d",
                        "  service: digits\n  budgetingMethod: Timeslices\n  timeWindow:\n    - duration: 7d", 1)
    assert _load(tmp_path, text) == [
        "openslo.yaml: documents[0].spec.budgetingMethod: only Occurrences is supported, got 'Timeslices'",
        "openslo.yaml: timeWindow: every SLO must use the same period, got 30d, 7d",
    ]
