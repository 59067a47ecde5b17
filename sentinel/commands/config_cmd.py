"""`sentinel config check FILE`: validate a configuration file."""

from __future__ import annotations

from pathlib import Path

import typer

config_app = typer.Typer(help="Validate configuration files.", no_args_is_help=True)


@config_app.command("check")
def check(file: Path = typer.Argument(..., help="Path to sentinel.yaml.")) -> None:
    """Exit 0 when FILE is valid, else 2 with each error as `FILE: field: problem`."""
    from sentinel.config import load_config

    cfg = load_config(file)
    names = ", ".join(f"{m.name}:{m.version}" for m in cfg.models)
    typer.echo(f"{file}: ok ({len(cfg.models)} model(s): {names})")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
