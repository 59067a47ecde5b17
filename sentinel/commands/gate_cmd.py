"""`sentinel gate`: judge a canary model version against its baseline from Prometheus; and its templates."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

gate_app = typer.Typer(
    help="Is the canary model version as good as the baseline? Exit 0 pass, 1 fail, 2 usage or "
         "infrastructure error, 3 inconclusive (too few samples). `sentinel gate templates` writes the "
         "Argo Rollouts and Flagger templates.",
    invoke_without_command=True,
)


@gate_app.callback()
def gate(
    ctx: typer.Context,
    prometheus: str | None = typer.Option(None, "--prometheus", help="Prometheus base URL, e.g. http://prometheus:9090."),
    model: str | None = typer.Option(None, "--model", help="Model name (the `model` label)."),
    baseline: str | None = typer.Option(None, "--baseline", help="Baseline version (the `version` target label)."),
    canary: str | None = typer.Option(None, "--canary", help="Canary version (the `version` target label)."),
    window: str = typer.Option("10m", "--window", help="Range both versions are judged over, ending now."),
    slo: Path | None = typer.Option(None, "--slo", help="SLO file: availability budget and `gate:` settings."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here ('-': stdout)."),
    timeout: float = typer.Option(120.0, "--timeout",
                                  help="Seconds the whole run may spend on Prometheus' answers (each query also "
                                       "at most 30); past it: exit 2 naming the query left unanswered."),
) -> None:
    """Judge --canary against --baseline over the last --window."""
    if ctx.invoked_subcommand is not None:
        return
    from sentinel.errors import UsageError
    from sentinel.gate import report
    from sentinel.gate.judge import run_gate

    missing = [flag for flag, value in (("--prometheus", prometheus), ("--model", model),
                                         ("--baseline", baseline), ("--canary", canary)) if not value]
    if missing:
        raise UsageError(f"sentinel gate needs {', '.join(missing)} (see `sentinel gate --help`)")
    spec = None
    if slo is not None:
        from sentinel.slo.spec import load_slo_file

        spec = load_slo_file(slo)
    assert prometheus and model and baseline and canary
    result = run_gate(prometheus, model, baseline, canary, window, spec, timeout=timeout)
    if json_out is not None and str(json_out) == "-":
        sys.stdout.write(report.to_json(result))
    else:
        typer.echo(report.text(result), nl=False)
        if json_out is not None:
            json_out.write_text(report.to_json(result), encoding="utf-8")
    raise typer.Exit(result.exit_code)


@gate_app.command("templates")
def templates(
    slo: Path | None = typer.Option(None, "--slo", help="SLO file (default: ./slo.yaml, else the example "
                                                        "shipped with sentinel)."),
    out: Path = typer.Option(Path("deploy"), "--out", "-o",
                             help="Directory to write argo/ and flagger/ under (nothing is written elsewhere)."),
    prometheus: str = typer.Option("http://prometheus-operated.monitoring:9090", "--prometheus",
                                   help="Prometheus address the templates query."),
    image: str = typer.Option("ghcr.io/sentinel-densenet/sentinel:latest", "--image",
                              help="Container image for the Argo `job` variant that runs `sentinel gate`."),
) -> None:
    """Write Argo Rollouts AnalysisTemplates and Flagger MetricTemplates + Canary analysis from the SLO file."""
    from sentinel.commands.rules_cmd import slo_or_example
    from sentinel.gate.templates import write_templates
    from sentinel.slo.spec import load_slo_file

    for path in write_templates(load_slo_file(slo_or_example(slo)), out, prometheus=prometheus, image=image):
        typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(gate_app, name="gate")
