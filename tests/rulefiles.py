"""Helpers for tests that run `promtool test rules` on a copy of a rules directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def keep_test_groups(rules_dir: Path, name_prefix: str) -> list[str]:
    """Keep only the test groups whose name starts with `name_prefix` in every tests/*.test.yml.

    The full generated suite takes ~20 s of promtool on an idle core; tests about one alert or
    about the CLI's path handling need one group. Returns the names kept (never empty).
    """
    kept: list[str] = []
    for path in sorted((rules_dir / "tests").glob("*.test.yml")):
        doc = yaml.safe_load(path.read_text())
        doc["tests"] = [t for t in doc["tests"] if t.get("name", "").startswith(name_prefix)]
        kept += [t["name"] for t in doc["tests"]]
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert kept, f"no test group named {name_prefix!r}... in {rules_dir}/tests"
    return kept


def promql_expr_test(tmp_path: Path, series: list[tuple[str, str]], checks: list[dict], interval: str = "1s") -> None:
    """Run `promtool test rules` on `checks` (promql_expr_test entries) over `series` (name, values)."""
    tests = {"evaluation_interval": "1m", "tests": [{
        "interval": interval, "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": checks}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def argo_queries(spec, baseline: str, canary: str, window: str = "10m") -> dict[str, str]:
    """The Argo AnalysisTemplate's queries by metric name, its arguments filled in as Argo would."""
    from sentinel.gate.templates import argo_analysis_template

    subst = {"{{args.model}}": "digits", "{{args.baseline-version}}": baseline, "{{args.canary-version}}": canary,
             "{{args.window}}": window}
    out = {}
    for m in argo_analysis_template(spec, "http://prometheus:9090")["spec"]["metrics"]:
        expr = m["provider"]["prometheus"]["query"]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        out[m["name"]] = expr
    return out
