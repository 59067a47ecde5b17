"""`sentinel run`: the sidecar daemon (reverse proxy, /metrics, sampling, ingest)."""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    config: Path = typer.Option(Path("sentinel.yaml"), "--config", "-c", help="Path to sentinel.yaml."),
    listen: str | None = typer.Option(None, "--listen", help="Proxy address host:port (overrides the file)."),
    upstream: str | None = typer.Option(None, "--upstream", help="Model server URL (overrides the file)."),
    admin: str | None = typer.Option(None, "--admin", help="Admin address host:port (overrides the file)."),
    grpc_listen: str | None = typer.Option(None, "--grpc-listen",
                                           help="gRPC listener host:port for OIP v2 over gRPC (overrides the file)."),
    grpc_upstream: str | None = typer.Option(None, "--grpc-upstream",
                                             help="The model server's gRPC host:port (overrides the file)."),
) -> None:
    """Proxy inference traffic to the model server, measure it, sample it, serve /metrics."""
    import logging

    from sentinel.config import load_config
    from sentinel.proxy.sidecar import run as run_sidecar

    cfg = load_config(config).with_overrides(listen=listen, upstream=upstream, admin=admin,
                                             grpc_listen=grpc_listen, grpc_upstream=grpc_upstream)
    level = getattr(logging, cfg.log_level.upper())
    root = logging.getLogger()
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_sidecar(cfg)


def register(app: typer.Typer) -> None:
    """Add `sentinel run` to the root app."""
    app.command("run")(run)
