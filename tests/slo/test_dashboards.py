"""Generated dashboards: three boards, template variables, a unit and a description on every panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sentinel import metricnames as mn
from sentinel.slo import recorded
from sentinel.slo.dashboards import dashboard_specs, generate_dashboards
from sentinel.slo.spec import load_slo_file

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SPEC = load_slo_file(REPO / "slo.yaml")
BOARDS = {name: json.loads(text) for name, text in generate_dashboards(SPEC).items()}


def test_three_dashboards_with_stable_uids():
    assert sorted((b["uid"], name) for name, b in BOARDS.items()) == [
        ("sentinel-debug", "sentinel-debug.json"), ("sentinel-oncall", "sentinel-oncall.json"),
        ("sentinel-overview", "sentinel-overview.json")]


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_template_variables(name):
    variables = {v["name"]: v for v in BOARDS[name]["templating"]["list"]}
    assert list(variables) == ["datasource", "model", "version", "instance"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "sentinel_model_info" in variables["instance"]["query"] and "$version" in variables["instance"]["query"]


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_has_unit_description_and_datasource_variable(name):
    for panel in BOARDS[name]["panels"]:
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert len(panel["description"]) > 20, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
        assert "null" not in json.dumps(panel)


def test_panels_cover_what_the_issue_asks_for():
    titles = {name: [p["title"] for p in b["panels"]] for name, b in BOARDS.items()}
    assert {"SLI over the period", "Error budget remaining", "Burn rate (page windows)", "Estimated accuracy",
            "Models and versions in service"} <= set(titles["sentinel-overview.json"])
    assert {"Latency P50 / P95 / P99", "Error ratio by code", "Drift alarms", "GPU memory used",
            "Canary replay results"} <= set(titles["sentinel-oncall.json"])
    assert {"Drift p-values", "Sampling by outcome", "Analysis queue depth", "GPU memory per process",
            "Collector health"} <= set(titles["sentinel-debug.json"])
    # issue 14: executive cost and size, on-call version comparison, debug live-vs-golden inputs
    assert {"Cost per 1,000 inferences", "Model size", "Inferences in the range"} <= set(titles["sentinel-overview.json"])
    assert {"Versions: error ratio", "Versions: P95 latency", "Versions: agreement with the reference",
            "Versions: accuracy lower bound", "Versions: predicted classes", "Input contract violations",
            "Drift diagnosis"} <= set(titles["sentinel-oncall.json"])
    assert "Input statistics: live traffic vs golden set" in titles["sentinel-debug.json"]


def test_cost_panel_uses_the_configured_costs_and_currency():
    import dataclasses

    from sentinel.gate.settings import CostSettings
    from sentinel.slo.dashboards import cost_query

    spec = dataclasses.replace(SPEC, cost=CostSettings(replica_hour=0.75, gpu_hour=3.0, currency="EUR"))
    expr = cost_query(spec)
    assert "* 0.75" in expr and "* 3\n" in expr and "3600 / 1000" in expr
    board = json.loads(generate_dashboards(spec)["sentinel-overview.json"])
    (panel,) = [p for p in board["panels"] if p["title"] == "Cost per 1,000 inferences"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "currencyEUR"
    assert panel["targets"][0]["expr"] == expr


def test_queries_use_only_known_metric_names():
    known = {m.sample_name for m in mn.METRICS} | {m.name for m in mn.METRICS}
    known |= {m.name + "_bucket" for m in mn.METRICS if m.kind == "histogram"}
    records = {recorded.OBJECTIVE, recorded.BUDGET_REMAINING, recorded.ESTIMATE_USABLE}
    # ...and every recorded series a panel reads is one the generated rules write
    from sentinel.slo.rules import generate_rule_files
    written = set(re.findall(r"record: (\S+)", "".join(f.render() for f in generate_rule_files(SPEC))))
    for board in dashboard_specs(SPEC):
        for panel in board.panels:
            for q in panel.queries:
                for tok in re.findall(r"(?<![:\w])(sentinel_[a-z_]+)", q.expr):
                    assert tok in known, (board.uid, panel.title, tok)
                for tok in re.findall(r"(slo:[a-z_]+:[a-z_0-9]+)", q.expr):
                    assert tok in records or tok.startswith(recorded.ERROR_RATIO_PREFIX), tok
                    assert tok in written, (board.uid, panel.title, tok)


def test_oncall_shows_why_the_accuracy_slo_may_be_silent():
    (panel,) = [p for p in BOARDS["sentinel-oncall.json"]["panels"] if p["title"] == "Accuracy estimate usable"]
    exprs = [t["expr"] for t in panel["targets"]]
    assert exprs[0].startswith(recorded.ESTIMATE_USABLE) and mn.ACCURACY_ESTIMATE_RELIABLE.name in exprs[1]
    assert "SentinelAccuracyEstimateUnreliable" in panel["description"]
    (debug,) = [p for p in BOARDS["sentinel-debug.json"]["panels"]
                if p["title"] == "Samples behind the accuracy estimate"]
    assert mn.ACCURACY_ESTIMATE_SAMPLES.name in debug["targets"][0]["expr"] and "(100)" in debug["description"]


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_grafana_accepts_the_layout_unique_ids_and_no_overlap(name):
    """Every panel has its own id and a gridPos inside Grafana's 24 columns, overlapping no other panel."""
    board = BOARDS[name]
    assert board["schemaVersion"] >= 36
    ids = [p.get("id") for p in board["panels"]]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), ids
    cells: dict[tuple[int, int], str] = {}
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], "overlaps", cells[(x, y)])
                cells[(x, y)] = p["title"]


def test_stat_colours_follow_the_value_not_grafanas_default_red_at_80():
    """Without thresholds Grafana colours green below 80 and red above: an overspent budget (-1.5 = -150%)
    would be green. Every panel states its thresholds; the budget is red below 0."""
    for name, board in BOARDS.items():
        for p in board["panels"]:
            steps = p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps")
            assert steps and "value" not in steps[0], (name, p["title"])
            assert all(s["value"] != 80 for s in steps[1:]), (name, p["title"])
    (budget,) = [p for p in BOARDS["sentinel-overview.json"]["panels"] if p["title"] == "Error budget remaining"]
    steps = budget["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[0]["color"] == "red" and steps[1]["value"] == 0
