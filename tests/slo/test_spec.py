"""The SLO file model: the committed example loads, and every mistake names its file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.errors import ConfigError
from sentinel.slo.durations import format_duration, parse_duration
from sentinel.slo.spec import DEFAULT_MIN_SAMPLES, load_slo_file

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_committed_example_has_the_four_slos_of_the_issue():
    spec = load_slo_file(REPO / "slo.yaml")
    assert spec.period == "30d"
    assert [(s.name, s.model, s.objective, s.sli, s.threshold) for s in spec.slos] == [
        ("availability", "digits", 0.999, "availability", None),
        ("latency", "digits", 0.99, "latency", 0.15),
        ("agreement", "digits", 0.995, "agreement", None),
        ("accuracy", "digits", 0.97, "estimated_accuracy", None),
    ]
    assert [s.budget for s in spec.slos] == [0.001, 0.01, 0.005, 0.03]
    assert [s.min_samples for s in spec.slos] == [None, None, None, 100]
    assert spec.slos[3].sample_floor == 100


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "slo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_slo_file(path)
    return [p.replace(str(path), "slo.yaml") for p in info.value.problems]


def test_latency_without_threshold(tmp_path):
    assert _problems(tmp_path, "slos: [{name: l, model: m, objective: 0.99, sli: latency}]\n") == [
        "slo.yaml: slos[0].threshold: required for a latency SLI (seconds, e.g. 0.15)"]


def test_threshold_on_a_ratio_sli(tmp_path):
    assert _problems(tmp_path, "slos: [{name: a, model: m, objective: 0.99, sli: availability, threshold: 1}]\n") == [
        "slo.yaml: slos[0].threshold: only latency SLIs take a threshold, this one is 'availability'"]


def test_objective_out_of_range_and_unknown_sli(tmp_path):
    probs = _problems(tmp_path, "slos:\n  - {name: a, model: m, objective: 99.9, sli: availability}\n"
                                "  - {name: b, model: m, objective: 0.9, sli: uptime}\n")
    assert probs == [
        "slo.yaml: slos[0].objective: must be a ratio strictly between 0 and 1 (0.999 is 99.9%), got 99.9",
        "slo.yaml: slos[1].sli: must be one of 'availability', 'latency', 'agreement', 'estimated_accuracy', "
        "got 'uptime'",
    ]


def test_a_quoted_number_is_one_problem_not_a_traceback(tmp_path):
    # validate() compared the string with 0.0 and raised TypeError out of the loader
    probs = _problems(tmp_path, "slos:\n  - {name: a, model: m, objective: '0.999', sli: availability}\n"
                                "  - {name: l, model: m, objective: 0.99, sli: latency, threshold: '150ms'}\n"
                                "gate: {latency_tolerance: '1.25', alpha: .nan}\n")
    assert probs == [
        "slo.yaml: slos[0].objective: expected a number, got '0.999'",
        "slo.yaml: slos[1].threshold: expected a number, got '150ms'",
        "slo.yaml: gate.latency_tolerance: expected a number, got '1.25'",
        "slo.yaml: gate.alpha: must be between 0 and 1, got nan",
    ]


def test_latency_min_diff_in_milliseconds_by_mistake_is_refused(tmp_path):
    probs = _problems(tmp_path, "slos: [{name: a, model: m, objective: 0.99, sli: availability}]\n"
                                "gate: {latency_min_diff_s: 10}\n")
    assert probs == ["slo.yaml: gate.latency_min_diff_s: is in seconds (0.01 is 10 ms) and at most 5, got 10.0"]


@pytest.mark.parametrize("url, problem", [
    ("https://wiki.example.com/runbooks#sentinel", "must have no #fragment"),   # became ...#sentinel#sentinelerrorbudgetburn
    ("https://wiki.example.com/{{ $labels.model }}", "must be a plain URL"),    # expanded by Prometheus' templating
    ("https://wiki.example.com/run books", "must be a plain URL"),
])
def test_runbook_url_the_alerts_can_link_to(tmp_path, url, problem):
    probs = _problems(tmp_path, f"runbook_url: '{url}'\nslos: [{{name: a, model: m, objective: 0.99, sli: availability}}]\n")
    assert len(probs) == 1 and probs[0].startswith("slo.yaml: runbook_url: " + problem), probs


def test_unknown_field_suggests_the_right_one(tmp_path):
    probs = _problems(tmp_path, "perod: 7d\nslos: [{name: a, model: m, objective: 0.99, sli: availability}]\n")
    assert len(probs) == 1 and probs[0].startswith("slo.yaml: perod: unknown field (did you mean 'period'?)")


def test_bad_period_and_duplicate_slo(tmp_path):
    probs = _problems(tmp_path, "period: 30 days\nslos:\n"
                                "  - {name: a, model: m, objective: 0.99, sli: availability}\n"
                                "  - {name: a, model: m, objective: 0.9, sli: availability}\n")
    assert probs == [
        "slo.yaml: period: expected a duration such as 30d, 6h or 90s, got '30 days'",
        "slo.yaml: slos[1].name: duplicate SLO 'a' for model 'm'",
    ]


def test_period_too_short_for_the_scrape_interval(tmp_path):
    probs = _problems(tmp_path, "period: 1d\nscrape_interval: 1m\n"
                                "slos: [{name: a, model: m, objective: 0.99, sli: availability}]\n")
    assert probs == ["slo.yaml: period: 1d is too short for a 1m scrape interval: the fastest page window "
                     "(period/720) must span at least 4 scrapes, so the period must be at least 2880 scrape "
                     "intervals"]


@pytest.mark.parametrize("text,seconds", [("30d", 2592000), ("4m40s", 280), ("1h30m", 5400), ("90s", 90),
                                          ("1w", 604800)])
def test_durations_parse_and_format(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "30", "1.5h", "5ms", "0s", "h1", "1h 30m"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_min_samples_defaults_to_100_for_an_accuracy_slo(tmp_path):
    path = tmp_path / "slo.yaml"
    path.write_text("slos: [{name: acc, model: m, objective: 0.97, sli: estimated_accuracy}]\n")
    assert load_slo_file(path).slos[0].sample_floor == DEFAULT_MIN_SAMPLES == 100


@pytest.mark.parametrize("value,message", [
    ("0", "must be a whole number of samples from 1 to 1000000 (default 100), got 0"),
    ("-5", "must be a whole number of samples from 1 to 1000000 (default 100), got -5"),
    ("2000000", "must be a whole number of samples from 1 to 1000000 (default 100), got 2000000"),
])
def test_min_samples_out_of_range(tmp_path, value, message):
    assert _problems(tmp_path, f"slos: [{{name: acc, model: m, objective: 0.97, sli: estimated_accuracy, "
                               f"min_samples: {value}}}]\n") == [f"slo.yaml: slos[0].min_samples: {message}"]


@pytest.mark.parametrize("value", ["2.5", "lots", "true"])
def test_min_samples_must_be_an_integer(tmp_path, value):
    probs = _problems(tmp_path, f"slos: [{{name: acc, model: m, objective: 0.97, sli: estimated_accuracy, "
                                f"min_samples: {value}}}]\n")
    assert len(probs) == 1 and probs[0].startswith("slo.yaml: slos[0].min_samples: "), probs


def test_min_samples_on_another_sli(tmp_path):
    assert _problems(tmp_path, "slos: [{name: a, model: m, objective: 0.99, sli: availability, min_samples: 50}]\n") == [
        "slo.yaml: slos[0].min_samples: only estimated_accuracy SLIs take min_samples, this one is 'availability'"]


def test_latency_threshold_in_milliseconds_is_refused(tmp_path):
    # `threshold: 150` meant 150 ms; read as seconds it is an SLO no request could ever miss.
    assert _problems(tmp_path, "slos: [{name: l, model: m, objective: 0.99, sli: latency, threshold: 150}]\n") == [
        "slo.yaml: slos[0].threshold: is in seconds and must be at most 60, got 150 (150 ms would be 0.15)"]
    (tmp_path / "ok.yaml").write_text("slos: [{name: l, model: m, objective: 0.99, sli: latency, threshold: 60}]\n")
    assert load_slo_file(tmp_path / "ok.yaml").slos[0].threshold == 60
