"""The demo's pure parts on literal timelines: attribution of detections, option checks, JSON, report."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from testpaths import REPO

from sentinel.demo.observe import Window
from sentinel.demo.phases import Phase, phases_from_options
from sentinel.demo.summary import alert_rows, attribute, drift_alarm_phases, onsets, phase_index
from sentinel.errors import UsageError

pytestmark = pytest.mark.unit

SLO = {"threshold": 0.15, "availability": 0.999, "latency": 0.99, "agreement": 0.995, "accuracy": 0.97}
PHASES = (
    Phase("normal", 10),
    Phase("drift: noise", 10, shift="noise", incident="drift"),
    Phase("drift: rotation", 10, shift="rotation", incident="drift"),
    Phase("latency incident", 10, delay_ms=250, incident="latency"),
    Phase("recovery", 10),
)
STARTS = [0.0, 10.0, 20.0, 30.0, 40.0]


def win(t: float, *, alarm: bool = False, atc: float = 0.99, p99_ms: float = 40.0, error_ratio: float = 0.0) -> Window:
    return Window(t=t, rps=20.0, p50_ms=15.0, p99_ms=p99_ms, error_ratio=error_ratio, slow_ratio=0.0,
                  p_values={"combined": 1e-9 if alarm else 0.5, "bbsd": 1e-9 if alarm else 0.5},
                  alarms={"combined": float(alarm), "bbsd": float(alarm)},
                  estimated_accuracy={"atc": atc}, shadow_agreement=1.0, canary_agreement=1.0, samples={})


def timeline(alarm_from: float, alarm_to: float, p99_from: float = 32.0) -> list[Window]:
    return [win(t, alarm=alarm_from <= t < alarm_to, p99_ms=300.0 if p99_from <= t < 40 else 40.0)
            for t in range(2, 50, 2)]


def test_onsets_are_quiet_to_raised_transitions():
    ws = [win(2), win(4, alarm=True), win(6, alarm=True), win(8), win(10, alarm=True)]
    assert [o.t for o in onsets(ws, "alarm", lambda w: "x" if w.alarms["combined"] else None)] == [4, 10]
    assert [o.t for o in onsets([win(2, alarm=True)], "alarm", lambda w: "x" if w.alarms["combined"] else None)] == [2]


def test_phase_index_puts_a_boundary_time_in_the_earlier_phase():
    assert [phase_index(t, STARTS) for t in (0, 5, 10, 10.5, 29.9, 45)] == [0, 0, 0, 1, 2, 4]


def test_an_alarm_running_on_from_the_noise_phase_is_not_credited_to_rotation():
    dets = {d.phase: d for d in attribute(PHASES, STARTS, timeline(14, 34), SLO, 0.99)}
    assert dets["drift: noise"].detected_s == pytest.approx(4.0)
    assert "drift alarm" in dets["drift: noise"].signal
    rot = dets["drift: rotation"]
    assert rot.detected_s is None
    assert rot.signal.startswith("drift alarm already raised since 14.0 s (in 'drift: noise')")
    assert dets["latency incident"].detected_s == pytest.approx(2.0)


def test_an_alarm_that_clears_and_begins_again_in_rotation_is_credited_to_rotation():
    ws = [w if not 18 <= w.t <= 20 else win(w.t) for w in timeline(14, 30)]
    dets = {d.phase: d for d in attribute(PHASES, STARTS, ws, SLO, 0.99)}
    assert dets["drift: rotation"].detected_s == pytest.approx(2.0)


def test_phase_rows_say_yes_only_where_an_alarm_began():
    # begins in noise, spills into latency and ends there: only noise gets "yes"
    assert drift_alarm_phases(PHASES, STARTS, timeline(14, 36)) == {1}
    # a false alarm in the normal phase is reported, honestly, as the normal phase's
    assert drift_alarm_phases(PHASES, STARTS, timeline(4, 8)) == {0}


def test_accuracy_drop_and_not_detected():
    ws = [win(t, atc=0.6 if 24 <= t < 30 else 0.99) for t in range(2, 50, 2)]
    dets = {d.phase: d for d in attribute(PHASES, STARTS, ws, SLO, 0.99)}
    assert dets["drift: noise"].detected_s is None and dets["drift: noise"].signal == "not detected"
    assert dets["drift: rotation"].detected_s == pytest.approx(4.0)
    assert "estimated accuracy fell to 0.60" in dets["drift: rotation"].signal
    assert math.isnan(win(2, atc=math.nan).estimated_accuracy["atc"])
    assert attribute(PHASES, STARTS, [win(t, atc=math.nan) for t in range(2, 50, 2)], SLO, math.nan)[0].detected_s \
        is None


SHORT = (Phase("normal", 4), Phase("drift: noise", 2.5, shift="noise", incident="drift"),
         Phase("drift: rotation", 2, shift="rotation", incident="drift"),
         Phase("latency incident", 2.5, delay_ms=250, incident="latency"),
         Phase("error incident", 2, error_ratio=0.3, incident="errors"), Phase("recovery", 2.5))
SHORT_STARTS = [0.0, 4.0, 6.5, 8.5, 11.0, 13.0]


def _short_windows(last: int = 26) -> list[Window]:
    return [win(t, alarm=t >= 10, p99_ms=300.0 if t >= 12 else 40.0, error_ratio=0.3 if t >= 14 else 0.0)
            for t in range(1, last)]


def test_phases_shorter_than_their_signals_are_detected_late_not_missed():
    """`--scale 0.1`: every signal began after its phase had ended, so the summary said NOT detected
    for every incident while the sidecar (and Prometheus) had raised each one."""
    dets = {d.phase: d for d in attribute(SHORT, SHORT_STARTS, _short_windows(), SLO, 0.99, late_s=15.0)}
    rot, lat, err = dets["drift: rotation"], dets["latency incident"], dets["error incident"]
    assert rot.detected_s == pytest.approx(3.5) and "1.5 s after the phase ended (a 2.0 s phase" in rot.signal
    assert lat.detected_s == pytest.approx(3.5) and lat.signal.startswith("P99 300 ms above")
    assert err.detected_s == pytest.approx(3.0) and "availability burn rate" in err.signal
    # the alarm began after the rotation phase had begun: it is rotation's, not noise's
    assert dets["drift: noise"].detected_s is None and dets["drift: noise"].signal == "not detected"
    # without the allowance (or past it) nothing is credited: no phase takes a signal it did not cause
    assert all(d.detected_s is None for d in attribute(SHORT, SHORT_STARTS, _short_windows(), SLO, 0.99))
    assert attribute(SHORT, SHORT_STARTS, _short_windows(), SLO, 0.99, late_s=1.0)[1].detected_s is None


def test_late_allowance_covers_a_drift_window_at_the_rate():
    from sentinel.demo.summary import late_allowance

    assert late_allowance(20.0, 6.0, 2.0) == pytest.approx(6 + 5 + 4)
    assert late_allowance(5.0, 6.0, 2.0) > late_allowance(20.0, 6.0, 2.0)


@pytest.mark.parametrize("scale, durations, message", [
    (-1.0, None, "--scale must be a positive factor"),
    (0.0, None, "--scale must be a positive factor"),
    (math.nan, None, "--scale must be a positive factor"),
    (1.0, "normal=-5", "normal=-5 must be a positive number of seconds"),
    (1.0, "normal=0", "normal=0 must be a positive number of seconds"),
    (1.0, "normal=inf", "must be a positive number of seconds"),
    (1.0, "normal=abc", "normal='abc' is not a number of seconds"),
    (1.0, "normal", "'normal' is not phase=seconds"),
    (1.0, "normal=5,", "'' is not phase=seconds"),
    (1.0, "warmup=5", "unknown phase 'warmup'"),
    (1.0, "normal=5,normal=6", "phase 'normal' given twice"),
])
def test_bad_scale_and_durations_are_usage_errors(scale, durations, message):
    with pytest.raises(UsageError, match="^--") as exc:
        phases_from_options(scale, durations)
    assert message in str(exc.value)


def test_good_scale_and_durations():
    ph = phases_from_options(0.5, None)
    assert [p.seconds for p in ph] == [17.5, 12.5, 10.0, 12.5, 10.0, 12.5]
    ph = phases_from_options(0.5, " normal = 3 ,errors=4")
    assert ph[0].seconds == 3.0 and ph[4].seconds == 4.0 and ph[1].seconds == 12.5


def test_cli_exits_2_on_a_negative_scale_before_starting_anything(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sentinel", "demo", "--scale", "-1", "--no-live", "--out",
                        str(tmp_path / "d")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--scale must be a positive factor" in r.stderr + r.stdout
    assert not (tmp_path / "d").exists()


def test_alert_rows_are_plain_columns():
    rows = alert_rows([{"alertname": "SentinelErrorBudgetBurn",
                        "labels": {"severity": "page", "slo": "latency", "model": "digits", "job": "sentinel"},
                        "first_seen_s": 84.0, "last_seen_s": 110.0},
                       {"alertname": "SentinelDriftAlarm", "labels": {"detector": "combined"},
                        "first_seen_s": None, "last_seen_s": None}])
    assert rows[0] == {"alert": "SentinelErrorBudgetBurn", "severity": "page", "slo": "latency", "model": "digits",
                       "other labels": "-", "firing from": "84 s", "to": "110 s"}
    assert rows[1]["other labels"] == "detector=combined" and rows[1]["firing from"] == "-"


class _Children:
    procs: list = []


class _Opts:
    phases = PHASES
    rate = 20.0
    window_s = 6.0
    scrape_every = 2.0


class _Timeline:
    def __init__(self, windows):
        self.phase_starts = STARTS
        self.windows = windows
        self.requests = []
        self.notes = []
        self.alerts = [{"alertname": "SentinelErrorBudgetBurn", "labels": {"severity": "page", "slo": "latency"},
                        "first_seen_s": 33.0, "last_seen_s": 41.0}]

    def true_accuracy(self, t0, t1):
        return math.nan


class _Demo:
    """The attributes of a finished demo that the summary, the report and timeline.json read."""

    def __init__(self, windows):
        self.opts = _Opts()
        self.timeline = _Timeline(windows)
        self.slo = SLO
        self.drift_alpha = 0.01
        self.children = _Children()
        self.ports = {"server": 1}


def test_timeline_json_is_strict_json_with_nulls(tmp_path):
    from sentinel.demo.runner import timeline_json_text

    ws = timeline(14, 34)
    ws[0] = win(2, p99_ms=math.nan, error_ratio=math.inf)
    text = timeline_json_text(_Demo(ws))

    def no_constants(name: str):
        raise ValueError(f"bare {name} in timeline.json")

    doc = json.loads(text, parse_constant=no_constants)
    assert doc["windows"][0]["p99_ms"] is None and doc["windows"][0]["error_ratio"] is None
    assert doc["drift_alpha"] == 0.01


def test_report_has_alert_table_real_alpha_time_ticks_and_every_phase(tmp_path):
    from sentinel.demo.report import write_report
    from sentinel.demo.summary import render_text

    demo = _Demo(timeline(14, 34))
    html_text = write_report(demo, tmp_path).read_text()
    assert "{'alertname'" not in html_text and "<th>alert</th>" in html_text
    assert "<td>SentinelErrorBudgetBurn</td><td>page</td><td>latency</td>" in html_text
    assert "alpha 0.01 (the sidecar&#x27;s drift.alpha)" in html_text and "alpha 0.05" not in html_text
    assert html_text.count("<svg") == 4
    for p in PHASES:
        assert html_text.count(f">{p.name} <tspan") == 4
    assert '>30</text>' in html_text and "seconds since the start of traffic" in html_text
    assert "SLO burn rates over the last 6 s" in html_text and "page 6× (slow pair)" in html_text
    text = render_text(demo)
    assert "SentinelErrorBudgetBurn  page      latency" in text
    assert "drift: rotation      not detected separately: drift alarm already raised since 14.0 s (in 'drift: noise')" \
        in text
    Path(tmp_path / "summary.txt").write_text(text)


def test_summary_puts_the_lower_bound_and_reliability_beside_the_estimate():
    # The point estimate alone read 0.45 while true accuracy was 0.14 under rotation; the
    # lower bound and the reliability flag are what tell on-call not to believe it.
    from sentinel.demo.summary import phase_table, render_text

    ws = []
    for w in timeline(14, 34):
        rotated = 20 < w.t <= 30
        w.estimated_accuracy.update(atc=0.45 if rotated else 0.99, atc_lower=0.03 if rotated else 0.97)
        reliable = math.nan if w.t == 2 else 0.0 if rotated and w.t > 26 else 1.0   # NaN: not yet published
        ws.append(dataclasses.replace(w, estimate_reliable=reliable))
    rows = {r["phase"]: r for r in phase_table(_Demo(ws))}
    assert rows["drift: rotation"]["accuracy_lower"] == pytest.approx(0.03)
    assert rows["drift: rotation"]["reliable_share"] == pytest.approx(1 / 3)   # windows at 26, 28, 30 s
    assert rows["normal"]["reliable_share"] == 1.0
    line = next(x for x in render_text(_Demo(ws)).splitlines() if x.startswith("drift: rotation"))
    assert "   0.450  0.030      33%" in line


def test_summary_says_why_a_short_drift_phase_went_undetected():
    from sentinel.demo.summary import render_text

    demo = _Demo(_short_windows())
    demo.opts.phases = SHORT   # type: ignore[misc]
    demo.timeline.phase_starts = SHORT_STARTS
    lines = render_text(demo).splitlines()
    noise = next(x for x in lines if x.strip().startswith("drift: noise") and "detected" in x)
    assert noise.strip() == ("drift: noise         NOT detected (the phase lasted 2.5 s; a drift window holds 100 "
                             "samples, 5.0 s at 20 rps)")
    rot = next(x for x in lines if x.strip().startswith("drift: rotation") and "detected" in x)
    assert "detected 3.5 s after it began" in rot and "after the phase ended" in rot
