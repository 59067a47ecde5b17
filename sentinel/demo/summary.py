"""When each incident was detected, by which signal, and how long after it began."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sentinel.demo.observe import Window
from sentinel.demo.phases import Phase
from sentinel.demo.runner import DEMO_DRIFT_WINDOW, Demo

NOT_DETECTED = "not detected"
SIGNAL_NAMES = {"alarm": "drift alarm", "accuracy": "estimated-accuracy drop", "p99": "P99 above the SLO threshold",
                "burn": "availability burn rate above the page threshold"}
PAGE_BURN = 14.4  # the SRE Workbook's fast page factor (sentinel.slo.windows.WORKBOOK_30D)


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


@dataclass(frozen=True)
class Onset:
    """A signal going from quiet to raised: at window time `t`, with what it said then."""

    kind: str
    t: float
    what: str


def onsets(windows: list[Window], kind: str, hit: Callable[[Window], str | None]) -> list[Onset]:
    """Every window where `hit` says something and the window before said nothing (the first counts)."""
    out: list[Onset] = []
    was = False
    for w in windows:
        what = hit(w)
        if what and not was:
            out.append(Onset(kind, w.t, what))
        was = bool(what)
    return out


def phase_index(t: float, starts: list[float]) -> int:
    """The phase a time belongs to: the last one started at or before it (phase i covers (start_i, start_i+1])."""
    i = 0
    for k, s in enumerate(starts):
        if t > s:
            i = k
    return i


def incident_signals(incident: str, slo: dict[str, float],
                     normal_est: float) -> dict[str, Callable[[Window], str | None]]:
    """The signals that detect each kind of incident, by kind, each saying what it saw or None."""
    if incident == "drift":
        def accuracy(w: Window) -> str | None:
            atc = w.estimated_accuracy.get("atc", math.nan)
            if not math.isnan(normal_est) and atc < normal_est - 0.05:
                return f"estimated accuracy fell to {atc:.2f}"
            return None

        return {"alarm": _alarmed, "accuracy": accuracy}
    if incident == "latency":
        thr = slo["threshold"]

        def p99(w: Window) -> str | None:
            if w.p99_ms > thr * 1000:
                return f"P99 {w.p99_ms:.0f} ms above the {thr * 1000:.0f} ms SLO threshold"
            return None

        return {"p99": p99}
    if incident == "errors":
        budget = 1 - slo["availability"]

        def burn(w: Window) -> str | None:
            b = w.error_ratio / budget if not math.isnan(w.error_ratio) else 0.0
            return f"availability burn rate {b:.0f}x (page threshold {PAGE_BURN}x)" if b >= PAGE_BURN else None

        return {"burn": burn}
    return {}


def _late(phases: tuple[Phase, ...], starts: list[float], i: int, ons: list[Onset], late_s: float) -> Onset | None:
    """The first onset after phase i ended, within `late_s`, before any later phase of the same kind.

    A phase shorter than its signal needs (a drift window must fill) is detected after it ends;
    no later phase of another kind causes this kind of signal, so the onset is this phase's.
    """
    if i + 1 >= len(starts):
        return None
    end = starts[i + 1]
    for o in ons:
        k = phase_index(o.t, starts)
        if o.t <= end or o.t > end + late_s:
            continue
        if any(phases[j].incident == phases[i].incident for j in range(i + 1, min(k, len(phases) - 1) + 1)):
            return None   # a later phase of the same kind began first: the onset is that phase's
        return o
    return None


def attribute(phases: tuple[Phase, ...], starts: list[float], windows: list[Window], slo: dict[str, float],
              normal_est: float, late_s: float = 0.0) -> list[Detection]:
    """Per incident phase, the signals that *began* in it (quiet before, raised in this phase).

    A signal still raised from an earlier phase is not credited to this one; the detection
    says it was already on, and since which phase. A signal that began within `late_s` after the
    phase ended, before any later phase of the same kind, is credited to it as a late detection.
    """
    out = []
    for i, phase in enumerate(phases):
        if phase.incident is None or i >= len(starts):
            continue
        start = starts[i]
        began: list[tuple[float, str]] = []
        carried: list[str] = []
        late: list[tuple[float, str]] = []
        for kind, hit in incident_signals(phase.incident, slo, normal_est).items():
            ons = onsets(windows, kind, hit)
            mine = [o for o in ons if phase_index(o.t, starts) == i]
            if mine:
                began.append((mine[0].t - start, mine[0].what))
                continue
            after = _late(phases, starts, i, ons, late_s)
            if after is not None:
                end = starts[i + 1]
                late.append((after.t - start, f"{after.what} after {after.t - start:.1f} s, "
                                              f"{after.t - end:.1f} s after the phase ended (a {end - start:.1f} s "
                                              "phase is shorter than this signal needs to show)"))
            before = [o for o in ons if o.t <= start]
            first_in = next((w for w in windows if w.t > start), None)
            if before and first_in is not None and hit(first_in):
                src = phases[phase_index(before[-1].t, starts)].name
                carried.append(f"{SIGNAL_NAMES.get(kind, kind)} already raised since {before[-1].t:.1f} s "
                               f"(in {src!r})")
        began.sort()
        late.sort()
        if began:
            signal = "; ".join(f"{what} after {t:.1f} s" for t, what in began)
        elif late:
            signal = "; ".join(what for _, what in late)
            began = late
        else:
            signal = "; ".join(carried) if carried else NOT_DETECTED
        out.append(Detection(phase.name, phase.incident, start, began[0][0] if began else None, signal))
    return out


def late_allowance(rate: float, window_s: float, scrape_every: float) -> float:
    """How long after a phase ends its signal may still begin: the judged window, a drift
    window's worth of samples at the rate, and two scrapes."""
    return window_s + DEMO_DRIFT_WINDOW / rate + 2 * scrape_every


def detect(demo: Demo) -> list[Detection]:
    tl = demo.timeline
    o = demo.opts
    return attribute(o.phases, tl.phase_starts, tl.windows, demo.slo, baseline_accuracy(demo),
                     late_allowance(o.rate, o.window_s, o.scrape_every))


def drift_alarm_phases(phases: tuple[Phase, ...], starts: list[float], windows: list[Window]) -> set[int]:
    """Indices of the phases in which a drift alarm began."""
    return {phase_index(o.t, starts) for o in onsets(windows, "alarm", _alarmed)} & set(range(len(phases)))


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
    # The last phase ends with the traffic: the scrapes after it (while the last answers come
    # back) cover windows with less or no traffic, which would pull its rate and figures down.
    last_end = tl.phase_starts[-1] + demo.opts.phases[len(tl.phase_starts) - 1].seconds if tl.phase_starts \
        else math.inf
    ends = tl.phase_starts[1:] + [last_end]
    alarmed = drift_alarm_phases(demo.opts.phases, tl.phase_starts, tl.windows)
    rows = []
    for i, (phase, start, end) in enumerate(zip(demo.opts.phases, tl.phase_starts, ends, strict=False)):
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
            # what on-call should read beside the point estimate: its lower bound, and how much
            # of the phase the sidecar itself called the estimate reliable
            "accuracy_lower": mean(lambda w: w.estimated_accuracy.get("atc_lower", math.nan)),
            "reliable_share": mean(lambda w: w.estimate_reliable),
            "true_accuracy": tl.true_accuracy(start, end),
            "drift_alarm": i in alarmed,   # an alarm began in this phase
        })
    return rows


ALERT_COLUMNS = ("alert", "severity", "slo", "model", "other labels", "firing from", "to")


def alert_rows(alerts: list[dict]) -> list[dict[str, str]]:
    """Prometheus alerts (from demo.prom.collect_alerts) as table rows of plain strings."""
    def secs(v: object) -> str:
        return f"{v:.0f} s" if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    rows = []
    for a in alerts:
        lab = dict(a.get("labels", {}))
        rows.append({
            "alert": str(a.get("alertname", "?")),
            "severity": lab.pop("severity", "-"),
            "slo": lab.pop("slo", "-"),
            "model": lab.pop("model", "-"),
            "other labels": ", ".join(f"{k}={v}" for k, v in sorted(lab.items())
                                      if k not in ("job", "instance")) or "-",
            "firing from": secs(a.get("first_seen_s")),
            "to": secs(a.get("last_seen_s")),
        })
    return rows


def reliable_text(share: float) -> str:
    """A phase's share of windows with the estimate flagged reliable, as the summary prints it."""
    return "-" if math.isnan(share) else f"{share:.0%}"


def render_text(demo: Demo) -> str:
    lines = ["sentinel demo summary", ""]
    lines.append(f"{'phase':<20} {'rps':>5} {'p50 ms':>7} {'p99 ms':>7} {'errors':>7} {'est acc':>8} "
                 f"{'lower':>6} {'reliable':>8} {'true acc':>8}  drift alarm began")
    for r in phase_table(demo):
        lines.append(f"{r['phase']:<20} {r['rps']:>5.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
                     f"{r['error_ratio']:>7.1%} {r['estimated_accuracy']:>8.3f} {r['accuracy_lower']:>6.3f} "
                     f"{reliable_text(r['reliable_share']):>8} {r['true_accuracy']:>8.3f}  "
                     f"{'yes' if r['drift_alarm'] else 'no'}")
    lines.append("(est acc: the ATC point estimate; lower: its lower bound, unknown verdicts counted wrong;"
                 " reliable: share of the phase the sidecar flagged the estimate reliable)")
    lines += ["", "incidents:"]
    fill_s = DEMO_DRIFT_WINDOW / demo.opts.rate
    for d in detect(demo):
        if d.signal == NOT_DETECTED:
            phase = next(p for p in demo.opts.phases if p.name == d.phase)
            why = (f" (the phase lasted {phase.seconds:.1f} s; a drift window holds {DEMO_DRIFT_WINDOW} samples, "
                   f"{fill_s:.1f} s at {demo.opts.rate:g} rps)" if d.incident == "drift" and phase.seconds < fill_s
                   else "")
            lines.append(f"  {d.phase:<20} NOT detected{why}")
            continue
        when = f"detected {d.detected_s:.1f} s after it began" if d.detected_s is not None else "not detected separately"
        lines.append(f"  {d.phase:<20} {when}: {d.signal}")
    if demo.timeline.alerts:
        lines += ["", "Prometheus alerts that fired (seconds since the start of traffic):"]
        rows = alert_rows(demo.timeline.alerts)
        widths = [max(len(str(r[k])) for r in [dict(zip(ALERT_COLUMNS, ALERT_COLUMNS, strict=True)), *rows])
                  for k in ALERT_COLUMNS]
        lines.append("  " + "  ".join(c.ljust(wd) for c, wd in zip(ALERT_COLUMNS, widths, strict=True)).rstrip())
        for r in rows:
            lines.append("  " + "  ".join(str(r[c]).ljust(wd) for c, wd in zip(ALERT_COLUMNS, widths, strict=True))
                         .rstrip())
    for n in demo.timeline.notes[:10]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
