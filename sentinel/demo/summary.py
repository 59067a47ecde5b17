"""When each incident was detected, by which signal, and how long after it began."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sentinel.demo.observe import Window
from sentinel.demo.runner import Demo


@dataclass(frozen=True)
class Detection:
    phase: str
    incident: str
    started_s: float
    detected_s: float | None      # seconds after the phase began
    signal: str


def _alarmed(w: Window) -> str | None:
    """The combined verdict where the monitor reports one (its false-alarm rate is controlled)."""
    if "combined" in w.alarms:
        if w.alarms["combined"] < 1:
            return None
        fired = sorted(d for d, v in w.alarms.items() if v >= 1 and d != "combined")
        return f"drift alarm (combined verdict; {', '.join(fired)})"
    fired = sorted(d for d, v in w.alarms.items() if v >= 1)
    return f"drift alarm ({', '.join(fired)})" if fired else None


def detect(demo: Demo) -> list[Detection]:
    tl, slo = demo.timeline, demo.slo
    out = []
    normal_est = baseline_accuracy(demo)
    ends = tl.phase_starts[1:] + [math.inf]
    for phase, start, end in zip(demo.opts.phases, tl.phase_starts, ends, strict=False):
        if phase.incident is None:
            continue
        found: dict[str, tuple[float, str]] = {}   # signal kind → (seconds after start, what)
        for w in tl.windows:
            if not start < w.t <= end + demo.opts.scrape_every:
                continue
            hits: list[tuple[str, str]] = []
            if phase.incident == "drift":
                alarm = _alarmed(w)
                if alarm:
                    hits.append(("alarm", alarm))
                atc = w.estimated_accuracy.get("atc", math.nan)
                if not math.isnan(normal_est) and atc < normal_est - 0.05:
                    hits.append(("accuracy", f"estimated accuracy fell to {atc:.2f}"))
            elif phase.incident == "latency" and w.p99_ms > slo["threshold"] * 1000:
                hits.append(("p99", f"P99 {w.p99_ms:.0f} ms above the {slo['threshold'] * 1000:.0f} ms SLO threshold"))
            elif phase.incident == "errors":
                burn = w.error_ratio / (1 - slo["availability"]) if not math.isnan(w.error_ratio) else 0
                if burn >= 14.4:
                    hits.append(("burn", f"availability burn rate {burn:.0f}x (page threshold 14.4x)"))
            for kind, what in hits:
                found.setdefault(kind, (w.t - start, what))
        first = sorted(found.values())
        signal = "; ".join(f"{what} after {t:.1f} s" for t, what in first) if first else "not detected"
        out.append(Detection(phase.name, phase.incident, start, first[0][0] if first else None, signal))
    return out


def baseline_accuracy(demo: Demo) -> float:
    tl = demo.timeline
    if len(tl.phase_starts) < 2:
        return math.nan
    vals = [w.estimated_accuracy.get("atc", math.nan) for w in tl.windows if w.t <= tl.phase_starts[1]]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def phase_table(demo: Demo) -> list[dict]:
    """Per phase: rate, P50/P99, errors, estimated vs true accuracy, alarms seen."""
    tl = demo.timeline
    ends = tl.phase_starts[1:] + [math.inf]
    rows = []
    for phase, start, end in zip(demo.opts.phases, tl.phase_starts, ends, strict=False):
        ws = [w for w in tl.windows if start + demo.opts.window_s <= w.t <= end] or \
             [w for w in tl.windows if start < w.t <= end]

        def mean(f, ws=ws):
            v = [f(w) for w in ws]
            v = [x for x in v if x is not None and not math.isnan(x)]
            return float(np.mean(v)) if v else math.nan

        rows.append({
            "phase": phase.name,
            "rps": mean(lambda w: w.rps),
            "p50_ms": mean(lambda w: w.p50_ms),
            "p99_ms": max([w.p99_ms for w in ws if not math.isnan(w.p99_ms)], default=math.nan),
            "error_ratio": mean(lambda w: w.error_ratio),
            "estimated_accuracy": mean(lambda w: w.estimated_accuracy.get("atc", math.nan)),
            "true_accuracy": tl.true_accuracy(start, end),
            "drift_alarm": any(_alarmed(w) for w in ws),
        })
    return rows


def render_text(demo: Demo) -> str:
    lines = ["sentinel demo summary", ""]
    lines.append(f"{'phase':<20} {'rps':>5} {'p50 ms':>7} {'p99 ms':>7} {'errors':>7} {'est acc':>8} "
                 f"{'true acc':>8}  drift alarm")
    for r in phase_table(demo):
        lines.append(f"{r['phase']:<20} {r['rps']:>5.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
                     f"{r['error_ratio']:>7.1%} {r['estimated_accuracy']:>8.3f} {r['true_accuracy']:>8.3f}  "
                     f"{'yes' if r['drift_alarm'] else 'no'}")
    lines += ["", "incidents:"]
    for d in detect(demo):
        when = f"detected {d.detected_s:.1f} s after it began" if d.detected_s is not None else "NOT detected"
        lines.append(f"  {d.phase:<20} {when}: {d.signal}")
    if demo.timeline.alerts:
        lines += ["", "Prometheus alerts that fired:"]
        for a in demo.timeline.alerts:
            lab = a.get("labels", {})
            what = ", ".join(f"{k}={v}" for k, v in sorted(lab.items()) if k in ("slo", "severity", "detector"))
            lines.append(f"  {a.get('alertname')} {{{what}}} firing from {a.get('first_seen_s')} s "
                         f"to {a.get('last_seen_s')} s")
    for n in demo.timeline.notes[:10]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
