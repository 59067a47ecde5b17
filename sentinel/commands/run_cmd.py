"""`sentinel run`: the sidecar daemon (reverse proxy, /metrics, sampling, ingest)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import typer

if TYPE_CHECKING:
    from sentinel.config import Config

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def _server(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    host = "127.0.0.1" if host in _LOOPBACK else host
    return parts.scheme, host, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def override_upstream(cfg: Config, upstream: str | None) -> Config:
    """`--upstream`: move the proxy's upstream, and every model endpoint that pointed at the same server.

    The canary replays to a model's `endpoint`, and the readiness probe checks `upstream`; a
    model whose endpoint named the file's upstream server (same scheme, host and port;
    localhost and 127.0.0.1 count as one) follows the override, keeping its path. A model
    served elsewhere keeps its endpoint.
    """
    if upstream is None:
        return cfg
    import dataclasses

    old = _server(cfg.upstream)
    new = urlsplit(upstream)
    models = tuple(
        dataclasses.replace(m, endpoint=urlunsplit((new.scheme, new.netloc, urlsplit(m.endpoint).path, "", "")))
        if _server(m.endpoint) == old else m
        for m in cfg.models)
    return dataclasses.replace(cfg, models=models).with_overrides(upstream=upstream)


def run(
    config: Path = typer.Option(Path("sentinel.yaml"), "--config", "-c", help="Path to sentinel.yaml."),
    listen: str | None = typer.Option(None, "--listen", help="Proxy address host:port (overrides the file)."),
    upstream: str | None = typer.Option(
        None, "--upstream", help="Model server URL (overrides the file; model endpoints on the same server, "
                                 "which the canary replays to, move with it)."),
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

    cfg = override_upstream(load_config(config), upstream).with_overrides(
        listen=listen, admin=admin, grpc_listen=grpc_listen, grpc_upstream=grpc_upstream)
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
