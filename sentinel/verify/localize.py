"""Finding the first module whose output diverges: ONNX values ↔ DenseNet module names.

Checkpoints are module outputs in execution order: the stem, every dense layer (its k new
feature maps), every dense block (the concatenation), every transition, `features.norm5`
and `classifier`. In the ONNX graph a module's output is the output of the last node (in
topological order) that belongs to the module's scope; scopes come from node metadata
(`pkg.torch.onnx.name_scopes`, torch.onnx's dynamo exporter) or node names
(`/features/denseblock3/denselayer2/conv2/Conv`, the TorchScript-based exporter). Fused
nodes (BatchNorm folded into a convolution) don't break this: a layer, block or transition
always ends in an unfused op. The reference captures the same modules with forward hooks.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

_SKIP_OPS = {"QuantizeLinear"}  # int8 outputs; the float value before them is the module's output


@dataclass(frozen=True)
class LayerError:
    """How far one checkpoint is from the reference on the localization samples."""

    module: str
    value: str | None        # ONNX value name, None when the graph has no such scope
    max_abs: float | None
    ref_max: float | None
    rel: float | None        # max_abs / max |ref|
    diverges: bool
    problem: str | None = None   # why it diverges without a number (another shape), else None

    def as_dict(self) -> dict[str, Any]:
        f = lambda v: None if v is None else float(f"{v:.6g}")  # noqa: E731
        return {"module": self.module, "onnx_value": self.value, "max_abs": f(self.max_abs),
                "ref_max": f(self.ref_max), "rel": f(self.rel), "diverges": self.diverges,
                "problem": self.problem}


def node_scope(node: Any) -> str | None:
    """The module path a node belongs to ('' for the top level), or None when unknown."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            path = ""
            for s in scopes:
                # Module paths nest ('', 'features', 'features.denseblock1', ...); the first entry
                # that does not extend the previous one is the op's own name.
                if s == path or (s.startswith(path + ".") if path else bool(s)):
                    path = s
                elif s != "":
                    break
            return path
    if node.name.startswith("/"):
        return ".".join(node.name.strip("/").split("/")[:-1])
    return None


def checkpoint_modules(model: Any) -> list[str]:
    """Module names to compare, in execution order, for a sentinel/torchvision DenseNet."""
    names = [n for n, _ in model.features.named_children()]
    out = []
    stem = [n for n in names if not n.startswith(("denseblock", "transition", "norm5"))]
    if stem:
        out.append(f"features.{stem[-1]}")
    for n in names:
        if n.startswith("denseblock"):
            block = getattr(model.features, n)
            out += [f"features.{n}.{layer}" for layer, _ in block.named_children()]
            out.append(f"features.{n}")
        elif n.startswith("transition") or n == "norm5":
            out.append(f"features.{n}")
    out.append("classifier")
    return out


def checkpoint_names(config: Any) -> list[str]:
    """`checkpoint_modules` from a `DenseNetConfig` alone (no torch): the same names, same order."""
    out = ["features.relu0" if config.small_inputs else "features.pool0"]
    last = len(config.block_config) - 1
    for i, n in enumerate(config.block_config):
        out += [f"features.denseblock{i + 1}.denselayer{j + 1}" for j in range(n)]
        out.append(f"features.denseblock{i + 1}")
        if i != last:
            out.append(f"features.transition{i + 1}")
    return [*out, "features.norm5", "classifier"]


def onnx_values(graph: Any, modules: list[str]) -> dict[str, str]:
    """For each module, the ONNX value holding its output (modules not found are left out).

    One pass over the nodes: a node in scope `a.b.c` is the latest node of modules `a.b.c`,
    `a.b` and `a` (those that are wanted)."""
    wanted = set(modules)
    roots = {m.split(".")[0] for m in modules}
    last: dict[str, str] = {}
    scope_of: dict[str, str] = {}   # value → the scope of the node that made it
    for node in graph.node:
        scope = node_scope(node)
        if scope is None and node.input:
            # A node without a scope of its own (onnxruntime's quantizer drops the metadata of the
            # QLinearConv, QuantizeLinear... it writes) belongs where its data input came from: the
            # layer whose ReLU feeds it. Without this, a QOperator export's layers ended at that
            # ReLU and every layer "diverged" by shape.
            scope = scope_of.get(node.input[0])
        if scope is None:
            continue
        for o in node.output:
            scope_of[o] = scope
        if not scope or node.op_type in _SKIP_OPS or not node.output:
            continue
        parts = scope.split(".")
        if parts[0] not in roots:
            # a wrapper around the model (preprocessing baked in, torch.nn.Sequential): its scopes
            # read `model.features...` or `0.features...`; the model's own path starts at a root
            start = next((i for i, p in enumerate(parts) if p in roots), None)
            if start is None:
                continue
            parts = parts[start:]
        for i in range(len(parts), 0, -1):
            m = ".".join(parts[:i])
            if m in wanted:
                last[m] = node.output[0]
    # A container (a dense block) whose last node is its last child's: the container's own output
    # (the block's concatenation) lost its scope, so its value is not its output; left unmeasured
    # rather than reported as a shape "divergence" (QOperator graphs' QLinearConcat).
    return {m: last[m] for m in modules
            if m in last and not any(c.startswith(m + ".") and last[c] == last[m] for c in last)}


class _Stop(Exception):
    """Raised from a forward hook to end the reference's forward pass early."""


def capture_reference(model: Any, modules: list[str], x: np.ndarray,
                      stop: Callable[[str, np.ndarray], bool] | None = None) -> dict[str, np.ndarray]:
    """Outputs of the named modules for inputs `x`, captured with forward hooks.

    Hooks fire in execution order; when `stop(module, output)` is true the forward pass ends
    there and later modules are left out (a localization that has found its first divergence
    need not run the rest of the network).
    """
    import torch

    named = dict(model.named_modules())
    got: dict[str, np.ndarray] = {}
    handles = []

    def hook(name: str):
        def fn(_mod: Any, _inp: Any, out: Any) -> None:
            # Copy now: in-place ReLUs later in the graph would change the tensor under us.
            got[name] = out.detach().float().cpu().numpy().copy()
            if stop is not None and stop(name, got[name]):
                raise _Stop
        return fn

    for m in modules:
        if m in named:
            handles.append(named[m].register_forward_hook(hook(m)))
    try:
        with torch.inference_mode():
            model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def layer_error(module: str, value: str | None, a: np.ndarray | None, b: np.ndarray | None,
                layer_rel: float) -> LayerError:
    """One checkpoint's error: exported value `a` against reference `b` (None: not measured).

    Values of different shapes diverge: the export computes something else there (another
    architecture's widths, a wrong model), and every later checkpoint inherits it, so the
    first such checkpoint is where the export and the reference part."""
    if a is None or b is None:
        return LayerError(module, value, None, None, None, False)
    if a.shape != b.shape:
        return LayerError(module, value, None, None, None, True,
                          problem=f"shape {list(a.shape)} where the reference has {list(b.shape)}")
    bad = int(np.count_nonzero(~np.isfinite(a) & np.isfinite(b)))
    if bad:   # NaN compares false with any bound: it must diverge by itself
        return LayerError(module, value, None, None, None, True,
                          problem=f"{bad} NaN or infinite values where the reference's are finite")
    diff = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
    ref_max = float(np.max(np.abs(b))) if b.size else 0.0
    rel = diff / max(ref_max, 1e-12)
    return LayerError(module, value, diff, ref_max, rel, rel > layer_rel)


def compare_layers(modules: list[str], values: dict[str, str], exported: dict[str, np.ndarray],
                   reference: dict[str, np.ndarray], layer_rel: float) -> list[LayerError]:
    """Per checkpoint error, in execution order; a checkpoint diverges above `layer_rel`."""
    out = []
    for m in modules:
        v = values.get(m)
        out.append(layer_error(m, v, exported.get(v) if v else None, reference.get(m), layer_rel))
    return out


def first_divergence(layers: list[LayerError]) -> str | None:
    return next((l.module for l in layers if l.diverges), None)
