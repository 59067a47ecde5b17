"""Window and burn-rate arithmetic against the SRE Workbook's figures."""

from __future__ import annotations

import pytest

from sentinel.slo.windows import plan_windows

pytestmark = pytest.mark.unit

DAY = 86400


def _table(period_s: int, scrape_s: int = 30):
    return [(w.severity, w.long, w.short, w.factor, round(w.budget_fraction, 4))
            for w in plan_windows(period_s, scrape_s).pairs]


def test_thirty_days_is_the_workbook_table():
    assert _table(30 * DAY) == [
        ("page", "1h", "5m", 14.4, 0.02),
        ("page", "6h", "30m", 6.0, 0.05),
        ("ticket", "1d", "2h", 3.0, 0.1),
        ("ticket", "3d", "6h", 1.0, 0.1),
    ]


def test_28_days_scales_windows_and_keeps_budget_fractions():
    assert _table(28 * DAY) == [
        ("page", "56m", "4m40s", 14.4, 0.02),
        ("page", "5h36m", "28m", 6.0, 0.05),
        ("ticket", "22h24m", "1h52m", 3.0, 0.1),
        ("ticket", "2d19h12m", "5h36m", 1.0, 0.1),
    ]


def test_7_days_clamps_the_shortest_window_to_four_scrapes():
    # 5m * 7/30 = 70s < 4 x 30s: clamped to 2m
    assert _table(7 * DAY) == [
        ("page", "14m", "2m", 14.4, 0.02),
        ("page", "1h24m", "7m", 6.0, 0.05),
        ("ticket", "5h36m", "28m", 3.0, 0.1),
        ("ticket", "16h48m", "1h24m", 1.0, 0.1),
    ]
    assert plan_windows(7 * DAY, 15).pairs[0].short == "1m10s"


def test_compressed_period_for_end_to_end_tests():
    plan = plan_windows(4 * 3600, 1)
    assert [(w.long, w.short) for w in plan.pairs] == [("20s", "4s"), ("2m", "10s"), ("8m", "40s"),
                                                       ("24m", "2m")]
    assert plan.ranges_s == (4, 10, 20, 40, 120, 480, 1440, 14400)


@pytest.mark.parametrize("objective,detect_s", [(0.999, 51.84), (0.99, 518.4), (0.995, 259.2), (0.97, 1555.2)])
def test_full_outage_detection_time(objective, detect_s):
    fast = plan_windows(30 * DAY, 30).pairs[0]
    assert fast.detection_s(1.0, round(1 - objective, 12)) == pytest.approx(detect_s)


def test_burn_below_the_factor_never_detects():
    fast = plan_windows(30 * DAY, 30).pairs[0]
    assert fast.detection_s(0.0144, 0.001) == float("inf")
    assert fast.reset_s(0.001) == pytest.approx(300 * (1 - 0.0144))


@pytest.mark.parametrize("objective", [0.9, 0.8, 0.5, 0.93])
def test_a_low_objective_still_pages_and_tickets_below_an_error_ratio_of_one(objective):
    # 14.4x a 10% budget is an error ratio of 144%: the pair could never fire (and rule
    # generation crashed computing its detection time)
    budget = round(1 - objective, 12)
    pairs = plan_windows(30 * DAY, 30).pairs
    for w in pairs:
        ratio = w.factor_for(budget) * budget
        assert budget <= ratio <= (1 + budget) / 2 + 1e-9, (w, ratio)   # the budget or above, below all-bad
        assert w.detection_s(1.0, budget) < w.long_s
    # a full outage pages within about half the fast pair's long window
    assert pairs[0].detection_s(1.0, budget) <= 0.5 * (2 - objective) * 3600 + 1e-6
    # the slow pairs keep their order: a ticket's factor never above a page's
    assert pairs[2].factor_for(budget) <= pairs[1].factor_for(budget) <= pairs[0].factor_for(budget)


def test_objectives_the_workbook_factors_fit_keep_them():
    for objective in (0.999, 0.99, 0.97, 0.95):
        budget = round(1 - objective, 12)
        for w in plan_windows(30 * DAY, 30).pairs:
            if w.factor * budget <= (1 + budget) / 2:
                assert w.factor_for(budget) == w.factor
    assert [w.factor_for(0.001) for w in plan_windows(30 * DAY, 30).pairs] == [14.4, 6.0, 3.0, 1.0]


def test_the_burn_rate_panel_says_when_a_low_objective_pages_lower(tmp_path):
    from sentinel.slo.dashboards import _lowered_factors
    from sentinel.slo.spec import load_slo_file

    (tmp_path / "slo.yaml").write_text("slos:\n  - {name: availability, model: m, objective: 0.999, sli: availability}\n"
                                       "  - {name: accuracy, model: m, objective: 0.9, sli: estimated_accuracy}\n")
    spec = load_slo_file(tmp_path / "slo.yaml")
    assert _lowered_factors(spec, plan_windows(30 * DAY, 30)) == " Lower objectives page lower: accuracy (m) at 5.5x, 5.5x."
