"""`sentinel replay`: replay a golden set against an endpoint; latency, agreement, objectives."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def replay(
    model: str | None = typer.Option(None, "--model", "-m", help="Model spec: v3, digits:v3 or digits."),
    target: str | None = typer.Option(None, "--target", "-t",
                                         help="Base URL of the model server (default: the model's endpoint in sentinel.yaml)."),
    protocol: str | None = typer.Option(None, "--protocol", help="v2, v1, torchserve, or grpc (OIP v2 ModelInfer; --target host:port, default the config's "
                                                "grpc_upstream) (default: config's, else model.yaml's)."),
    binary: bool = typer.Option(False, "--binary", help="v2: use the binary tensor extension."),
    rate: float | None = typer.Option(None, "--rate", "-r",
                                         help="Open loop: requests per second; latency from the intended send time. Default 20."),
    concurrency: int | None = typer.Option(None, "--concurrency", help="Closed loop: this many requests in flight."),
    count: int | None = typer.Option(None, "--count", "-n", help="Requests to send (default: one per golden sample)."),
    duration: float | None = typer.Option(None, "--duration", "-d", help="Or: send for this many seconds."),
    connections: int = typer.Option(64, "--connections", help="Open loop: keep-alive connections (the in-flight limit)."),
    timeout: float = typer.Option(30.0, "--timeout", help="Per-request timeout, seconds."),
    p99_ms: float | None = typer.Option(None, "--p99-ms", help="Objective: corrected P99 latency at most this (ms)."),
    min_agreement: float | None = typer.Option(
        None, "--min-agreement", help="Objective: fraction of answers agreeing with the reference "
                                      "(default: the golden set's min_top1_agreement)."),
    max_error_ratio: float | None = typer.Option(
        None, "--max-error-ratio", help="Objective: failed / sent at most this (default: the --slo availability "
                                        "objective, else 0: any failed request fails the run)."),
    slo: Path | None = typer.Option(None, "--slo", help="Objectives from an SLO file's availability, latency and "
                                                           "agreement SLOs for this model (flags win)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    pushgateway: str | None = typer.Option(None, "--pushgateway", help="Push the run's metrics to this Pushgateway URL."),
    golden: Path | None = typer.Option(None, "--golden", help="Golden set directory (default: golden_sets/<model>/<version>)."),
    samples: int | None = typer.Option(None, "--samples", help="Use only the first N golden samples."),
    send: str = typer.Option("auto", "--send", help="auto, raw or inputs: which form of the golden inputs to send."),
    header: list[str] = typer.Option([], "--header", "-H", help="Extra request header 'Name: value' (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary (exit code and --json only)."),
    registry: Path | None = typer.Option(None, "--registry", help="Registry directory."),
    config: Path | None = typer.Option(None, "--config", "-c", help="sentinel.yaml (default: ./sentinel.yaml if present)."),
) -> None:
    """Replay the golden set against a model server: latency percentiles (corrected for coordinated
    omission), agreement with the reference, objectives.

    Exit 0 when every objective is met, 1 when one is missed (by default any failed request is
    one), 2 on usage or infrastructure errors, 130 after Ctrl-C (the report of what finished,
    marked interrupted, is still printed and written).
    """
    from sentinel.errors import UsageError
    from sentinel.registry import open_registry
    from sentinel.replay.report import Objectives, render_text
    from sentinel.replay.runner import LoadPlan
    from sentinel.replay.session import ReplaySpec, run_replay
    from sentinel.replay.wire import PROTOCOLS

    if protocol is not None and protocol not in (*PROTOCOLS, "grpc"):
        raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)} or grpc, got {protocol!r}")
    if send not in ("auto", "raw", "inputs"):
        raise UsageError(f"--send must be auto, raw or inputs, got {send!r}")
    from sentinel.commands._common import check_json_target

    check_json_target(json_out)   # before the run, whose report would otherwise be lost
    headers = []
    for h in header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header must look like 'Name: value', got {h!r}")
        headers.append((name.strip(), value.strip()))
    if binary and protocol not in (None, "v2", "grpc"):
        raise UsageError("--binary is the v2 binary tensor extension; it needs --protocol v2")

    entry = open_registry(config, registry).resolve(model)
    cfg, model_cfg = _config_for(config, entry.name)
    golden_root = cfg.resolve(cfg.golden_sets) if cfg is not None else Path("golden_sets")
    gs = checked_golden(entry, golden_root, golden)
    if target is None and protocol == "grpc":
        if cfg is None or cfg.grpc_upstream is None:
            raise UsageError("--protocol grpc needs --target host:port, or grpc_upstream in a sentinel.yaml")
        target = cfg.grpc_upstream
    if target is None:
        if model_cfg is None:
            raise UsageError(f"no --target given and no endpoint for model {entry.name!r} in a sentinel.yaml")
        target = model_cfg.endpoint
    proto = protocol or (model_cfg.protocol if model_cfg is not None else entry.manifest.served.protocol)
    path_name = model_cfg.path_name if model_cfg is not None else entry.manifest.served.name
    if rate is None and concurrency is None:
        rate = 20.0
    plan = LoadPlan(rate=rate, concurrency=concurrency, count=count, duration_s=duration,
                    connections=connections, timeout_s=timeout)
    objectives = Objectives(p99_ms=p99_ms, min_agreement=min_agreement, max_error_ratio=max_error_ratio)
    if slo is not None:
        from sentinel.replay.report import objectives_from_slo

        objectives = objectives_from_slo(str(slo), entry.name, entry.spec, objectives)
    spec = ReplaySpec(target=target.rstrip("/"), protocol=proto, model_path_name=path_name,  # type: ignore[arg-type]
                      binary=binary and proto == "v2", send=send, headers=tuple(headers),  # type: ignore[arg-type]
                      samples=samples)

    metrics = observer = None
    if pushgateway:
        from prometheus_client import CollectorRegistry

        from sentinel.replay.push import ReplayMetrics

        prom = CollectorRegistry()
        metrics = ReplayMetrics(prom)
        tol = gs.meta.tolerance

        def observer(o):  # noqa: ANN001 - Outcome
            metrics.observe(entry.name, o, None if o.comparison is None else o.comparison.agrees(tol))

    show_progress = not quiet and sys.stderr.isatty()
    if show_progress:
        report = _with_progress(lambda progress: run_replay(entry, gs, spec, plan, objectives,
                                                            observer=observer, progress=progress))
    else:
        report = run_replay(entry, gs, spec, plan, objectives, observer=observer)

    from sentinel.commands._common import write_json_report

    write_json_report(report.doc, json_out)
    if not quiet and str(json_out) != "-":
        typer.echo(render_text(report))
    if pushgateway and metrics is not None:
        from sentinel.replay.push import push

        push(pushgateway, prom, entry.name)
    if report.doc.get("interrupted"):
        typer.echo("replay interrupted: the report covers the requests that finished", err=True)
        raise typer.Exit(130)
    if not report.passed:
        for o in report.missed:
            typer.echo(f"objective missed: {o.message}", err=True)
        raise typer.Exit(1)


def checked_golden(entry, root: Path, path: Path | None):
    """The model's golden set, verified; a failed check is an infrastructure error (exit 2), not a finding."""
    from sentinel.errors import InfrastructureError, IntegrityError
    from sentinel.golden import golden_for

    try:
        return golden_for(entry, root, path)
    except IntegrityError as exc:
        raise InfrastructureError(str(exc)) from None


def _config_for(config: Path | None, name: str):
    """The parsed sentinel.yaml (explicit, else ./sentinel.yaml if present) and the model's entry in it."""
    from sentinel.config import load_config

    path = config or (Path("sentinel.yaml") if Path("sentinel.yaml").is_file() else None)
    if path is None:
        return None, None
    cfg = load_config(path)
    for m in cfg.models:
        if m.name == name:
            return cfg, m
    return cfg, None


def _with_progress(run):
    """Run with a rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("replay", total=None)

        def progress(done: int, total: int) -> None:
            # Refreshing the bar costs time; every 1% is plenty.
            if total and (done % max(1, total // 100) == 0 or done == total):
                bar.update(task, completed=done, total=total)

        return run(progress)


def register(app: typer.Typer) -> None:
    """Add `replay` to the root app."""
    app.command("replay")(replay)
