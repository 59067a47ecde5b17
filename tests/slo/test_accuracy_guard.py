"""The estimated-accuracy SLO counts only estimates it may trust, checked with `promtool test rules`.

The rules are the ones `slo.yaml` generates (30d period, 1-minute evaluation). Two replicas
report the ATC lower bound, how many samples it rests on, and the estimator's reliable flag:

* startup: the lower bound reads 0.5 on fewer than `min_samples` samples for half an hour:
  nothing burns, `SentinelAccuracyEstimateUnreliable{reason="insufficient_samples"}` fires
  after its `for`; the same bound on enough samples pages at once (so the check can fail);
* a sustained drop on enough samples pages at the very step the ungated arithmetic of
  `sentinel.slo.series` says, not a step later;
* a low bound the estimator flags unreliable burns nothing and raises the
  `flagged_unreliable` reason instead;
* one replica short of samples does not drag the fleet's estimate down, and the SLO is not
  silent while the other replica's estimate counts.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sentinel import metricnames as mn
from sentinel.slo import recorded, series
from sentinel.slo.rules import (
    BURN_ALERT,
    UNRELIABLE_ALERT,
    UNRELIABLE_FOR,
    estimate_age_s,
    generate_rule_files,
)
from sentinel.slo.spec import load_slo_file
from sentinel.slo.unittests import _Scenario
from sentinel.slo.windows import plan_windows

REPO = Path(__file__).resolve().parents[2]
SPEC = load_slo_file(REPO / "slo.yaml")
SLO = next(s for s in SPEC.slos if s.sli == "estimated_accuracy")
FLOOR = SLO.sample_floor
STEP_S = 60
INSTANCES = ("sentinel-a:9090", "sentinel-b:9090")
BELOW = "SentinelEstimatedAccuracyBelowObjective"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")]


def _gauges(instance: str, bound: list[float], samples: list[float], reliable: list[float]) -> list[dict[str, str]]:
    base = f'instance="{instance}",job="sentinel",model="{SLO.model}"'
    return [
        {"series": f'{mn.ESTIMATED_ACCURACY.name}{{{base},method="atc_lower"}}', "values": series.compress(bound)},
        {"series": f"{mn.ACCURACY_ESTIMATE_SAMPLES.name}{{{base}}}", "values": series.compress(samples)},
        {"series": f"{mn.ACCURACY_ESTIMATE_RELIABLE.name}{{{base}}}", "values": series.compress(reliable)},
    ]


def _alerts(name: str, at: int, severity: str | None = None, **labels: str) -> dict[str, Any]:
    """Firing `name` alerts of the accuracy SLO (of `severity`, when given) at step `at`: one with
    `labels` (and `severity`) as ALERTS carries them, or none when `labels` is empty."""
    sev = {} if severity is None else {"severity": severity}
    matcher = f',severity="{severity}"' if severity else ""
    expected = {"alertname": name, "alertstate": "firing", "model": SLO.model, "slo": SLO.name, **sev, **labels}
    return {"expr": f'ALERTS{{alertname="{name}",alertstate="firing",slo="{SLO.name}"{matcher}}}',
            "eval_time": f"{at}m",
            "exp_samples": [{"labels": "ALERTS" + _label_text(expected), "value": 1}] if labels else []}


def _never(name: str, until: int) -> dict[str, Any]:
    """`name` did not fire for the accuracy SLO at any evaluation up to step `until`."""
    return {"expr": f'count_over_time(ALERTS{{alertname="{name}",alertstate="firing",slo="{SLO.name}"}}'
                    f"[{until}m])", "eval_time": f"{until}m", "exp_samples": []}


def _label_text(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _recorded(name: str, at: int, value: float | None) -> dict[str, Any]:
    labels = _label_text({"model": SLO.model, "sli": SLO.sli, "slo": SLO.name})
    return {"expr": f'{name}{{slo="{SLO.name}"}}', "eval_time": f"{at}m",
            "exp_samples": [] if value is None else [{"labels": name + labels, "value": value}]}


def _run(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    for f in generate_rule_files(SPEC):
        (tmp_path / f.filename).write_text(f.render())
    order = [g.name for f in generate_rule_files(SPEC) for g in f.groups]
    order = [g for g in order if g.endswith(":recording")] + [g for g in order if not g.endswith(":recording")]
    doc = {"rule_files": [f.filename for f in generate_rule_files(SPEC)], "evaluation_interval": f"{STEP_S}s",
           "group_eval_order": order, "tests": tests}
    (tmp_path / "guard.test.yml").write_text(yaml.safe_dump(doc, sort_keys=False, width=200))
    proc = subprocess.run(["promtool", "test", "rules", "guard.test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def _unreliable_for() -> int:
    assert UNRELIABLE_FOR.endswith("m")
    return int(UNRELIABLE_FOR[:-1])


def test_a_low_bound_on_too_few_samples_does_not_burn_and_says_why(tmp_path):
    young = 30                      # steps with fewer than min_samples behind the estimate
    steps = young + 30
    samples = [min(FLOOR - 1, 25 * (s + 1)) for s in range(young)] + [2 * FLOOR] * (steps - young + 1)
    low_then_healthy = [0.5] * young + [0.99] * (steps - young + 1)
    inputs = [g for i in INSTANCES for g in _gauges(i, low_then_healthy, samples, [1.0] * (steps + 1))]
    fires_at = _unreliable_for() + 1
    guarded = {
        "name": "startup: a lower bound of 0.5 on fewer than min_samples samples burns nothing",
        "interval": f"{STEP_S}s", "input_series": inputs,
        "promql_expr_test": [
            _never(BURN_ALERT, steps), _never(BELOW, steps),
            _recorded(recorded.ESTIMATED_ACCURACY, young - 1, None),
            _recorded(recorded.ESTIMATE_USABLE, young - 1, 0),
            _recorded(recorded.ESTIMATE_USABLE, young + 1, 1),
            _recorded(recorded.ESTIMATED_ACCURACY, young + 1, 0.99),
            _alerts(UNRELIABLE_ALERT, fires_at - 2),                        # pending, not firing yet
            _alerts(UNRELIABLE_ALERT, fires_at, reason="insufficient_samples", severity="info"),
            _alerts(UNRELIABLE_ALERT, young + 1),                           # resolved once it counts
        ],
    }
    # Control: the same bound on enough samples is a real drop from the start, and pages as soon
    # as the estimate has counted for half the fast pair's short window (not on its first values).
    enough = [g for i in INSTANCES for g in _gauges(i, low_then_healthy, [float(FLOOR)] * (steps + 1),
                                                     [1.0] * (steps + 1))]
    fast = plan_windows(SPEC.period_seconds, SPEC.scrape_interval_seconds).by_severity("page")[0]
    first_page = -(-estimate_age_s(fast) // STEP_S)
    assert first_page == 3        # 5m short window: 2m30s of estimates
    control = {
        "name": "control: the same lower bound on min_samples samples pages once it has counted 2m30s",
        "interval": f"{STEP_S}s", "input_series": enough,
        "promql_expr_test": [_alerts(BURN_ALERT, first_page - 1, severity="page"),
                             _alerts(BURN_ALERT, first_page, severity="page", sli=SLO.sli),
                             _alerts(UNRELIABLE_ALERT, fires_at)],
    }
    _run(tmp_path, [guarded, control])


def test_a_sustained_drop_on_enough_samples_pages_when_the_ungated_rules_would(tmp_path):
    plan = plan_windows(SPEC.period_seconds, SPEC.scrape_interval_seconds)
    warm = plan.by_severity("page")[-1].long_s // STEP_S + 10      # all page windows healthy first
    horizon = warm + 120

    def bad(s: int) -> float:       # the lower bound falls from 0.99 to 0.2
        return 0.01 if s <= warm else 0.8

    profile = series.Profile(horizon, bad)
    scen = _Scenario(SLO, profile, plan, STEP_S)
    first = next(s for s in range(warm, horizon) if "page" in scen.firing(s))
    assert not scen.ambiguous(first) and not scen.ambiguous(first - 1)
    inputs = series.input_series(SLO, profile)     # min_samples behind every estimate, all reliable
    test = {
        "name": "a sustained drop on enough samples pages at the step the ungated arithmetic gives",
        "interval": f"{STEP_S}s", "input_series": inputs,
        "promql_expr_test": [_alerts(BURN_ALERT, first - 1, "page"),
                             _alerts(BURN_ALERT, first, "page", sli=SLO.sli),
                             _never(UNRELIABLE_ALERT, horizon)],
    }
    # The same drop, but ten minutes after the page the estimator flags its estimates unreliable:
    # the windows still hold the low values that counted, yet the burn alerts fall silent at once.
    cut = first + 10
    disowned = [dict(item) for item in inputs]
    for item in disowned:
        if item["series"].startswith(mn.ACCURACY_ESTIMATE_RELIABLE.name + "{"):
            item["values"] = series.compress([1.0] * (cut + 1) + [0.0] * (horizon - cut))
    later = {
        "name": "the page stops at the first evaluation whose estimate the estimator disowns",
        "interval": f"{STEP_S}s", "input_series": disowned,
        "promql_expr_test": [_alerts(BURN_ALERT, cut, "page", sli=SLO.sli), _alerts(BURN_ALERT, cut + 1, "page"),
                             _alerts(BURN_ALERT, cut + 1, "ticket")],
    }
    _run(tmp_path, [test, later])
    assert first - warm == 33     # minutes: the 1h/5m pair's 14.4x of a 3% budget (its 1h average below 0.568)


def test_a_bound_flagged_unreliable_burns_nothing_and_says_why(tmp_path):
    warm, bad_steps = 70, 45
    steps = warm + bad_steps
    bound = [0.99] * (warm + 1) + [0.5] * bad_steps
    reliable = [1.0] * (warm + 1) + [0.0] * bad_steps
    inputs = [g for i in INSTANCES for g in _gauges(i, bound, [2.0 * FLOOR] * (steps + 1), reliable)]
    fires_at = warm + _unreliable_for() + 1
    test = {
        "name": "a lower bound of 0.5 the estimator flags unreliable: no burn, the flagged_unreliable reason",
        "interval": f"{STEP_S}s", "input_series": inputs,
        "promql_expr_test": [
            _never(BURN_ALERT, steps), _never(BELOW, steps),
            _recorded(recorded.ESTIMATE_USABLE, warm + 2, 0),
            _alerts(UNRELIABLE_ALERT, fires_at, reason="flagged_unreliable", severity="info"),
        ],
    }
    _run(tmp_path, [test])


def test_one_replica_short_of_samples_neither_drags_the_estimate_nor_silences_the_slo(tmp_path):
    steps = 60
    full = [float(2 * FLOOR)] * (steps + 1)
    ones = [1.0] * (steps + 1)
    inputs = (_gauges(INSTANCES[0], [0.99] * (steps + 1), full, ones)
              + _gauges(INSTANCES[1], [0.3] * (steps + 1), [FLOOR / 2] * (steps + 1), ones))
    test = {
        "name": "replica b is young and reads 0.3: the SLO counts replica a only",
        "interval": f"{STEP_S}s", "input_series": inputs,
        "promql_expr_test": [
            _never(BURN_ALERT, steps), _never(UNRELIABLE_ALERT, steps),
            _recorded(recorded.ESTIMATED_ACCURACY, steps, 0.99),
            _recorded(recorded.ESTIMATE_USABLE, steps, 0.5),
        ],
    }
    _run(tmp_path, [test])


def test_a_slow_burn_tickets_once_the_estimate_is_old_enough_and_never_pages(tmp_path):
    """1.1x the budget rate from the first estimate: only the 3d/6h pair can trip, and only once the
    estimate has counted for half of its 6h short window (3h); before that the young estimate alone
    fills every window. A gap in the estimates restarts the clock."""
    plan = plan_windows(SPEC.period_seconds, SPEC.scrape_interval_seconds)
    slow = max(plan.by_severity("ticket"), key=lambda p: p.long_s)
    assert (slow.long, slow.short, slow.factor) == ("3d", "6h", 1.0)
    age = estimate_age_s(slow) // STEP_S                   # 180 steps
    steps = age + 20
    bound = [1 - 1.1 * SLO.budget] * (steps + 1)           # 0.967: just under the 0.97 objective
    ones = [1.0] * (steps + 1)
    inputs = [g for i in INSTANCES for g in _gauges(i, bound, [2.0 * FLOOR] * (steps + 1), ones)]
    test = {
        "name": "a slow burn from the start tickets at 3h, not before, and never pages",
        "interval": f"{STEP_S}s", "input_series": inputs,
        "promql_expr_test": [_alerts(BURN_ALERT, age - 2, "ticket"),
                             _alerts(BURN_ALERT, age + 2, "ticket", sli=SLO.sli),
                             {"expr": f'count_over_time(ALERTS{{alertname="{BURN_ALERT}",severity="page",'
                                      f'slo="{SLO.name}"}}[{steps}m])', "eval_time": f"{steps}m", "exp_samples": []}],
    }
    _run(tmp_path, [test])
