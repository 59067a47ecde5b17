"""The demo's HTML report: inline SVG plots, no plotting library needed."""

from __future__ import annotations

import html
import math
from pathlib import Path

from sentinel.demo.runner import Demo
from sentinel.demo.summary import detect, phase_table

W, H, PAD = 760, 220, 44
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], demo: Demo, *,
           log: bool = False, ymin: float | None = None, ymax: float | None = None,
           hlines: list[tuple[str, float]] = (), unit: str = "") -> str:
    pts = [(t, v) for _, s in series for t, v in s if v is not None and not math.isnan(v) and not (log and v <= 0)]
    t_end = max([demo.timeline.phase_starts[-1] + demo.opts.phases[-1].seconds] + [t for t, _ in pts]) \
        if demo.timeline.phase_starts else 1.0
    vals = [v for _, v in pts] + [v for _, v in hlines]
    lo = ymin if ymin is not None else (min(vals) if vals else 0.0)
    hi = ymax if ymax is not None else (max(vals) if vals else 1.0)
    if log:
        lo, hi = math.log10(max(lo, 1e-12)), math.log10(max(hi, 1e-12))
    if hi <= lo:
        hi = lo + 1

    def x(t: float) -> float:
        return PAD + (W - 2 * PAD) * t / max(t_end, 1e-9)

    def y(v: float) -> float:
        v = math.log10(max(v, 1e-12)) if log else v
        v = min(max(v, lo), hi)
        return H - PAD / 2 - (H - PAD) * (v - lo) / (hi - lo)

    out = [f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{html.escape(title)}">']
    for i, (phase, start) in enumerate(zip(demo.opts.phases, demo.timeline.phase_starts, strict=False)):
        x0, x1 = x(start), x(start + phase.seconds)
        fill = "#f3f3f3" if i % 2 else "#ffffff"
        if phase.incident:
            fill = "#fdecea"
        out.append(f'<rect x="{x0:.1f}" y="{PAD / 2}" width="{x1 - x0:.1f}" height="{H - PAD}" fill="{fill}"/>')
        out.append(f'<text x="{x0 + 3:.1f}" y="{PAD / 2 + 11}" font-size="10" fill="#666">{html.escape(phase.name)}</text>')
    out.append(f'<rect x="{PAD}" y="{PAD / 2}" width="{W - 2 * PAD}" height="{H - PAD}" fill="none" stroke="#999"/>')
    for frac in (0, 0.5, 1):
        v = lo + (hi - lo) * frac
        label = f"{10 ** v:.0e}" if log else f"{v:.3g}"
        out.append(f'<text x="{PAD - 4}" y="{y(10 ** v if log else v) + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{label}{unit}</text>')
    out.append(f'<text x="{W - PAD}" y="{H - 4}" font-size="10" text-anchor="end">seconds since start '
               f'(0–{t_end:.0f})</text>')
    for name, v in hlines:
        out.append(f'<line x1="{PAD}" x2="{W - PAD}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#000" '
                   f'stroke-dasharray="4 3"/><text x="{W - PAD - 2}" y="{y(v) - 3:.1f}" font-size="10" '
                   f'text-anchor="end">{html.escape(name)}</text>')
    legend_x = PAD + 4
    for i, (name, s) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        good = [(t, v) for t, v in s if v is not None and not math.isnan(v) and not (log and v <= 0)]
        if good:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in good)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        out.append(f'<text x="{legend_x}" y="{H - 6}" font-size="10" fill="{color}">■ {html.escape(name)}</text>')
        legend_x += 9 + 6 * len(name)
    out.append("</svg>")
    return f"<h2>{html.escape(title)}</h2>\n" + "\n".join(out)


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
        demo, log=True, ymin=1e-8, ymax=1.0, hlines=[("alpha 0.05", 0.05)]))
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
         ("average confidence", [(w.t, w.estimated_accuracy.get("avg_conf", math.nan)) for w in ws]),
         ("true accuracy (5 s bins)", true_acc)],
        demo, ymin=0, ymax=1, hlines=[(f"objective {demo.slo['accuracy']}", demo.slo["accuracy"])]))
    charts.append(_chart(
        "SLO burn rates over the display window (log scale)",
        [("availability", [(w.t, w.error_ratio / (1 - demo.slo["availability"])) for w in ws]),
         ("latency", [(w.t, w.slow_ratio / (1 - demo.slo["latency"])) for w in ws])],
        demo, log=True, ymin=0.01, ymax=1000, hlines=[("page 14.4x", 14.4), ("1x", 1.0)]))
    rows = "".join(
        f"<tr><td>{html.escape(r['phase'])}</td><td>{r['rps']:.1f}</td><td>{r['p50_ms']:.1f}</td>"
        f"<td>{r['p99_ms']:.1f}</td><td>{r['error_ratio']:.1%}</td><td>{r['estimated_accuracy']:.3f}</td>"
        f"<td>{r['true_accuracy']:.3f}</td><td>{'yes' if r['drift_alarm'] else 'no'}</td></tr>"
        for r in phase_table(demo))
    dets = "".join(
        f"<li><b>{html.escape(d.phase)}</b>: "
        + (f"detected {d.detected_s:.1f} s after it began: {html.escape(d.signal)}" if d.detected_s is not None
           else "not detected") + "</li>"
        for d in detect(demo))
    alerts = "".join(f"<li>{html.escape(str(a))}</li>" for a in tl.alerts)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>sentinel demo report</title>
<style>body{{font-family:sans-serif;max-width:820px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>sentinel demo report</h1>
<p>digits:v3 served by the kserve ModelServer, watched by the sentinel sidecar. Incident phases are shaded red.</p>
<h2>Incidents</h2><ul>{dets}</ul>
{"<h2>Prometheus alerts</h2><ul>" + alerts + "</ul>" if alerts else ""}
<h2>Phases</h2><table><tr><th>phase</th><th>rps</th><th>p50 ms</th><th>p99 ms</th><th>errors</th>
<th>est. accuracy</th><th>true accuracy</th><th>drift alarm</th></tr>{rows}</table>
{"".join(charts)}
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
