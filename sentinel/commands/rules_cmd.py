"""`sentinel rules` (generate, test) and `sentinel dashboards` (generate): SLOs to Prometheus and Grafana."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

rules_app = typer.Typer(help="Prometheus recording and alerting rules generated from an SLO file.",
                        no_args_is_help=True)
dashboards_app = typer.Typer(help="Grafana dashboards generated from an SLO file.", no_args_is_help=True)

_SLO = typer.Option(None, "--slo", help="SLO file (default: ./slo.yaml, else the example shipped with sentinel).")


def slo_or_example(slo: Path | None) -> Path:
    """`--slo` when given, else ./slo.yaml, else the example the package ships (a checkout's or the
    wheel's `sentinel/_bundled/slo.yaml`), so the generators work from any directory after a plain
    `pip install`; the fallback is said on stderr."""
    if slo is not None:
        return slo
    from sentinel.registry import example_file

    path = example_file("slo.yaml")
    if path != Path.cwd() / "slo.yaml":
        typer.echo(f"no ./slo.yaml: using the example SLO file {path}", err=True)
    return path


@rules_app.command("generate")
def generate(
    slo: Path | None = _SLO,
    out: Path = typer.Option(Path("rules"), "--out", "-o", help="Directory for the rule files and their tests."),
    prometheusrule: Path | None = typer.Option(
        None, "--prometheusrule",
        help="Also write the Kubernetes PrometheusRule holding the same groups to this file "
             "(e.g. deploy/k8s/prometheusrule.yaml); without it none is written."),
    no_prometheusrule: bool = typer.Option(False, "--no-prometheusrule",
                                           help="Do not write the PrometheusRule (the default; kept for scripts)."),
) -> None:
    """Write rule files and their promtool unit tests under --out, and the PrometheusRule where --prometheusrule says.

    Nothing is written outside --out unless --prometheusrule names a file.
    """
    from sentinel.slo.generate import write_rules
    from sentinel.slo.spec import load_slo_file

    spec = load_slo_file(slo_or_example(slo))
    result = write_rules(spec, out, None if no_prometheusrule else prometheusrule)
    for path in result.paths:
        typer.echo(f"wrote {path}")
    _print_pins(result.pins)


@rules_app.command("test")
def test(
    slo: Path | None = typer.Option(None, "--slo",
                                       help="Generate from this SLO file into a temporary directory and test "
                                            "that; without it, test the rules already in --rules."),
    rules: Path = typer.Option(Path("rules"), "--rules", help="Directory of generated rules (and tests/)."),
) -> None:
    """Run `promtool check rules` and `promtool test rules` on the generated rules (exit 2 without promtool)."""
    from sentinel.slo.generate import check_rules, find_promtool, test_rules, write_rules
    from sentinel.slo.spec import load_slo_file

    find_promtool()  # say so before doing any work
    with tempfile.TemporaryDirectory(prefix="sentinel-rules-") as tmp:
        rule_dir = rules
        if slo is not None:
            rule_dir = Path(tmp)
            result = write_rules(load_slo_file(slo), rule_dir, None)
            _print_pins(result.pins)
        typer.echo(check_rules(rule_dir).rstrip())
        typer.echo(test_rules(rule_dir).rstrip())


@dashboards_app.command("generate")
def dashboards_generate(
    slo: Path | None = _SLO,
    out: Path = typer.Option(Path("dashboards"), "--out", "-o", help="Directory for the dashboard JSON files."),
) -> None:
    """Write the overview, on-call and debug dashboards (Grafana JSON)."""
    from sentinel.slo.dashboards import generate_dashboards
    from sentinel.slo.generate import write_file
    from sentinel.slo.spec import load_slo_file

    spec = load_slo_file(slo_or_example(slo))
    for name, text in generate_dashboards(spec).items():
        typer.echo(f"wrote {write_file(out / name, text)}")


def _print_pins(pins) -> None:  # type: ignore[no-untyped-def]
    from sentinel.slo.durations import format_duration

    typer.echo("pinned by the generated tests (full outage -> page; page -> resolved after the outage ends):")
    for p in pins:
        typer.echo(f"  {p.model}/{p.slo} ({p.objective:.10g}): Workbook detection {p.detection_s:.0f}s, "
                   f"pages within {format_duration(p.page_within_s)}, resolves within "
                   f"{format_duration(p.reset_within_s)} (fast pair) / {format_duration(p.slow_reset_within_s)} "
                   f"(slow pair)")


def register(app: typer.Typer) -> None:
    """Add the `rules` and `dashboards` groups to the root app."""
    app.add_typer(rules_app, name="rules")
    app.add_typer(dashboards_app, name="dashboards")
