"""`sentinel serve`: a reference kserve model server with fault injection for drills and tests."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    model: str = typer.Option(None, "--model", "-m", help="Model spec: v3, digits:v3 or digits (default: config's)."),
    port: int = typer.Option(8081, "--port", "-p", help="HTTP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 for all interfaces)."),
    name: str | None = typer.Option(None, "--name", help="Model name in request paths (default: model.yaml served.name)."),
    delay_ms: float = typer.Option(0.0, "--delay-ms", help="Fault: add D ms to every inference request."),
    error_ratio: float = typer.Option(0.0, "--error-ratio", help="Fault: answer this fraction of inference requests with 500."),
    stall_after: int | None = typer.Option(None, "--stall-after", help="Fault: the N-th inference request stalls the whole server ..."),
    stall_seconds: float = typer.Option(0.0, "--stall-seconds", help="... for S seconds, once."),
    skip_normalization: bool = typer.Option(False, "--skip-normalization",
                                            help="Fault: preprocess raw inputs without mean/std normalization."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --error-ratio draw."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
    fault_admin: bool = typer.Option(False, "--fault-admin",
                                     help="Accept POST /sentinel/faults {delay_ms, error_ratio} to change faults "
                                          "at run time (drills, `sentinel demo`); off by default."),
    grpc_port: int | None = typer.Option(None, "--grpc-port",
                                         help="Also serve OIP v2 over gRPC (kserve's servicer) on this port; off by default."),
    registry: Path | None = typer.Option(None, "--registry", help="Registry directory (default: config's, else ./models)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="sentinel.yaml (default: ./sentinel.yaml if present)."),
) -> None:
    """Serve a registry model with the kserve ModelServer (v1, v2 JSON/binary, TorchServe-style route).

    Raw inputs (model.yaml raw_input) are preprocessed server-side; network-shaped inputs
    are used as they are. v2 answers outputs "probabilities" and "logits"; v1 answers
    probabilities as "predictions". SIGTERM shuts down gracefully.
    """
    from sentinel.errors import UsageError, require

    # Before any import of the server: it needs fastapi (kserve's) at module level, and a base
    # install has none of torch, kserve or fastapi; say which extra instead of a traceback.
    require("sentinel serve", "torch", "kserve", "fastapi", extra="serve")
    from sentinel.registry import open_registry
    from sentinel.serve.faults import FaultPlan
    from sentinel.serve.server import ServeOptions
    from sentinel.serve.server import serve as run_server

    plan = FaultPlan(delay_ms=delay_ms, error_ratio=error_ratio, stall_after=stall_after,
                     stall_seconds=stall_seconds, skip_normalization=skip_normalization, seed=seed)
    problems = plan.validate()
    if not 0 <= port <= 65535:
        problems.append(f"--port must be between 0 and 65535, got {port}")
    if grpc_port is not None and not 0 < grpc_port <= 65535:
        problems.append(f"--grpc-port must be between 1 and 65535, got {grpc_port}")
    if problems:
        raise UsageError("; ".join(problems))
    entry = open_registry(config, registry).resolve(model)
    entry.check_weights()
    run_server(entry, ServeOptions(host=host, port=port, name=name, faults=plan,
                                   access_log=access_log, threads=threads, fault_admin=fault_admin,
                                   grpc_port=grpc_port))


def register(app: typer.Typer) -> None:
    """Add `serve` to the root app."""
    app.command("serve")(serve)
