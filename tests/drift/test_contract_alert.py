"""The generated input-contract alert fires on one broken client in ten (promtool unit test)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sentinel import metricnames as mn
from sentinel.slo.generate import write_rules
from sentinel.slo.spec import load_slo_file

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def _annotations(rules_dir: Path) -> dict[str, str]:
    """The alert's annotations as promtool renders them at a 10% violation ratio."""
    groups = yaml.safe_load((rules_dir / "sentinel-ops.rules.yml").read_text())["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "SentinelInputContractViolations")
    return {k: v.replace("{{ $labels.model }}", "digits").replace("{{ $value | humanizePercentage }}", "10%")
            for k, v in rule["annotations"].items()}


def _test_file(ratio_bad: float, annotations: dict[str, str]) -> dict:
    """10 checked samples per 30 s scrape, `ratio_bad` of them violating, starting at 0 (as the monitor does)."""
    lbl = 'job="sentinel",instance="sentinel-a:9090",model="digits"'
    bad = round(10 * ratio_bad, 3)
    return {
        "rule_files": ["sentinel-ops.rules.yml"],
        "evaluation_interval": "30s",
        "tests": [{
            "interval": "30s",
            "input_series": [
                {"series": f"{mn.INPUT_CONTRACT_CHECKED.sample_name}{{{lbl}}}", "values": "0+10x40"},
                {"series": f"{mn.INPUT_CONTRACT_VIOLATING.sample_name}{{{lbl}}}", "values": f"0+{bad}x40"},
                {"series": f'{mn.INPUT_CONTRACT_VIOLATIONS.sample_name}{{{lbl},check="out_of_range"}}',
                 "values": f"0+{bad}x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "20s", "alertname": "SentinelInputContractViolations", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "SentinelInputContractViolations",
                 "exp_alerts": [] if ratio_bad == 0 else [{"exp_labels": {"model": "digits", "severity": "page"},
                                                         "exp_annotations": annotations}]},
            ],
        }],
    }


@pytest.mark.parametrize("ratio_bad", [0.1, 0.0])
def test_contract_alert_fires_on_ten_percent_bad_inputs(tmp_path, ratio_bad):
    write_rules(load_slo_file(REPO / "slo.yaml"), tmp_path, None)
    test = tmp_path / "contract.test.yml"
    test.write_text(yaml.safe_dump(_test_file(ratio_bad, _annotations(tmp_path)), sort_keys=False))
    res = subprocess.run(["promtool", "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_contract_alert_test_fails_when_the_alert_would_not_fire(tmp_path):
    """The same test against a threshold of 50% must fail: the test can tell."""
    write_rules(load_slo_file(REPO / "slo.yaml"), tmp_path, None)
    ops = tmp_path / "sentinel-ops.rules.yml"
    ops.write_text(ops.read_text().replace("> 0.01\n", "> 0.5\n"))
    test = tmp_path / "contract.test.yml"
    test.write_text(yaml.safe_dump(_test_file(0.1, _annotations(tmp_path)), sort_keys=False))
    res = subprocess.run(["promtool", "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
