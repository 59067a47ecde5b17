"""The live terminal view (rich) of a running demo."""

from __future__ import annotations

import math

from rich.table import Table

from sentinel.demo.runner import Demo


def _f(v: float, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def render(demo: Demo) -> Table:
    tl = demo.timeline
    phase = demo.opts.phases[min(demo.current_phase, len(demo.opts.phases) - 1)]
    w = tl.windows[-1] if tl.windows else None
    t = Table(title=f"sentinel demo — phase {demo.current_phase + 1}/{len(demo.opts.phases)}: {phase.name}",
              show_header=False, expand=False)
    t.add_column("signal", style="bold")
    t.add_column("value")
    if w is None:
        t.add_row("waiting", "for the first scrape…")
        return t
    slo = demo.slo
    start = tl.phase_starts[-1] if tl.phase_starts else 0.0
    t.add_row("time", f"{w.t:.0f} s")
    t.add_row("request rate", f"{_f(w.rps, '.1f')} /s")
    t.add_row("latency P50 / P99", f"{_f(w.p50_ms, '.1f')} / {_f(w.p99_ms, '.1f')} ms "
              f"(SLO {slo['threshold'] * 1000:.0f} ms)")
    t.add_row("error ratio", _f(w.error_ratio, ".1%"))
    for d in sorted(w.p_values):
        alarm = "[red]ALARM[/red]" if w.alarms.get(d, 0) >= 1 else "ok"
        t.add_row(f"drift {d}", f"p={_f(w.p_values[d], '.2g')} {alarm}")
    est = w.estimated_accuracy
    t.add_row("accuracy: ATC / avg conf / true",
              f"{_f(est.get('atc', math.nan), '.3f')} / {_f(est.get('avg_conf', math.nan), '.3f')} / "
              f"{_f(tl.true_accuracy(max(start, w.t - demo.opts.window_s), w.t), '.3f')}")
    t.add_row("agreement: shadow / canary", f"{_f(w.shadow_agreement, '.3f')} / {_f(w.canary_agreement, '.3f')}")
    burn_a = w.error_ratio / (1 - slo["availability"]) if not math.isnan(w.error_ratio) else math.nan
    burn_l = w.slow_ratio / (1 - slo["latency"]) if not math.isnan(w.slow_ratio) else math.nan
    t.add_row("burn rate: availability / latency", f"{_f(burn_a, '.1f')}x / {_f(burn_l, '.1f')}x")
    t.add_row("samples", ", ".join(f"{k}={int(v)}" for k, v in sorted(w.samples.items())) or "-")
    return t
