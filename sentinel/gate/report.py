"""The gate's verdict as text (for people and CI logs) and as JSON (for machines)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sentinel.gate.criteria import Verdict
from sentinel.gate.judge import GateReport, finite

_MARK = {Verdict.PASS: "PASS", Verdict.FAIL: "FAIL", Verdict.INCONCLUSIVE: "INCONCLUSIVE", Verdict.SKIPPED: "skipped"}


def text(report: GateReport) -> str:
    """A few lines: the verdict, then one line per criterion with its numbers."""
    when = datetime.fromtimestamp(report.evaluated_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    failed = [c.name for c in report.criteria if c.verdict == Verdict.FAIL]
    # More traffic helps only criteria short of samples; others (an unreliable estimate,
    # histograms without a shared bound) say in their line what stands in the way.
    stuck = [c.name for c in report.criteria
             if c.verdict == Verdict.INCONCLUSIVE and not c.summary.startswith("too few")]
    undecided = "INCONCLUSIVE: not enough evidence yet (send more traffic or widen --window)"
    if report.warnings and not stuck and all(c.verdict != Verdict.INCONCLUSIVE for c in report.criteria):
        undecided = ("INCONCLUSIVE: Prometheus warned that its answers may be incomplete (see below), "
                     "so the counts may miss replicas")
    elif stuck:
        undecided = f"INCONCLUSIVE: {', '.join(stuck)} could not be judged (more traffic may not help: see below)"
    head = {Verdict.PASS: "PASS: the canary is as good as the baseline on every criterion",
            Verdict.FAIL: f"FAIL: {', '.join(failed)}",
            Verdict.INCONCLUSIVE: undecided}
    lines = [f"gate {report.model}: canary {report.canary} vs baseline {report.baseline} over the last "
             f"{report.window} ({when}), family-wise alpha {report.alpha:g}",
             head[report.verdict]]
    width = max(len(c.name) for c in report.criteria)
    for c in report.criteria:
        lines.append(f"  {_MARK[c.verdict]:<12} {c.name:<{width}}  {c.summary}")
    for w in report.warnings:
        lines.append(f"  Prometheus warning: {w}")
    return "\n".join(lines) + "\n"


def as_dict(report: GateReport) -> dict[str, Any]:
    return {
        "model": report.model, "baseline": report.baseline, "canary": report.canary, "window": report.window,
        "prometheus": report.prometheus, "evaluated_at": report.evaluated_at, "alpha": report.alpha,
        "verdict": report.verdict.value, "exit_code": report.exit_code,
        "failed": [c.name for c in report.criteria if c.verdict == Verdict.FAIL],
        "warnings": list(report.warnings),
        "criteria": [{
            "name": c.name, "verdict": c.verdict.value, "summary": c.summary, "test": c.test,
            "statistic": finite(c.statistic), "p_value": finite(c.p_value), "alpha": c.alpha,
            "effect": {"name": c.effect_name, "value": finite(c.effect), "threshold": c.effect_threshold},
            "n": {"baseline": c.n_baseline, "canary": c.n_canary},
            "value": {"baseline": finite(c.baseline), "canary": finite(c.canary)},
        } for c in report.criteria],
    }


def to_json(report: GateReport) -> str:
    return json.dumps(as_dict(report), indent=2, allow_nan=False) + "\n"
