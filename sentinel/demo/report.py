"""The demo's HTML report: inline SVG plots, no plotting library needed."""

from __future__ import annotations

import html
import math
from pathlib import Path

from sentinel.demo.runner import Demo
from sentinel.demo.summary import (
    ALERT_COLUMNS,
    NOT_DETECTED,
    alert_rows,
    detect,
    phase_table,
    reliable_text,
)

W, H = 780, 290
LEFT, RIGHT, TOP, BOTTOM = 58, 18, 40, 62   # plot area margins: phase names above, ticks and legend below
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
_TICK_STEPS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600)


def time_ticks(t_end: float, most: int = 12) -> list[float]:
    """Round tick positions (seconds) from 0 to t_end, at most `most` of them."""
    step = next((s for s in _TICK_STEPS if t_end / s <= most), _TICK_STEPS[-1])
    return [k * step for k in range(int(t_end // step) + 1)]


def _finite(v: float | None, log: bool) -> bool:
    return v is not None and not math.isnan(v) and not math.isinf(v) and not (log and v <= 0)


def _chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], demo: Demo, *,
           log: bool = False, ymin: float | None = None, ymax: float | None = None,
           hlines: list[tuple[str, float]] = (), unit: str = "", note: str = "") -> str:
    tl = demo.timeline
    phases = demo.opts.phases
    pts = [(t, v) for _, s in series for t, v in s if _finite(v, log)]
    t_end = max([tl.phase_starts[-1] + phases[len(tl.phase_starts) - 1].seconds] + [t for t, _ in pts]) \
        if tl.phase_starts else max([1.0] + [t for t, _ in pts])
    vals = [v for _, v in pts] + [v for _, v in hlines]
    lo = ymin if ymin is not None else (min(vals) if vals else 0.0)
    hi = ymax if ymax is not None else (max(vals) if vals else 1.0)
    if log:
        lo, hi = math.log10(max(lo, 1e-12)), math.log10(max(hi, 1e-12))
    if hi <= lo:
        hi = lo + 1
    top, bottom, left, right = TOP, H - BOTTOM, LEFT, W - RIGHT

    def x(t: float) -> float:
        return left + (right - left) * t / max(t_end, 1e-9)

    def y(v: float) -> float:
        v = math.log10(max(v, 1e-12)) if log else v
        v = min(max(v, lo), hi)
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    out = [f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{html.escape(title)}" '
           f'font-family="sans-serif">']
    # phases: shaded bands, a boundary line at each start, every name above the plot (two staggered rows)
    for i, (phase, start) in enumerate(zip(phases, tl.phase_starts, strict=False)):
        x0, x1 = x(start), x(min(start + phase.seconds, t_end))
        fill = "#fdecea" if phase.incident else ("#f4f4f4" if i % 2 else "#ffffff")
        out.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 0):.1f}" height="{bottom - top}" '
                   f'fill="{fill}"/>')
        row_y = 13 if i % 2 == 0 else 28
        out.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{row_y + 3}" y2="{bottom}" stroke="#888" '
                   f'stroke-width="0.8" stroke-dasharray="3 2"/>')
        out.append(f'<text x="{x0 + 3:.1f}" y="{row_y}" font-size="11" fill="#333">'
                   f'{html.escape(phase.name)} <tspan fill="#888">({start:.0f} s)</tspan></text>')
    out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
               f'stroke="#999"/>')
    # y axis
    if log:
        decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
        step = max(1, math.ceil(len(decades) / 6))
        yticks = [10.0 ** d for d in decades[::step]]
    else:
        yticks = [lo + (hi - lo) * f for f in (0, 0.25, 0.5, 0.75, 1)]
    for v in yticks:
        label = (f"{v:g}" if 1e-3 <= v <= 1e4 else f"{v:.0e}") if log else \
            (f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}")
        out.append(f'<line x1="{left - 4}" x2="{left}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#999"/>'
                   f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end">{label}{unit}</text>')
    # x axis: time ticks
    for t in time_ticks(t_end):
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{bottom}" y2="{bottom + 4}" stroke="#666"/>'
                   f'<text x="{x(t):.1f}" y="{bottom + 15}" font-size="10" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{(left + right) / 2:.1f}" y="{bottom + 30}" font-size="10" text-anchor="middle" '
               f'fill="#444">seconds since the start of traffic</text>')
    for name, v in hlines:
        out.append(f'<line x1="{left}" x2="{right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#000" '
                   f'stroke-dasharray="5 3"/><text x="{right - 3}" y="{y(v) - 3:.1f}" font-size="10" '
                   f'text-anchor="end">{html.escape(name)}</text>')
    legend_x = left
    for i, (name, s) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        good = [(t, v) for t, v in s if _finite(v, log)]
        if good:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in good)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        out.append(f'<rect x="{legend_x}" y="{H - 15}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{legend_x + 14}" y="{H - 6}" font-size="11">{html.escape(name)}</text>')
        legend_x += 24 + 6.2 * len(name)
    out.append("</svg>")
    note_html = f'<p class="note">{note}</p>\n' if note else ""
    return f"<h2>{html.escape(title)}</h2>\n{note_html}" + "\n".join(out)


def _burn_note(demo: Demo) -> str:
    from sentinel.demo.prom import DEMO_PERIOD, SCRAPE
    from sentinel.slo.durations import parse_duration
    from sentinel.slo.windows import plan_windows

    plan = plan_windows(int(parse_duration(DEMO_PERIOD)), int(parse_duration(SCRAPE)))
    pairs = "; ".join(f"{w.severity} {w.factor:g}× on {w.long_s} s/{w.short_s} s" for w in plan.pairs[:2])
    return (f"Each point is the error ratio (availability) or the share of requests slower than "
            f"{demo.slo['threshold'] * 1000:.0f} ms (latency) over the last {demo.opts.window_s:g} s, divided "
            f"by the SLO's error budget. The dashed lines are the page thresholds of the SRE Workbook's "
            f"window pairs (14.4× on 1h/5m, 6× on 6h/30m for 30 days); with <code>--prometheus</code> the "
            f"demo compresses the period to {DEMO_PERIOD}, where those pairs are {html.escape(pairs)}: a "
            f"{demo.opts.window_s:g}-second window sits between the fast pair's two windows, so a burn above "
            f"14.4× here is what pages there.")


def write_report(demo: Demo, out_dir: Path) -> Path:
    tl = demo.timeline
    ws = tl.windows
    thr_ms = demo.slo["threshold"] * 1000
    charts = [
        _chart("Latency percentiles through the sidecar (from its own histogram)",
               [("p50", [(w.t, w.p50_ms) for w in ws]), ("p99", [(w.t, w.p99_ms) for w in ws])],
               demo, ymin=0, unit=" ms", hlines=[(f"SLO threshold {thr_ms:.0f} ms", thr_ms)]),
    ]
    detectors = sorted({d for w in ws for d in w.p_values})
    charts.append(_chart(
        "Drift detectors: corrected p-values (log scale)",
        [(d, [(w.t, w.p_values.get(d, math.nan)) for w in ws]) for d in detectors],
        demo, log=True, ymin=1e-8, ymax=1.0, hlines=[(f"alpha {demo.drift_alpha:g} (the sidecar's drift.alpha)",
                                                     demo.drift_alpha)],
        note="A detector alarms when its corrected p-value falls below the sidecar's alpha; the combined "
             "verdict must stay below it for consecutive disjoint windows (drift.persistence)."))
    step = 5.0
    true_acc = []
    t = 0.0
    end = tl.phase_starts[-1] + demo.opts.phases[-1].seconds if tl.phase_starts else 0
    while t < end:
        true_acc.append((t + step, tl.true_accuracy(t, t + step)))
        t += step
    charts.append(_chart(
        "Estimated accuracy (label-free) vs true accuracy of the labelled traffic",
        [("ATC estimate", [(w.t, w.estimated_accuracy.get("atc", math.nan)) for w in ws]),
         ("ATC lower bound", [(w.t, w.estimated_accuracy.get("atc_lower", math.nan)) for w in ws]),
         ("average confidence", [(w.t, w.estimated_accuracy.get("avg_conf", math.nan)) for w in ws]),
         ("true accuracy (5 s bins)", true_acc)],
        demo, ymin=0, ymax=1, hlines=[(f"objective {demo.slo['accuracy']}", demo.slo["accuracy"])]))
    charts.append(_chart(
        f"SLO burn rates over the last {demo.opts.window_s:g} s (log scale)",
        [("availability", [(w.t, w.error_ratio / (1 - demo.slo["availability"])) for w in ws]),
         ("latency", [(w.t, w.slow_ratio / (1 - demo.slo["latency"])) for w in ws])],
        demo, log=True, ymin=0.01, ymax=1000,
        hlines=[("page 14.4× (fast pair)", 14.4), ("page 6× (slow pair)", 6.0), ("1× (budget spent at period end)", 1.0)],
        note=_burn_note(demo)))
    rows = "".join(
        f"<tr><td>{html.escape(r['phase'])}</td><td>{r['rps']:.1f}</td><td>{r['p50_ms']:.1f}</td>"
        f"<td>{r['p99_ms']:.1f}</td><td>{r['error_ratio']:.1%}</td><td>{r['estimated_accuracy']:.3f}</td>"
        f"<td>{r['accuracy_lower']:.3f}</td><td>{reliable_text(r['reliable_share'])}</td><td>{r['true_accuracy']:.3f}</td><td>{'yes' if r['drift_alarm'] else 'no'}</td></tr>"
        for r in phase_table(demo))
    dets = "".join(
        f"<li><b>{html.escape(d.phase)}</b>: "
        + (f"detected {d.detected_s:.1f} s after it began: {html.escape(d.signal)}" if d.detected_s is not None
           else "not detected" if d.signal == NOT_DETECTED else f"not detected separately: {html.escape(d.signal)}")
        + "</li>"
        for d in detect(demo))
    alert_table = ""
    if tl.alerts:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ALERT_COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(r[c])}</td>" for c in ALERT_COLUMNS) + "</tr>"
                       for r in alert_rows(tl.alerts))
        alert_table = (f"<h2>Prometheus alerts that fired</h2><p class=\"note\">Seconds since the start of "
                       f"traffic.</p><table><tr>{head}</tr>{body}</table>")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>sentinel demo report</title>
<style>body{{font-family:sans-serif;max-width:820px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
.note{{color:#444;font-size:90%}}</style></head>
<body><h1>sentinel demo report</h1>
<p>digits:v3 served by the kserve ModelServer, watched by the sentinel sidecar. Incident phases are shaded red.</p>
<h2>Incidents</h2><ul>{dets}</ul>
{alert_table}
<h2>Phases</h2><table><tr><th>phase</th><th>rps</th><th>p50 ms</th><th>p99 ms</th><th>errors</th>
<th>est. accuracy</th><th>lower bound</th><th>estimate reliable</th><th>true accuracy</th><th>drift alarm began</th></tr>{rows}</table>
{"".join(charts)}
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
