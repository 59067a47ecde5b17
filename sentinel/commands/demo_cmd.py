"""`sentinel demo`: the whole story on one machine."""

from __future__ import annotations

from pathlib import Path

import typer


def _repo_root() -> Path:
    """Where models/, golden_sets/ and slo.yaml are: the current directory, else the source
    checkout, else the copy bundled in the installed package (`sentinel.registry.data_home`)."""
    from sentinel.registry import bundled_home, source_checkout

    here = Path.cwd()
    if (here / "models").is_dir() and (here / "golden_sets").is_dir():
        return here
    return source_checkout() or bundled_home() or here


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) end the demo through its cleanup,
    which stops every child.

    A script's background job starts with SIGINT ignored, and Python then leaves it ignored;
    the default for SIGTERM and SIGHUP ends the process without cleanup. Either would leave the
    model server and the sidecar running, so all three are set here explicitly (and the children
    also get SIGTERM if the demo dies some other way: demo.processes).
    """
    import signal

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)


def demo(
    out: Path = typer.Option(Path("demo-report"), "--out", "-o", help="Folder for the report and logs."),
    scale: float = typer.Option(1.0, "--scale", help="Multiply every phase's duration (0.2 for a quick run)."),
    durations: str | None = typer.Option(
        None, "--durations",
        help="Seconds per phase, e.g. normal=35,noise=25,rotation=20,latency=25,errors=20,recovery=25."),
    rate: float = typer.Option(20.0, "--rate", help="Requests per second (open loop)."),
    prometheus: bool = typer.Option(False, "--prometheus",
                                    help="Also run a real Prometheus with the generated rules (needs the binary)."),
    live: bool = typer.Option(True, "--live/--no-live", help="Live terminal view (off when not a TTY)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Serve digits:v3, put the sidecar in front, and send phased traffic: normal, drift, latency, errors, recovery."""
    import logging
    import sys

    from sentinel.errors import require

    require("sentinel demo", "torch", "kserve", extra="serve")   # it starts `sentinel serve`

    logging.getLogger("httpx").setLevel(logging.WARNING)

    import math

    from sentinel.demo.phases import phases_from_options
    from sentinel.demo.runner import Demo, DemoOptions, timeline_json_text
    from sentinel.errors import UsageError

    phases = phases_from_options(scale, durations)
    if not math.isfinite(rate) or rate <= 0:
        raise UsageError(f"--rate must be a positive number of requests per second, got {rate:g}")
    if prometheus:
        import shutil

        if shutil.which("prometheus") is None:
            raise UsageError("--prometheus: no prometheus binary on PATH (Debian package 'prometheus')")
    opts = DemoOptions(phases=phases, out=out.resolve(), repo=_repo_root(), rate=rate, seed=seed,
                       prometheus=prometheus)
    total = sum(p.seconds for p in phases)
    typer.echo(f"sentinel demo: {len(phases)} phases, {total:.0f} s of traffic at {rate:g} rps; "
               f"report in {opts.out}/", err=True)
    show_live = live and sys.stdout.isatty()
    _stop_on_signals()
    demo_run = Demo(opts)
    try:
        demo_run.start()
        if show_live:
            from rich.live import Live

            from sentinel.demo.view import render

            with Live(render(demo_run), refresh_per_second=2, transient=False) as lv:
                demo_run.on_update = lambda d: lv.update(render(d))
                demo_run.run()
        else:
            demo_run.on_update = _progress_printer(total)
            demo_run.run()
    finally:
        demo_run.stop()
    from sentinel.demo.report import write_report
    from sentinel.demo.summary import render_text

    text = render_text(demo_run)
    (opts.out / "summary.txt").write_text(text + "\n")
    (opts.out / "timeline.json").write_text(timeline_json_text(demo_run))
    report = write_report(demo_run, opts.out)
    typer.echo(text)
    typer.echo(f"\nreport: {report}\ntimeline: {opts.out / 'timeline.json'}\nlogs: {opts.out}/*.log")


def _progress_printer(total: float):
    last = {"t": -10.0}

    def show(d) -> None:
        w = d.timeline.windows[-1]
        if w.t - last["t"] >= 10:
            last["t"] = w.t
            alarms = [k for k, v in w.alarms.items() if v >= 1]
            typer.echo(f"[{w.t:5.0f}/{total:.0f}s] {d.opts.phases[d.current_phase].name:<18} "
                       f"rps={w.rps:5.1f} p99={w.p99_ms:7.1f}ms errors={w.error_ratio:6.1%} "
                       f"atc={w.estimated_accuracy.get('atc', float('nan')):.3f} "
                       f"alarms={','.join(alarms) or '-'}", err=True)

    return show


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
