"""Replay results as a report: objectives, JSON document, text for the terminal."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sentinel.golden import Tolerance
from sentinel.replay.compare import MAX_LISTED_MISMATCHES, Tally
from sentinel.replay.runner import LoadPlan, RunResult

# Failed requests / sent allowed when neither --max-error-ratio nor an --slo availability
# objective says otherwise: none. A replay is a test against a golden set, not production
# traffic; an error budget has to be asked for.
DEFAULT_MAX_ERROR_RATIO = 0.0


@dataclass(frozen=True)
class Objectives:
    """What a replay must meet; None means not checked."""

    p99_ms: float | None = None          # corrected P99 latency, milliseconds
    min_agreement: float | None = None   # fraction of answered samples agreeing under the tolerance
    max_error_ratio: float | None = None  # failed requests / sent
    latency_threshold_ms: float | None = None  # with latency_ratio: a latency SLO (from --slo)
    latency_ratio: float | None = None         # fraction of requests at or under the threshold

    def validate(self) -> list[str]:
        p = []
        if self.p99_ms is not None and not 0 < self.p99_ms < math.inf:   # NaN fails too
            p.append(f"--p99-ms must be a positive number, got {self.p99_ms}")
        for name in ("min_agreement", "max_error_ratio"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                p.append(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
        return p


@dataclass(frozen=True)
class ObjectiveResult:
    name: str
    target: float
    actual: float | None
    met: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "actual": self.actual, "met": self.met,
                "message": self.message}


@dataclass(frozen=True)
class ReplayReport:
    """A finished replay: the JSON document and the verdicts."""

    doc: dict[str, Any]
    objectives: tuple[ObjectiveResult, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        """Every objective met, on a run that ran to its end (an interrupted run passes nothing)."""
        return all(o.met for o in self.objectives) and not self.doc.get("interrupted", False)

    @property
    def missed(self) -> list[ObjectiveResult]:
        return [o for o in self.objectives if not o.met]


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None


def _clean(v: Any) -> Any:
    """NaN → None, so the JSON is valid."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def evaluate(objectives: Objectives, doc: dict[str, Any]) -> tuple[ObjectiveResult, ...]:
    """Check each objective against the report document."""
    out = []
    if objectives.p99_ms is not None:
        p99 = doc["latency_ms"]["corrected"]["p99"]
        if p99 is None:
            out.append(ObjectiveResult("p99_ms", objectives.p99_ms, None, False, "no latency measured"))
        else:
            met = p99 <= objectives.p99_ms
            msg = (f"P99 latency {p99:.1f} ms ≤ {objectives.p99_ms:g} ms" if met else
                   f"P99 latency {p99:.1f} ms exceeds {objectives.p99_ms:g} ms by {p99 - objectives.p99_ms:.1f} ms")
            out.append(ObjectiveResult("p99_ms", objectives.p99_ms, p99, met, msg))
    if objectives.min_agreement is not None:
        a = doc["agreement"]
        if a is None:
            out.append(ObjectiveResult("min_agreement", objectives.min_agreement, None, False,
                                       "no answers to compare with the reference"))
        else:
            met = a >= objectives.min_agreement
            n_bad = doc["mismatch_count"]
            msg = (f"agreement {a:.2%} ≥ {objectives.min_agreement:.2%}" if met else
                   f"agreement {a:.2%} is below {objectives.min_agreement:.2%} by "
                   f"{(objectives.min_agreement - a) * 100:.2f} points ({n_bad} mismatching samples)")
            out.append(ObjectiveResult("min_agreement", objectives.min_agreement, a, met, msg))
    if objectives.max_error_ratio is not None and not doc["sent"]:
        # 0 of 0 is no evidence that the target answers (`--duration` shorter than one request)
        out.append(ObjectiveResult("max_error_ratio", objectives.max_error_ratio, None, False,
                                   "no request was sent: no error ratio measured"))
    elif objectives.max_error_ratio is not None:
        r = doc["error_ratio"] or 0.0
        met = r <= objectives.max_error_ratio
        msg = (f"error ratio {r:.2%} ≤ {objectives.max_error_ratio:.2%}" if met else
               f"error ratio {r:.2%} exceeds {objectives.max_error_ratio:.2%} by "
               f"{(r - objectives.max_error_ratio) * 100:.2f} points ({doc['errors']} of {doc['sent']})")
        out.append(ObjectiveResult("max_error_ratio", objectives.max_error_ratio, r, met, msg))
    if objectives.latency_threshold_ms is not None and objectives.latency_ratio is not None:
        within = doc["latency_ms"]["corrected"].get("within_threshold")
        t, want = objectives.latency_threshold_ms, objectives.latency_ratio
        if within is None:
            out.append(ObjectiveResult("latency_ratio", want, None, False, "no latency measured"))
        else:
            met = within >= want
            msg = (f"{within:.2%} of requests within {t:g} ms ≥ {want:.2%}" if met else
                   f"only {within:.2%} of requests within {t:g} ms, below {want:.2%} by {(want - within) * 100:.2f} points")
            out.append(ObjectiveResult("latency_ratio", want, within, met, msg))
    return tuple(out)


def objectives_from_slo(path: str, model_name: str, model_spec: str, flags: Objectives) -> Objectives:
    """Objectives from an SLO file's entries for this model; command-line flags win.

    availability → max error ratio (1 - objective); latency → that fraction of requests
    within the threshold; agreement → min agreement. Label-free accuracy has no replay
    counterpart and is skipped.
    """
    from dataclasses import replace

    from sentinel.slo.spec import load_slo_file

    spec = load_slo_file(path)
    got: dict[str, float] = {}
    for s in spec.slos:
        if s.model not in (model_name, model_spec):
            continue
        if s.sli == "availability":
            got["max_error_ratio"] = round(1.0 - s.objective, 9)
        elif s.sli == "agreement":
            got["min_agreement"] = s.objective
        elif s.sli == "latency" and s.threshold is not None:
            got["latency_threshold_ms"] = s.threshold * 1000.0
            got["latency_ratio"] = s.objective
    merged = {k: v for k, v in got.items() if getattr(flags, k) is None}
    return replace(flags, **merged)


def build_report(result: RunResult, *, model: str, target: str, protocol: str, binary: bool,
                 plan: LoadPlan, tolerance: Tolerance, objectives: Objectives,
                 golden: str = "") -> ReplayReport:
    """The report document (fields documented in docs/replay_verify.md) and objective verdicts."""
    comps = result.comparisons
    t = comps if isinstance(comps, Tally) else Tally.of(comps, tolerance)
    if t.tolerance != tolerance:   # agreement was counted as the run went, under the samples' tolerance
        raise ValueError(f"the run compared under {t.tolerance}, the report asks for {tolerance}")
    errors = sum(result.errors.values())
    lag = result.send_lag.summary()
    ct = result.client_time.summary()
    doc: dict[str, Any] = {
        "model": model,
        "target": target,
        "protocol": protocol,
        "binary": binary,
        "golden": golden,
        "mode": result.mode,
        "rate": plan.rate,
        "concurrency": plan.concurrency,
        "connections": plan.connections if plan.open_loop else plan.concurrency,
        "planned": result.planned,
        "sent": result.sent,
        "interrupted": result.interrupted,
        "abandoned": result.abandoned,
        "answered": t.answered,
        "errors": errors,
        "error_ratio": _ratio(errors, result.sent),
        "errors_by_kind": dict(sorted(result.errors.items())),
        "retried": result.retried,
        "error_examples": dict(sorted(result.error_examples.items())),
        "agreement": _ratio(t.agreed, t.answered),
        "top1_agreement": _ratio(t.top1_agreed, t.answered),
        "prob_max_abs": None if t.prob_max_abs is None else round(t.prob_max_abs, 9),
        "logits_max_abs": None if t.logits_max_abs is None else round(t.logits_max_abs, 9),
        "tolerance": {"prob_atol": tolerance.prob_atol, "logits_atol": tolerance.logits_atol,
                      "logits_rtol": tolerance.logits_rtol},
        "duration_s": round(result.wall_s, 3),
        "achieved_rps": round(result.sent / result.wall_s, 2) if result.wall_s > 0 else None,
        "latency_ms": {
            "corrected": _clean(result.corrected.summary().as_dict()),
            "uncorrected": _clean(result.uncorrected.summary().as_dict()),
        },
        "client": {
            "send_lag_ms": _clean({"p50": lag.p50, "p99": lag.p99, "max": lag.max}),
            "decode_compare_us": _clean({"p50": _us(ct.p50), "p99": _us(ct.p99)}),
            "cpu_per_request_us": round(result.cpu_s / result.completed * 1e6, 1) if result.completed else None,
        },
        "mismatch_count": t.mismatch_count,
        "mismatches": [c.as_dict() for c in t.worst()[:MAX_LISTED_MISMATCHES]],
    }
    if objectives.latency_threshold_ms is not None:
        w = result.corrected.fraction_within(objectives.latency_threshold_ms / 1000.0)
        doc["latency_ms"]["corrected"]["within_threshold"] = None if math.isnan(w) else round(w, 6)
        doc["latency_ms"]["corrected"]["threshold"] = objectives.latency_threshold_ms
    verdicts = evaluate(objectives, doc)
    doc["objectives"] = [o.as_dict() for o in verdicts]
    report = ReplayReport(doc, verdicts)
    doc["passed"] = report.passed
    return report


def _us(ms: float) -> float:
    return float("nan") if ms is None or math.isnan(ms) else round(ms * 1000, 1)


def render_text(report: ReplayReport) -> str:
    """A short human summary."""
    d = report.doc
    how = f"open loop {d['rate']:g} rps" if d["mode"] == "open" else f"closed loop, concurrency {d['concurrency']}"
    fmt = f"{d['protocol']} {'binary' if d['binary'] else 'JSON'}" if d["protocol"] == "v2" else d["protocol"]
    lines = [f"replay {d['model']} → {d['target']} ({fmt}), {how}",
             f"sent {d['sent']}, answered {d['answered']}, errors {d['errors']}"
             + (f" ({_pct(d['error_ratio'])}: " + ", ".join(f"{k} {v}" for k, v in d["errors_by_kind"].items()) + ")"
                if d["errors"] else "")
             + (f"; {d['retried']} resent after the server closed a kept-alive connection" if d.get("retried") else "")
             + f"; achieved {d['achieved_rps']} rps over {d['duration_s']} s",
             f"{'latency ms':<12}{'p50':>9}{'p90':>9}{'p95':>9}{'p99':>9}{'p99.9':>9}{'max':>9}"]
    # what went wrong, not only how often: the first error of each kind (all of them in --json)
    examples = [f"  first {k} error: {' '.join(str(v).split())[:160]}" for k, v in d.get("error_examples", {}).items()]
    lines[2:2] = examples
    for kind in ("corrected", "uncorrected"):
        s = d["latency_ms"][kind]
        lines.append(f"{kind:<12}" + "".join(f"{_num(s[k]):>9}" for k in ("p50", "p90", "p95", "p99", "p999", "max")))
    lines.append(f"agreement {_pct(d['agreement'])} (top-1 {_pct(d['top1_agreement'])}), "
                 f"max |Δp| {_sci(d['prob_max_abs'])}, max |Δlogit| {_sci(d['logits_max_abs'])}")
    if d["mismatch_count"]:
        shown = d["mismatches"][:5]
        lines.append(f"mismatches ({d['mismatch_count']}): " + "; ".join(
            f"id {m['id']} expected {m['expected']} served {m['served']} |Δp| {_sci(m['prob_max_abs'])}"
            for m in shown) + (" …" if d["mismatch_count"] > len(shown) else ""))
    for o in report.objectives:
        lines.append(f"{'ok    ' if o.met else 'MISSED'} {o.message}")
    if d.get("interrupted"):
        lines.append(f"INTERRUPTED after {d['duration_s']} s: a partial run, {d['sent']} of "
                     f"{d['planned'] or '?'} planned requests finished, {d['abandoned']} in flight abandoned")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"
