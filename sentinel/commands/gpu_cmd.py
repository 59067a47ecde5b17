"""`sentinel gpu`: NVML status, the DenseNet memory estimate, and the GPU self-check."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

gpu_app = typer.Typer(help="GPU memory: NVML status, DenseNet memory estimates, self-check.",
                      no_args_is_help=True)


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class BackendOpt(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


def _gpu_config(config: Path | None):
    from sentinel.config import GpuConfig, load_config

    if config is not None:
        return load_config(config).gpu
    default = Path("sentinel.yaml")
    return load_config(default).gpu if default.is_file() else GpuConfig()


@gpu_app.command("status")
def status(
    as_json: bool = typer.Option(False, "--json", help="Print the snapshot as JSON."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Config file (default ./sentinel.yaml if present)."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, max=300.0,
                                  help="Seconds to wait for NVML (its start-up takes seconds on many-GPU machines)."),
) -> None:
    """Print the NVML snapshot (devices, memory, utilization, processes), or why there is none."""
    import dataclasses

    from sentinel.gpu.collector import GpuCollector
    from sentinel.gpu.memory import format_bytes
    from sentinel.gpu.nvml import PynvmlBackend

    # One read, not a scrape: the daemon's per-scrape budget (0.5 s) is shorter than nvmlInit
    # on an 8-GPU machine, which would make this command fail there every time.
    gcfg = dataclasses.replace(_gpu_config(config), scrape_budget_s=timeout)
    collector = GpuCollector(None if gcfg.enabled == "off" else PynvmlBackend(), config=gcfg)
    collector.snapshot()
    st = collector.status()
    failed = bool(st["last_scrape"]["errors"])
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    elif not st["available"]:
        typer.echo(f"No GPU visible: {st['reason']}")
    else:
        typer.echo(f"NVML driver {st['driver_version']}, {len(st['devices'])} device(s)")
        for d in st["devices"]:
            m = d["memory"]
            mem = "memory unknown" if m is None else (
                f"used {format_bytes(m['used_bytes'])} / total {format_bytes(m['total_bytes'])}"
                + ("" if m["reserved_bytes"] is None else f", reserved {format_bytes(m['reserved_bytes'])}"))
            util = "" if d["utilization_ratio"] is None else f", utilization {d['utilization_ratio']:.0%}"
            typer.echo(f"  gpu {d['gpu']} {d['name'] or ''} {d['uuid']}: {mem}{util}")
            for p in d["processes"] or []:
                used = "unknown" if p["used_bytes"] is None else format_bytes(p["used_bytes"])
                typer.echo(f"    pid {p['pid']}: {used}{' (model server)' if p['attributed'] else ''}")
        procs = st["processes"]
        if procs["problem"]:
            typer.echo(f"Process attribution: {procs['problem']}\n  fix: {procs['fix']}")
        for what in st["not_reported"]:
            typer.echo(f"  not reported by this device: {what}")
    for e in st["last_scrape"]["errors"]:
        where = "" if e.get("gpu") is None else f" on GPU {e['gpu']}"
        typer.echo(f"error: NVML {e['call']}{where}: {e['detail']} ({e['kind']})", err=True)
    if failed:
        raise typer.Exit(1)


@gpu_app.command("estimate")
def estimate_cmd(
    arch: str = typer.Option("densenet121", "--arch", help="Architecture name (see `sentinel.reference`)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size."),
    res: int = typer.Option(224, "--res", min=1, help="Input height and width in pixels."),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="Activation and weight dtype."),
    train: bool = typer.Option(False, "--train", help="One training step (forward + backward) instead of inference."),
    memory_efficient: bool = typer.Option(False, "--memory-efficient",
                                          help="Training with checkpointed bottlenecks (torchvision's memory_efficient)."),
    fit_in: str | None = typer.Option(None, "--fit-in", help="Also report the largest batch fitting this memory, e.g. 16GiB."),
    backend: BackendOpt = typer.Option(BackendOpt.cuda, "--backend", help="Allocator behaviour to model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Predict DenseNet memory: weights, input, peak activations, largest batch that fits."""
    from sentinel.errors import UsageError
    from sentinel.gpu.memory import estimate, format_bytes, max_batch_that_fits, parse_bytes
    from sentinel.reference.arch import resolve_config  # shapes only: no torch

    cfg = resolve_config(arch)
    if memory_efficient and not train:
        raise UsageError("--memory-efficient applies to training only; add --train")
    try:
        budget = parse_bytes(fit_in) if fit_in is not None else None
        est = estimate(cfg, batch=batch, resolution=res, dtype=dtype.value, training=train,
                       memory_efficient=memory_efficient, backend=backend.value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = {"arch": arch, **est.to_dict()}
    if budget is not None:
        out["fit_in_bytes"] = budget
        out["max_batch"] = max_batch_that_fits(cfg, budget, resolution=res, dtype=dtype.value, training=train,
                                               memory_efficient=memory_efficient, backend=backend.value)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    mode = est.mode + (" (memory-efficient)" if est.memory_efficient else "")
    typer.echo(f"{arch} {mode}, batch {batch}, {res}×{res}, {est.dtype}, {backend.value} allocator")
    typer.echo(f"  parameters        {est.parameters:,}")
    typer.echo(f"  weights           {format_bytes(est.weights_bytes)}")
    typer.echo(f"  input             {format_bytes(est.input_bytes)}")
    typer.echo(f"  activation peak   {format_bytes(est.activation_peak_bytes)}  (in {est.peak_at})")
    typer.echo(f"  total             {format_bytes(est.total_bytes)}  (plus the CUDA context and cuDNN workspaces)")
    if budget is not None:
        typer.echo(f"  largest batch in {format_bytes(budget)}: {out['max_batch']}")


@gpu_app.command("selfcheck")
def selfcheck(
    skip_ok: bool = typer.Option(False, "--skip-ok", help="Exit 0 with 'skipped' where no GPU is visible."),
    as_json: bool = typer.Option(False, "--json", help="Also print the rows as JSON."),
) -> None:
    """Check NVML, process attribution, CUDA vs CPU outputs and the estimator on a real GPU.

    Exits 0 when every check passes, 1 when one fails, 2 when no GPU is visible
    (0 with "skipped" under --skip-ok).
    """
    from sentinel.gpu import selfcheck as sc

    try:
        rows, ok = sc.run(log=lambda s: typer.echo(s, err=True))
    except sc.NoGpu as exc:
        if skip_ok:
            typer.echo(f"skipped: {exc}")
            return
        raise
    typer.echo(sc.table(rows))
    if as_json:
        typer.echo(sc.rows_json(rows))
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(gpu_app, name="gpu")
