"""torch.onnx and TorchScript exports of a registry model (fp32, or fp16 behind a float32
interface), and recording them in model.yaml."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from sentinel.errors import InfrastructureError, UsageError
from sentinel.registry import ExportRef, ModelEntry, sha256_file

Exporter = Literal["dynamo", "legacy"]
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18
# Node metadata that records where the exporter ran (absolute source paths, line numbers of
# the calling code), not what the graph computes: dropped so the bytes depend only on the
# model, its weights and the torch version.
_UNSTABLE_NODE_METADATA = frozenset({"pkg.torch.onnx.stack_trace"})


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's export chatter (deprecation notices, progress lines) that is not ours to fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        loggers = [logging.getLogger(n) for n in ("torch", "onnxscript", "onnx_ir")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=False):
                lg.setLevel(level)


def _example(entry: ModelEntry, batch: int = 1):
    import torch

    return torch.zeros((batch, *entry.manifest.input.shape), dtype=torch.float32)


def export_onnx(entry: ModelEntry, out: Path, *, dynamic_batch: bool = False,
                exporter: Exporter = "dynamo") -> Path:
    """Export fp32 ONNX with input "input" (N×C×H×W) and output "logits" (N×classes).

    `dynamo` is torch.onnx's current exporter (torch.export, onnxscript optimizer; nodes keep
    their module scopes in metadata); `legacy` is the TorchScript-based one (faster; scopes in
    node names). Both name intermediate results so `sentinel verify` can localize divergence.
    """
    import torch

    model = entry.build_model()
    x = _example(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_torch(), torch.inference_mode(False), torch.no_grad():
            if exporter == "dynamo":
                shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
                prog = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], dynamic_shapes=shapes,
                                         opset_version=OPSET, verbose=False)
                prog.save(str(out))
            else:
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(model, (x,), str(out), dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=OPSET)
    except (RuntimeError, ValueError, TypeError) as exc:  # torch.export/onnxscript failures
        raise InfrastructureError(f"ONNX export of {entry.spec} failed: {str(exc).splitlines()[0]}") from None
    make_reproducible(out)
    return out


def make_reproducible(path: Path) -> Path:
    """Rewrite an ONNX file so that exporting the same weights with the same torch gives the same bytes.

    torch.onnx's dynamo exporter stores each node's Python stack trace (absolute paths of
    the checkout it ran in) in node metadata; those are removed, and the model and graph
    doc strings are emptied. Producer name and version (the torch build) stay: a different
    torch may legitimately produce a different graph. Module scopes (`pkg.torch.onnx.name_scopes`,
    `namespace`), which `sentinel verify` localizes with, are kept.
    """
    import onnx

    model = onnx.load(str(path))
    model.doc_string = ""

    def scrub(graph) -> None:  # type: ignore[no-untyped-def]
        graph.doc_string = ""
        for node in graph.node:
            node.doc_string = ""
            keep = [p for p in node.metadata_props if p.key not in _UNSTABLE_NODE_METADATA]
            if len(keep) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    scrub(attr.g)
                for g in attr.graphs:
                    scrub(g)

    scrub(model.graph)
    for fn in model.functions:
        fn.doc_string = ""
        for node in fn.node:
            keep = [p for p in node.metadata_props if p.key not in _UNSTABLE_NODE_METADATA]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    onnx.save(model, str(path))
    return path


def export_torchscript(entry: ModelEntry, out: Path, *, fp16: bool = False) -> Path:
    """Trace the model to TorchScript (input N×C×H×W → logits); any batch size works.

    `fp16`: weights and computation in half precision (`half_module`); the module still takes
    and returns float32 tensors, casting inside."""
    import torch

    model = entry.build_model()
    if fp16:
        model = half_module(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_torch(), torch.no_grad():
        traced = torch.jit.trace(model, _example(entry, 2), check_trace=False)
        traced.save(str(out))
    return out


def half_module(model: Any) -> Any:
    """The model in half precision behind a float32 interface: x.to(float16) → network → .to(float32).

    Each BatchNorm that follows a convolution is folded into it in float32 first (torch.fx's
    conv-bn fusion, as torch.onnx's optimizer does for the ONNX export), so only the folded
    weights are rounded: digits v3 then needs atol 0.0085 at rtol 0.01 against its reference
    (verify's fp16 policy allows 0.01), `model.half()` as it is 0.0103. Parameter names are kept."""
    import torch
    from torch.fx.experimental.optimization import fuse

    class _Float32IO(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.to(torch.float16)).to(torch.float32)

    try:
        with _quiet_torch():
            fused = fuse(model.eval(), inplace=False)
    except Exception as exc:  # noqa: BLE001 - torch.fx tracing raises assorted types
        raise InfrastructureError(f"fp16 TorchScript: folding BatchNorms into convolutions (torch.fx) failed: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return _Float32IO(fused.half()).eval()


def inside_model_directory(entry: ModelEntry, path: Path) -> bool:
    """True when `path` lies in the model's own directory (where model.yaml's files live)."""
    return Path(path).resolve().is_relative_to(entry.directory.resolve())


def record_export(entry: ModelEntry, path: Path, fmt: Literal["onnx", "torchscript"],
                  precision: Literal["fp32", "fp16", "int8"], dynamic_batch: bool) -> ExportRef:
    """Add the export to model.yaml (file relative to the model directory, with its sha256)."""
    rel = os.path.relpath(Path(path).resolve(), entry.directory.resolve())
    ref = ExportRef(format=fmt, file=rel, sha256=sha256_file(path), precision=precision, dynamic_batch=dynamic_batch)
    entry.with_export(ref)
    return ref


def default_path(entry: ModelEntry, fmt: str, int8: bool, dynamic_batch: bool, fp16: bool = False) -> Path:
    """model[.dyn][.int8|.fp16].onnx (or .pt) in the model's directory."""
    stem = "model" + (".dyn" if dynamic_batch else "") + (".int8" if int8 else ".fp16" if fp16 else "")
    return entry.directory / (stem + (".onnx" if fmt == "onnx" else ".pt"))


def check_format(fmt: str, int8: bool, fp16: bool = False) -> None:
    if fmt not in ("onnx", "torchscript"):
        raise UsageError(f"--format must be onnx or torchscript, got {fmt!r}")
    if int8 and fp16:
        raise UsageError("--fp16 and --int8 are two precisions for one export; choose one "
                         "(int8 is quantized from the fp32 graph, not from an fp16 one)")
    if int8 and fmt != "onnx":
        raise UsageError("--int8 is onnxruntime static quantization; it needs --format onnx")
