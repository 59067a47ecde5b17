"""Read OpenSLO v1 `SLO` (and `SLI`) documents as a sentinel SLO file.

Only ratio SLIs over sentinel's own metrics are understood, because sentinel writes its
own PromQL from `sentinel.metricnames` (aggregation, `le` spelling, no-traffic safety)
rather than trusting a query: the `total` query names the metric family, `good` or `bad`
names the good or bad events:

    availability  total: sentinel_requests_total            bad: code=~"5.."  (or good: code!~"5..")
    latency       total: sentinel_request_duration_seconds_count   good: ..._bucket{le="0.15"}
    agreement     total: sentinel_reference_agreement_total  good: result="agree" (or bad: "disagree")

The model is the query's `model="..."` matcher, else `spec.service`; the objective is the
single objective's `target` (or `targetPercent`); the period is `timeWindow[0].duration`
(rolling, the same for every SLO); `budgetingMethod` must be `Occurrences`. Anything else is
a ConfigError naming the document and field.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from sentinel import metricnames as mn
from sentinel.errors import ConfigError
from sentinel.schema import load_mapping

API_VERSION = "openslo/v1"


def is_openslo(text: str) -> bool:
    """True when the YAML text holds OpenSLO v1 documents."""
    return re.search(r"^apiVersion:\s*['\"]?openslo/v1['\"]?\s*$", text, re.MULTILINE) is not None


def _get(doc: Any, path: str) -> Any:
    cur = doc
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _query(metric: Any) -> str | None:
    q = _get(metric, "metricSource.spec.query")
    return q if isinstance(q, str) else None


def _sli_kind(ratio: dict[str, Any]) -> tuple[str, float | None] | str:
    """(sli, threshold) for a ratioMetric, or a sentence saying why it is not understood."""
    total = _query(ratio.get("total")) or ""
    good = _query(ratio.get("good")) or ""
    bad = _query(ratio.get("bad")) or ""
    if mn.REQUESTS.sample_name in total:
        if re.search(r'code\s*=~\s*"5', bad) or re.search(r'code\s*!~\s*"5', good):
            return "availability", None
        return 'availability needs bad: code=~"5.." or good: code!~"5.." on sentinel_requests_total'
    if mn.REQUEST_DURATION.name + "_count" in total:
        m = re.search(r'le\s*=\s*"([0-9.eE+-]+)"', good)
        if mn.REQUEST_DURATION.sample_name in good and m:
            return "latency", float(m.group(1))
        return f'latency needs good: {mn.REQUEST_DURATION.sample_name}{{le="<threshold>"}}'
    if mn.REFERENCE_AGREEMENT.sample_name in total:
        if re.search(r'result\s*=\s*"agree"', good) or re.search(r'result\s*=\s*"disagree"', bad):
            return "agreement", None
        return 'agreement needs good: result="agree" or bad: result="disagree"'
    return (f"only ratio SLIs over sentinel's metrics are understood ({mn.REQUESTS.sample_name}, "
            f"{mn.REQUEST_DURATION.name}_bucket/_count, {mn.REFERENCE_AGREEMENT.sample_name}); "
            f"sentinel writes its own PromQL from them")


def load_openslo(text: str, source: str, defaults: dict[str, Any] | None = None) -> Any:
    """Convert OpenSLO v1 documents to an SloFile (validated like a native SLO file)."""
    from sentinel.slo.spec import SloFile  # spec imports this module

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    problems: list[str] = []
    slis = {_get(d, "metadata.name"): d for d in docs if isinstance(d, dict) and d.get("kind") == "SLI"}
    periods: set[str] = set()
    slos: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or doc.get("kind") != "SLO":
            continue
        where = f"{source}: documents[{i}]"
        if doc.get("apiVersion") != API_VERSION:
            problems.append(f"{where}.apiVersion: expected {API_VERSION}, got {doc.get('apiVersion')!r}")
            continue
        spec = doc.get("spec") or {}
        name = _get(doc, "metadata.name")
        if spec.get("budgetingMethod", "Occurrences") != "Occurrences":
            problems.append(f"{where}.spec.budgetingMethod: only Occurrences is supported, "
                            f"got {spec.get('budgetingMethod')!r}")
        windows = spec.get("timeWindow") or []
        if len(windows) != 1 or not isinstance(windows[0], dict) or not windows[0].get("duration"):
            problems.append(f"{where}.spec.timeWindow: expected one window with a duration")
        else:
            if windows[0].get("isRolling") is False:
                problems.append(f"{where}.spec.timeWindow[0].isRolling: calendar windows are not supported")
            periods.add(str(windows[0]["duration"]))
        objectives = spec.get("objectives") or []
        if len(objectives) != 1 or not isinstance(objectives[0], dict):
            problems.append(f"{where}.spec.objectives: expected exactly one objective")
            continue
        objective = objectives[0].get("target")
        if objective is None and objectives[0].get("targetPercent") is not None:
            percent = objectives[0]["targetPercent"]
            if isinstance(percent, bool) or not isinstance(percent, (int, float)):
                problems.append(f"{where}.spec.objectives[0].targetPercent: expected a number of percent "
                                f"(99.9), got {percent!r}")
                continue
            objective = float(percent) / 100
        indicator = spec.get("indicator") or objectives[0].get("indicator")
        ind_path = "spec.indicator"
        if indicator is None and isinstance(spec.get("indicatorRef"), str):
            indicator = slis.get(spec["indicatorRef"])
            ind_path = "spec.indicatorRef"
            if indicator is None:
                problems.append(f"{where}.spec.indicatorRef: no SLI named {spec['indicatorRef']!r} in the file")
                continue
        ratio = _get(indicator, "spec.ratioMetric")
        if not isinstance(ratio, dict):
            problems.append(f"{where}.{ind_path}: only ratioMetric indicators are supported")
            continue
        kind = _sli_kind(ratio)
        if isinstance(kind, str):
            problems.append(f"{where}.{ind_path}.spec.ratioMetric: {kind}")
            continue
        m = re.search(r'model\s*=\s*"([^"]+)"', _query(ratio.get("total")) or "")
        entry: dict[str, Any] = {"name": name, "model": m.group(1) if m else spec.get("service"),
                                 "objective": objective, "sli": kind[0]}
        if kind[1] is not None:
            entry["threshold"] = kind[1]
        if spec.get("description"):
            entry["description"] = spec["description"]
        slos.append(entry)
    if len(periods) > 1:
        problems.append(f"{source}: timeWindow: every SLO must use the same period, got {', '.join(sorted(periods))}")
    if not slos and not problems:
        problems.append(f"{source}: no OpenSLO v1 SLO documents found")
    if problems:
        raise ConfigError(problems)
    data: dict[str, Any] = dict(defaults or {})
    data["slos"] = slos
    if periods:
        data["period"] = periods.pop()
    return load_mapping(data, SloFile, source)
