"""fp16 ONNX from an fp32 export: half-precision weights and activations, float32 inputs and outputs.

The conversion works on the fp32 graph torch.onnx wrote, after its optimizer folded each
BatchNorm that follows a convolution into that convolution's weights, so the folding is done
in float32 and only its result is rounded (folding in half precision, as exporting
`model.half()` does, made digits v3 need atol 0.022 at rtol 0.01 against its reference instead
of 0.0089; verify's fp16 policy allows 0.01). Every float32 initializer and constant becomes float16, and so does every
float32 value inside the graph; a Cast after each float32 graph input and before each float32
graph output keeps the model's interface (model.yaml's `input.dtype`, what the model server and
`sentinel verify` feed) in float32. Node names and their metadata (the module scopes `sentinel
verify` localizes with) are kept.

Only operators whose float inputs and outputs share one type are converted (the ops of a
DenseNet and their usual neighbours); a graph with any other operator is refused, naming it,
rather than written half-converted. Weights beyond float16's range (±65504) are refused too.
No onnxconverter-common: only onnx (for the graph) and onnxruntime (to check the result loads
and runs on the CPU provider) are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sentinel.errors import InfrastructureError

FP16_MAX = float(np.finfo(np.float16).max)   # 65504
SUFFIX = "__fp16"   # the float16 value behind a float32 graph input or output

# Standard-domain operators whose floating-point inputs and outputs all share one type parameter
# (BatchNormalization's scale/bias/mean/var may differ from X since opset 15; fp16 is allowed for
# each), with no attribute that names a type: converting their tensors is all they need.
# Cast, Constant and ConstantOfShape carry a type in an attribute and are rewritten.
_SAME_TYPE_OPS = frozenset({
    "Abs", "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "ConvTranspose", "Div",
    "Dropout", "Elu", "Erf", "Exp", "Expand", "Flatten", "Gather", "Gemm", "GlobalAveragePool",
    "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "LeakyRelu", "Log",
    "LogSoftmax", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mul", "Neg", "Pad", "PRelu", "Reciprocal",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid", "Slice",
    "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "Transpose", "Unsqueeze",
})
_TYPED_OPS = frozenset({"Cast", "Constant", "ConstantOfShape"})


def convert_fp16(fp32: Path, out: Path) -> Path:
    """Write `out`, the fp16 conversion of the fp32 ONNX model `fp32` (float32 I/O kept), and check
    that onnxruntime's CPU provider loads and runs it. Raises InfrastructureError naming the reason."""
    import onnx

    model = onnx.load(str(fp32))
    half = to_fp16(model, str(fp32))
    try:
        onnx.checker.check_model(half, full_check=True)   # types and shapes re-inferred: a mismatch fails here
    except Exception as exc:  # noqa: BLE001 - onnx raises assorted types
        raise InfrastructureError(f"fp16 conversion of {fp32} produced an invalid graph: "
                                  f"{str(exc).strip().splitlines()[0][:300]}") from None
    data = half.SerializeToString()
    _smoke_test(data, half, str(fp32))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def to_fp16(model: Any, where: str = "the model") -> Any:
    """The fp16 conversion of an fp32 ModelProto (a new one; `model` is left as it was)."""
    import onnx
    from onnx import TensorProto, helper, shape_inference

    if model.functions:
        raise InfrastructureError(f"fp16 conversion of {where}: the graph calls local functions "
                                  f"({', '.join(f.name for f in model.functions[:3])}); export without them")
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises assorted types
        raise InfrastructureError(f"fp16 conversion of {where}: shape inference failed "
                                  f"({str(exc).strip().splitlines()[0][:300]})") from None
    g = inferred.graph
    types: dict[str, int] = {t.name: t.data_type for t in g.initializer}
    for vi in (*g.input, *g.output, *g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type

    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    unsupported = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                          for n in graph.node
                          if n.domain not in ("", "ai.onnx") or n.op_type not in _SAME_TYPE_OPS | _TYPED_OPS})
    if unsupported:
        raise InfrastructureError(f"fp16 conversion of {where}: no fp16 rule for operator(s) "
                                  f"{', '.join(unsupported)}")
    untyped = [o for n in graph.node for o in n.output if o and o not in types]
    if untyped:
        raise InfrastructureError(f"fp16 conversion of {where}: the type of value {untyped[0]!r} "
                                  "cannot be inferred")
    if any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer):
        raise InfrastructureError(f"fp16 conversion of {where}: initializers in external data files "
                                  "are not supported")

    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_half_tensor(init, f"{where}: initializer {init.name!r}"))
    for node in graph.node:
        _retype_node(node, where)
    inits = {t.name for t in graph.initializer}
    # value types recorded in the file, and initializers listed as graph inputs (older IR versions)
    for vi in (*graph.value_info, *(i for i in graph.input if i.name in inits)):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16

    # The interface stays float32: a Cast to float16 after each input, one back before each output.
    taken = {n.name for n in graph.node} | {v for n in graph.node for v in (*n.input, *n.output)}
    head, tail = [], []
    for inp in graph.input:
        if inp.name in inits or inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = _fresh(inp.name + SUFFIX, taken)
        _rename_uses(graph, inp.name, inner)
        head.append(helper.make_node("Cast", [inp.name], [inner], to=TensorProto.FLOAT16,
                                     name=_fresh(f"sentinel_fp16_cast_{inp.name}", taken)))
    for outp in graph.output:
        if outp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = _fresh(outp.name + SUFFIX, taken)
        for node in graph.node:
            node.output[:] = [inner if o == outp.name else o for o in node.output]
        _rename_uses(graph, outp.name, inner)
        for vi in graph.value_info:
            if vi.name == outp.name:
                vi.name = inner
        tail.append(helper.make_node("Cast", [inner], [outp.name], to=TensorProto.FLOAT,
                                     name=_fresh(f"sentinel_fp32_cast_{outp.name}", taken)))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return half


def _half_tensor(t: Any, where: str) -> Any:
    """A float32 TensorProto as float16 (same name), refusing finite values beyond float16's range."""
    from onnx import numpy_helper

    a = numpy_helper.to_array(t)
    finite = a[np.isfinite(a)]
    if finite.size and float(np.abs(finite).max()) > FP16_MAX:
        raise InfrastructureError(f"fp16 conversion of {where}: holds {float(np.abs(finite).max()):.6g}, "
                                  f"beyond float16's range (±{FP16_MAX:g}); it would become infinite")
    h = numpy_helper.from_array(a.astype(np.float16), t.name)
    h.doc_string = t.doc_string
    return h


def _retype_node(node: Any, where: str) -> None:
    """Rewrite the type a node names in an attribute: float32 becomes float16."""
    from onnx import AttributeProto, TensorProto, helper

    if node.op_type == "Cast":
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    elif node.op_type in ("Constant", "ConstantOfShape"):
        attrs = list(node.attribute)
        del node.attribute[:]
        for a in attrs:
            label = f"{where}: {node.op_type} {node.name or node.output[0]!r}"
            if a.type == AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_half_tensor(a.t, label))
            elif a.name in ("value_float", "value_floats"):
                vals = [a.f] if a.name == "value_float" else list(a.floats)
                t = helper.make_tensor("value", TensorProto.FLOAT, [] if a.name == "value_float" else [len(vals)], vals)
                a = helper.make_attribute("value", _half_tensor(t, label))
            node.attribute.append(a)


def _rename_uses(graph: Any, old: str, new: str) -> None:
    """Every node input named `old` now reads `new` (subgraphs, which DenseNets lack, included)."""
    from onnx import AttributeProto

    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                _rename_uses(a.g, old, new)
            for sub in a.graphs:
                _rename_uses(sub, old, new)


def _fresh(name: str, taken: set[str]) -> str:
    """`name`, or `name_1`, `name_2`, … when taken; the result is taken from now on."""
    out, i = name, 0
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    taken.add(out)
    return out


def _smoke_test(data: bytes, model: Any, where: str) -> None:
    """Load the converted model in onnxruntime (CPU provider) and run it once on zeros, so an
    export that cannot run fails here rather than in verify or in production."""
    import onnxruntime as ort
    from onnx import TensorProto

    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
             for d in inp.type.tensor_type.shape.dim]
    dtype = np.float32 if inp.type.tensor_type.elem_type == TensorProto.FLOAT else np.float16
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        sess.run(None, {inp.name: np.zeros(shape, dtype)})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors have no common base
        raise InfrastructureError(f"fp16 conversion of {where}: onnxruntime (CPU) cannot run the result "
                                  f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})") from None
