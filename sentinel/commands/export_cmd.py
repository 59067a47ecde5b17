"""`sentinel export` and `sentinel verify`: make an export, and check one against the reference."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

_REGISTRY = typer.Option(None, "--registry", help="Registry directory (default: config's, else ./models).")
_CONFIG = typer.Option(None, "--config", "-c", help="sentinel.yaml (default: ./sentinel.yaml if present).")


def _check_output(path: Path) -> None:
    """Refuse an output path that cannot be written, before minutes of exporting (UsageError, exit 2)."""
    import os

    from sentinel.errors import UsageError

    if path.is_dir():
        raise UsageError(f"-o {path}: is a directory; give the file to write (e.g. {path / 'model.onnx'})")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"-o {path}: {parent} is not a directory")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"-o {path}: cannot write there (permission denied, or no such directory)")


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError (or torch's "enforce fail" RuntimeError) while writing `path` into a UsageError naming it."""
    from sentinel.errors import UsageError

    try:
        yield
    except OSError as exc:
        raise UsageError(f"-o {path}: cannot write it ({exc.strerror or exc})") from None
    except RuntimeError as exc:
        if "enforce fail" not in str(exc):   # torch.jit.save's "file open" failure; anything else is not ours
            raise
        raise UsageError(f"-o {path}: cannot write it ({str(exc).splitlines()[0][:200]})") from None


def export(
    model: str | None = typer.Option(None, "--model", "-m", help="Model spec: v3, digits:v3 or digits."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    out: Path | None = typer.Option(None, "--output", "-o", help="Output file (default: in the model's directory)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="ONNX: a dynamic batch dimension (default: batch 1)."),
    int8: bool = typer.Option(False, "--int8", help="ONNX: int8 by onnxruntime static quantization (QDQ)."),
    fp16: bool = typer.Option(False, "--fp16", help="Half-precision weights and activations (ONNX or TorchScript); "
                                                  "inputs and outputs stay float32, cast inside the model."),
    calibration: str = typer.Option("golden", "--calibration", help="int8 calibration data: 'golden' or a golden set directory."),
    int8_activations: str = typer.Option("s8", "--int8-activations", help="int8 activations: s8 (S8S8, default) or u8 "
                                                                          "(U8S8, faster on x86 without VNNI)."),
    int8_format: str = typer.Option("qdq", "--int8-format", help="qdq (default) or qoperator (QLinearConv etc.)."),
    exporter: str = typer.Option("dynamo", "--exporter", help="torch.onnx exporter: dynamo (current) or legacy (TorchScript-based, faster)."),
    golden_root: Path | None = typer.Option(None, "--golden-root", help="Golden sets directory (default: config's, else ./golden_sets)."),
    register: bool | None = typer.Option(
        None, "--register/--no-register",
        help="Record the export in the model's model.yaml (default: only when the file is in the model's directory)."),
    registry: Path | None = _REGISTRY,
    config: Path | None = _CONFIG,
) -> None:
    """Export a registry model to ONNX (fp32, fp16 or int8) or TorchScript (fp32 or fp16).

    An export written into the model's directory (the default path) is recorded in its
    model.yaml with its sha256 (--no-register leaves it out); one written elsewhere leaves the
    registry untouched (--register refuses it: model.yaml records only files in its directory).
    """
    import tempfile

    from sentinel.errors import UsageError
    from sentinel.export.exporters import (
        check_format,
        default_path,
        export_onnx,
        export_torchscript,
        inside_model_directory,
        record_export,
    )
    from sentinel.registry import ExportRef, open_registry, sha256_file

    check_format(fmt, int8, fp16)
    if int8_activations not in ("s8", "u8") or int8_format not in ("qdq", "qoperator"):
        raise UsageError("--int8-activations must be s8 or u8, --int8-format qdq or qoperator")
    if exporter not in ("dynamo", "legacy"):
        raise UsageError(f"--exporter must be dynamo or legacy, got {exporter!r}")
    if not int8 and (int8_activations != "s8" or int8_format != "qdq" or calibration != "golden"):
        # were silently ignored: an fp32 export made where an int8 one was meant
        raise UsageError("--int8-activations, --int8-format and --calibration apply only with --int8")
    if int8 and calibration != "golden" and not Path(calibration).is_dir():
        raise UsageError(f"--calibration {calibration}: not a golden set directory (or 'golden' for the model's own)")
    entry = open_registry(config, registry).resolve(model)
    entry.check_weights()
    path = out or default_path(entry, fmt, int8, dynamic_batch, fp16)
    _check_output(path)
    from sentinel.registry import refuse_bundled

    refuse_bundled(path, "export")
    if register is None:
        register = inside_model_directory(entry, path)
    elif register and not inside_model_directory(entry, path):
        # model.yaml only accepts files inside the model's directory; recording another would
        # leave a manifest the registry then refuses to load.
        raise UsageError(f"--register: {path} is outside {entry.directory}; model.yaml records only files "
                         "inside the model's directory (export there, or drop --register)")

    def record(kind, precision, dynamic):  # type: ignore[no-untyped-def]
        if register:
            return record_export(entry, path, kind, precision, dynamic)
        return ExportRef(format=kind, file=str(path), sha256=sha256_file(path), precision=precision,
                         dynamic_batch=dynamic)

    if fmt == "torchscript":
        with _writing(path):
            export_torchscript(entry, path, fp16=fp16)
        ref = record("torchscript", "fp16" if fp16 else "fp32", True)
    elif fp16:
        from sentinel.export.fp16 import convert_fp16

        with tempfile.TemporaryDirectory() as tmp:
            # BatchNorms folded into convolutions in float32 by torch.onnx, then rounded once
            fp32 = export_onnx(entry, Path(tmp) / "fp32.onnx", dynamic_batch=dynamic_batch,
                               exporter=exporter)  # type: ignore[arg-type]
            with _writing(path):
                convert_fp16(fp32, path)
        ref = record("onnx", "fp16", dynamic_batch)
    elif not int8:
        with _writing(path):
            export_onnx(entry, path, dynamic_batch=dynamic_batch, exporter=exporter)  # type: ignore[arg-type]
        ref = record("onnx", "fp32", dynamic_batch)
    else:
        from sentinel.commands.replay_cmd import checked_golden
        from sentinel.export.quantize import quantize_int8
        from sentinel.golden import load_golden

        root = golden_root or _golden_root(config)
        gs = checked_golden(entry, root, None) if calibration == "golden" else load_golden(calibration)
        if calibration != "golden" and (gs.meta.model, gs.meta.version) != (entry.name, entry.version):
            raise UsageError(f"--calibration {calibration}: golden set is for {gs.meta.model}:{gs.meta.version}, "
                             f"not {entry.spec}")
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(entry, Path(tmp) / "fp32.onnx", dynamic_batch=dynamic_batch,
                               exporter=exporter)  # type: ignore[arg-type]
            quantize_int8(fp32, path, gs.inputs, activations=int8_activations,  # type: ignore[arg-type]
                          fmt=int8_format)  # type: ignore[arg-type]
        ref = record("onnx", "int8", dynamic_batch)
    where = (f"recorded in {entry.manifest_path}" if register
             else "not recorded in the registry (--no-register)" if inside_model_directory(entry, path)
             else "not recorded in the registry (outside the model's directory, which model.yaml cannot name)")
    io = ", float32 input and output" if fp16 else ""
    typer.echo(f"wrote {path} ({ref.format} {ref.precision}{io}{', dynamic batch' if ref.dynamic_batch else ''}, "
               f"sha256 {ref.sha256[:16]}…); {where}")


def verify(
    path: Path = typer.Argument(..., help="The export: an .onnx file or a TorchScript .pt file."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model spec: v3, digits:v3 or digits."),
    golden: Path | None = typer.Option(None, "--golden", help="Golden set directory (default: golden_sets/<model>/<version>)."),
    atol: float | None = typer.Option(None, "--atol", help="Absolute tolerance on logits (default by precision)."),
    rtol: float | None = typer.Option(None, "--rtol", help="Relative tolerance on logits (default by precision)."),
    min_top1: float | None = typer.Option(None, "--min-top1", help="Required top-1 agreement (default by precision)."),
    precision: str | None = typer.Option(None, "--precision", help="fp32, fp16, bf16 or int8 (default: model.yaml's record, else detected from the graph's weights)."),
    localize: str = typer.Option("auto", "--localize", help="auto (on failure), always or never."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary (exit code and --json only)."),
    golden_root: Path | None = typer.Option(None, "--golden-root", help="Golden sets directory (default: config's, else ./golden_sets)."),
    registry: Path | None = _REGISTRY,
    config: Path | None = _CONFIG,
) -> None:
    """Run an export and compare it with the reference outputs of the golden set; name the first diverging module.

    Exit 0 when it passes the policy of its precision, 1 when it does not, 2 on usage or infrastructure errors.
    """
    from sentinel.commands.replay_cmd import checked_golden
    from sentinel.errors import UsageError
    from sentinel.registry import open_registry
    from sentinel.verify.verifier import render_text, verify_export

    if localize not in ("auto", "always", "never"):
        raise UsageError(f"--localize must be auto, always or never, got {localize!r}")
    from sentinel.commands._common import check_json_target

    check_json_target(json_out)
    entry = open_registry(config, registry).resolve(model)
    gs = checked_golden(entry, golden_root or _golden_root(config), golden)
    report = verify_export(path, entry, gs, precision=precision, atol=atol, rtol=rtol, min_top1=min_top1,
                           localize=localize)  # type: ignore[arg-type]
    from sentinel.commands._common import write_json_report

    write_json_report(report.doc, json_out)
    if not quiet and str(json_out) != "-":
        typer.echo(render_text(report))
    if not report.passed:
        raise typer.Exit(1)


def _golden_root(config: Path | None) -> Path:
    from sentinel.config import load_config

    path = config or (Path("sentinel.yaml") if Path("sentinel.yaml").is_file() else None)
    if path is None:
        return Path("golden_sets")
    cfg = load_config(path)
    return cfg.resolve(cfg.golden_sets)


def register(app: typer.Typer) -> None:
    """Add `export` and `verify` to the root app."""
    app.command("export")(export)
    app.command("verify")(verify)
