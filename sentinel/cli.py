"""The `sentinel` command line.

Each command group lives in its own module under `sentinel.commands` and registers
itself with `register(app)`. Those modules import nothing heavy at import time
(torch, onnxruntime, scipy load inside the commands that need them), so
`sentinel --help` and `sentinel run --help` stay fast; a test checks this.
"""

from __future__ import annotations

import logging
import sys

import typer

from sentinel import __version__
from sentinel.errors import ConfigError, SentinelError

app = typer.Typer(
    name="sentinel",
    help="Observability and SLO agent for deployed DenseNet image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

# Order here is the order in `sentinel --help`.
_COMMAND_MODULES = (
    "run_cmd",
    "serve_cmd",
    "replay_cmd",
    "export_cmd",
    "drift_cmd",
    "rules_cmd",
    "gate_cmd",
    "gpu_cmd",
    "models_cmd",
    "golden_cmd",
    "config_cmd",
    "demo_cmd",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sentinel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _register_all() -> None:
    import importlib

    for mod in _COMMAND_MODULES:
        importlib.import_module(f"sentinel.commands.{mod}").register(app)


_register_all()


def main() -> None:
    """Console-script entry point: run the app, turning SentinelErrors into exit codes."""
    try:
        app()
    except ConfigError as exc:
        for line in exc.problems:
            typer.echo(line, err=True)
        if _state["debug"]:
            raise
        sys.exit(exc.exit_code)
    except SentinelError as exc:
        typer.echo(f"error: {exc}", err=True)
        if _state["debug"]:
            raise
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as exc:
        from sentinel.errors import missing_extra

        path = _command_path(sys.argv[1:])
        extra = missing_extra(exc, path, "serve" if path in ("sentinel serve", "sentinel demo") else None)
        if extra is None or _state["debug"]:
            raise
        typer.echo(f"error: {extra}", err=True)
        sys.exit(extra.exit_code)


def _command_path(argv: list[str]) -> str:
    """`sentinel gpu selfcheck` for argv ['gpu', 'selfcheck', '--x'], naming a failed command."""
    cmd = typer.main.get_command(app)
    words = ["sentinel"]
    for arg in argv:
        if arg.startswith("-"):
            if len(words) > 1:
                break
            continue
        sub = getattr(cmd, "commands", {}).get(arg)
        if sub is None:
            break
        cmd = sub
        words.append(arg)
    return " ".join(words)


if __name__ == "__main__":
    main()
