"""Running an export on numpy inputs: onnxruntime for ONNX, torch.jit for TorchScript."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sentinel.errors import InfrastructureError, UsageError, WeightsError
from sentinel.protocols.varint import read_varint

Precision = Literal["fp32", "fp16", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")

_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
              "MatMulInteger", "DynamicQuantizeLinear"}
CAST_SUFFIX = "__sentinel_fp32"

# Ops whose output is a quantized tensor: op → (index of the output scale input, of its zero point).
# QOperator graphs (onnxruntime's QLinear* ops, some in com.microsoft) carry activations as
# int8/uint8 from one op to the next; read as float, a value of 200 would be compared with a
# reference of 0.3.
_QUANTIZED_OUTPUT = {"QuantizeLinear": (1, 2), "QLinearConv": (6, 7), "QLinearMatMul": (6, 7),
                     "QLinearAdd": (6, 7), "QLinearMul": (6, 7), "QLinearConcat": (0, 1),
                     "QLinearAveragePool": (3, 4), "QLinearGlobalAveragePool": (3, 4),
                     "QLinearLeakyRelu": (3, 4), "QLinearSigmoid": (3, 4), "QLinearSoftmax": (3, 4),
                     "QGemm": (7, 8)}
# Ops that move quantized data without requantizing it (their output keeps the input's scale).
_QUANTIZED_PASS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                   "Slice", "Gather", "Split", "Resize", "Pad", "DepthToSpace", "SpaceToDepth"}


def quantization_of(graph, value: str, producers: dict | None = None) -> tuple[str, str | None] | None:
    """(scale, zero point) names when `value` holds quantized integers, else None (a float value).

    `producers` (value → node) may be passed in when asking about many values of one graph."""
    if producers is None:
        producers = {o: n for n in graph.node for o in n.output}
    for _ in range(64):   # a chain of pass-through ops back to the op that quantized
        node = producers.get(value)
        if node is None:
            return None
        if node.op_type == "DynamicQuantizeLinear":
            return (node.output[1], node.output[2]) if node.output[0] == value else None
        where = _QUANTIZED_OUTPUT.get(node.op_type)
        if where is not None:
            scale, zero = where
            if len(node.input) <= scale or not node.input[scale]:
                return None   # e.g. QGemm without an output scale answers float
            return node.input[scale], (node.input[zero] if len(node.input) > zero and node.input[zero] else None)
        if node.op_type not in _QUANTIZED_PASS or not node.input:
            return None
        value = node.input[0]
    return None


def graph_precision(model) -> Precision:
    """The precision the graph computes in, from its real types (not its inputs).

    int8 when it quantizes; otherwise the float type holding most initializer elements
    (weights): an fp16 conversion that keeps fp32 inputs and outputs is fp16.
    """
    from onnx import TensorProto

    graph = model.graph
    if any(n.op_type in _QUANT_OPS for n in graph.node):
        return "int8"
    counts = {TensorProto.FLOAT: 0, TensorProto.FLOAT16: 0, TensorProto.BFLOAT16: 0, TensorProto.DOUBLE: 0}
    for init in graph.initializer:
        if init.data_type in counts:
            n = 1
            for d in init.dims:
                n *= d
            counts[init.data_type] += n
    for node in graph.node:   # weights folded into Constant nodes count too
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.t is not None and attr.t.data_type in counts:
                    n = 1
                    for d in attr.t.dims:
                        n *= d
                    counts[attr.t.data_type] += n
    top = max(counts, key=counts.__getitem__)
    if counts[top] == 0:
        top = graph.input[0].type.tensor_type.elem_type if graph.input else TensorProto.FLOAT
    return {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}.get(top, "fp32")  # type: ignore[return-value]


def _first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, safe for exceptions with an empty message.

    TorchScript's interpreter errors open with "The following operation failed in the TorchScript
    interpreter." and a traceback: their cause is the last line, which is taken instead.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0]
    if "TorchScript interpreter" in line and len(lines) > 1:
        line = lines[-1]
        name, sep, rest = line.partition(": ")
        if sep and name.isidentifier() and name.endswith("Error"):   # "RuntimeError: ..." as torch prints it
            return f"{name}: {_clip(rest)}"
    return f"{type(exc).__name__}: {_clip(line)}"


def _dims(value_info) -> list:
    """A graph input's declared shape: sizes, dimension names, or None where neither is given."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


class OnnxExport:
    """An ONNX file run with onnxruntime.

    One session at a time, built on first use: the plain graph, or (after `instrument`) the
    graph with intermediate values exposed, cast to float32 whatever their real type, which
    then serves the plain run too, so a localizing verify builds one session, not two.

    The file's bytes are kept (unless its tensors live in external data files) and handed to
    the checker and to onnxruntime as they are, and an instrumented graph is those bytes plus
    a small serialized graph fragment (protobuf merges a repeated message field by appending),
    so a 30 MB model is never re-serialized. `model` is the parsed graph, for reading only.
    """

    format = "onnx"
    names_outputs = True   # output names are the file's own (TorchScriptExport: verify names a bare tensor)

    def __init__(self, path: Path, threads: int | None = None, spin: bool = True):
        import onnx
        from onnx import TensorProto

        self.path = path
        self.threads = threads
        self.spin = spin   # False: idle onnxruntime workers sleep instead of spinning (see _session)
        size = Path(path).stat().st_size
        if size > MAX_ONNX_FILE_BYTES:
            raise WeightsError(f"{path}: {size} bytes; an ONNX file holds at most 2 GiB (protobuf's limit), "
                               "larger models keep their tensors in external data files")
        try:
            raw: bytes | None = Path(path).read_bytes()
            self.model = onnx.load_model_from_string(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise assorted types
            raise WeightsError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
        external = _uses_external_data(self.model)
        if external:
            # before anything is read: every file inside the model's directory, sizes as declared, bounded
            # (the same check, on the same bytes, as the sidecar's shadow makes: check_onnx_file)
            try:
                tensors = list(external_tensors(raw))
            except ValueError as exc:
                raise WeightsError(f"{path}: not a valid ONNX model ({exc})") from None
            check_external_tensors(tensors, Path(path))
        try:
            if external:
                _load_external_data(self.model, Path(path).parent)
                raw = None
            onnx.checker.check_model(self.model if raw is None else raw)
        except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise assorted types
            raise WeightsError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
        graph = self.model.graph
        try:   # names come from the file: non-UTF-8 bytes there raise UnicodeDecodeError
            inits = {i.name for i in graph.initializer}
            inputs = [i for i in graph.input if i.name not in inits]
            if not inputs or not graph.output:
                raise WeightsError(f"{path}: the ONNX graph has no inputs or no outputs")
            if len(inputs) > 1:
                # onnxruntime requires every graph input; verify feeds one, the image batch. Taking the
                # first one read "takes inputs [1] per sample ... an export of another model?"
                listed = ", ".join(f"{i.name!r} {_dims(i)}" for i in inputs[:8])
                raise WeightsError(f"{path}: the graph takes {len(inputs)} inputs ({listed}"
                                   f"{', …' if len(inputs) > 8 else ''}); verify feeds one, the image batch")
            inp = inputs[0]
            elem = inp.type.tensor_type.elem_type
            self.input_name = inp.name
            self.input_shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                     for d in inp.type.tensor_type.shape.dim)
            self.output_names = [o.name for o in graph.output]
        except (UnicodeDecodeError, ValueError) as exc:
            raise WeightsError(f"{path}: unreadable inputs or outputs in the ONNX graph ({_first_line(exc)})") from None
        if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            # a file fault like any other (the checker lets an UNDEFINED or out-of-range type through)
            try:
                kind = TensorProto.DataType.Name(elem)
            except ValueError:
                kind = f"element type {elem}"
            what = "has no element type" if elem == TensorProto.UNDEFINED else f"is {kind}"
            raise WeightsError(f"{path}: input {inp.name!r} {what}; "
                               "verify feeds float32, float16 or float64 inputs")
        self.input_dtype = {TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}.get(elem, np.float32)
        b = self.input_shape[0] if self.input_shape else None
        self.fixed_batch = b if isinstance(b, int) and b > 0 else None
        self._raw = raw
        self._session_obj = None
        self.sessions_built = 0
        self.instrumented: dict[str, str] = {}   # value → float32 output name of the instrumented graph

    def _session(self, model: bytes, spin: bool | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3   # onnxruntime's own warnings (unused initializers...) are not verify's findings
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not (self.spin if spin is None else spin):
            # idle workers sleep instead of spinning: on a shared or busy machine (or beside
            # the reference loading on a thread) spinning workers burn the cores others need
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors have no common base
            raise WeightsError(f"{self.path}: onnxruntime cannot load it ({_first_line(exc)})") from None
        self.sessions_built += 1
        return sess

    @property
    def session(self):
        if self._session_obj is None:
            self._session_obj = self._session(self._bytes())
        return self._session_obj

    def _bytes(self) -> bytes:
        """The model serialized: the file's own bytes when it has no external data."""
        return self._raw if self._raw is not None else self.model.SerializeToString()

    @property
    def precision(self) -> Precision:
        """The graph's computing precision (`graph_precision`), e.g. fp16 for fp16 weights with fp32 I/O."""
        return graph_precision(self.model)

    def run(self, x: np.ndarray, session=None, names: list[str] | None = None,
            on_chunk: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> dict[str, np.ndarray]:
        """All outputs (or `names`) for a batch as float32, split to the export's fixed batch size if it has one.

        `on_chunk(start, outputs)` sees each chunk's outputs as they come (verify uses it to
        start preparing a localization as soon as a failure is certain)."""
        sess = session or self.session
        names = names or self.output_names
        step = self.fixed_batch or 16  # small batches stay in cache; 64 was no faster on 2 cores
        starts = list(range(0, len(x), step))
        if on_chunk is not None and not self.fixed_batch and len(x) > 4:
            # A small first chunk lets a certain failure show early (outputs are bit-identical
            # whatever the batch split: onnxruntime's CPU kernels compute each sample alone).
            starts = [0, *range(4, len(x), step)]
        ends = [*starts[1:], len(x)]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i, j in zip(starts, ends, strict=True):
            chunk = np.ascontiguousarray(x[i:j], dtype=self.input_dtype)
            rows = len(chunk)
            if self.fixed_batch and rows < self.fixed_batch:
                # A fixed-batch export gets a full batch: the last row repeated, its outputs dropped
                # (the golden set's size or the localization's few samples need not divide the batch).
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - rows, axis=0)])
            try:
                got = sess.run(names, {self.input_name: chunk})
            except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors have no common base
                raise WeightsError(f"{self.path}: onnxruntime failed running it on a batch of {len(chunk)} "
                                   f"({_first_line(exc)})") from None
            for n, v in zip(names, got, strict=False):
                v = np.asarray(v, dtype=np.float32)
                parts[n].append(v[:rows] if len(chunk) != rows and v.ndim and len(v) == len(chunk) else v)
            if on_chunk is not None:
                on_chunk(i, {n: v[-1] for n, v in parts.items()})
        return {n: np.concatenate(v) for n, v in parts.items()}

    def instrument(self, values: list[str], spin: bool | None = None) -> dict[str, str]:
        """Rebuild the session exposing `values`, each as float32: through a Cast (fp16 and bf16 graphs
        carry other types), or a DequantizeLinear with the value's own scale and zero point where it
        holds quantized integers (QOperator int8 graphs); returns value → output name. The plain
        outputs stay as they were."""
        import onnx
        from onnx import TensorProto, helper

        extra = onnx.ModelProto()   # only the additions: parsed after the model, they are appended to it
        mapping = {}
        producers = {o: n for n in self.model.graph.node for o in n.output}
        for v in values:
            out = v + CAST_SUFFIX
            q = quantization_of(self.model.graph, v, producers)
            if q is None:
                node = helper.make_node("Cast", [v], [out], to=TensorProto.FLOAT, name=f"sentinel_cast_{len(mapping)}")
            else:
                node = helper.make_node("DequantizeLinear", [v, q[0], *([q[1]] if q[1] else [])], [out],
                                        name=f"sentinel_dequantize_{len(mapping)}")
            extra.graph.node.append(node)
            extra.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
            mapping[v] = out
        self._session_obj = None   # free the plain session first
        self._session_obj = self._session(self._bytes() + extra.SerializeToString(), spin)
        self.instrumented = mapping
        return mapping

    def with_outputs(self, values: list[str]):
        """A session that also returns the named intermediate values (as `instrument`; kept for callers)."""
        self.instrument(values)
        return self.session


class TorchScriptExport:
    """A TorchScript file run with torch.jit on CPU."""

    format = "torchscript"
    fixed_batch = None
    precision: Precision = "fp32"
    names_outputs = False   # a bare tensor output is called `logits` by verify, not by the file

    def __init__(self, path: Path):
        import torch

        self.path = path
        check_archive_sizes(path)   # torch.jit.load allocates each record's declared size, then inflates it
        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 - torch.jit raises RuntimeError and others
            raise WeightsError(f"{path}: not a loadable TorchScript file ({_first_line(exc)})") from None
        self.output_names = ["logits"]
        self.precision, self.weight_dtype = _torchscript_precision(self.module)
        self.input_dtype = None   # float32 unless the module refuses it and its weights are half

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        parts: dict[str, list[np.ndarray]] = {}
        with torch.inference_mode():
            for i in range(0, len(x), 64):
                batch = torch.from_numpy(np.ascontiguousarray(x[i:i + 64]))
                try:
                    out = self.module(batch if self.input_dtype is None else batch.to(self.input_dtype))
                except Exception as exc:  # noqa: BLE001 - a scripted forward may raise anything
                    if i == 0 and self.input_dtype is None and self.weight_dtype is not None:
                        # a half-precision module that takes half inputs (model.half() traced as is)
                        try:
                            out = self.module(batch.to(self.weight_dtype))
                            self.input_dtype = self.weight_dtype
                        except Exception:  # noqa: BLE001 - report the float32 failure, the first one
                            out = None
                    else:
                        out = None
                    if out is None:
                        raise WeightsError(f"{self.path}: the TorchScript module failed on a batch of "
                                           f"{len(x[i:i + 64])} float32 inputs ({_first_line(exc)})") from None
                for name, t in _named_outputs(out).items():
                    if not isinstance(t, torch.Tensor):
                        raise WeightsError(f"{self.path}: output {name!r} is a {type(t).__name__}, not a tensor")
                    parts.setdefault(name, []).append(t.float().numpy())
        self.output_names = list(parts)
        return {n: np.concatenate(v) for n, v in parts.items()}


def _torchscript_precision(module) -> tuple[Precision, object]:
    """The precision a TorchScript module computes in, from its weights and graph, and the half
    dtype of its weights (None when they are float32): fp16 or bf16 weights, or int8 when the
    graph calls quantized kernels (torch.ao dynamic or static quantization); else fp32."""
    import torch

    floats = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    try:
        graph = str(module.inlined_graph)
    except Exception:  # noqa: BLE001 - a module without a graph to print: judged by its weights
        graph = ""
    if "quantized::" in graph:
        return "int8", None
    if torch.float16 in floats and torch.float32 not in floats:
        return "fp16", torch.float16
    if torch.bfloat16 in floats and torch.float32 not in floats:
        return "bf16", torch.bfloat16
    return "fp32", None


def _named_outputs(out) -> dict[str, object]:
    """A module's outputs by name: a tensor is `logits`; a tuple or list `output0`, `output1`, …;
    a dict by its keys (verify then takes `logits`, else the first of the reference's shape)."""
    if isinstance(out, dict):
        return {str(k): v for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return {f"output{i}": v for i, v in enumerate(out)}
    return {"logits": out}


MAX_ONNX_FILE_BYTES = 2 << 30        # protobuf's limit on one serialized message
MAX_EXTERNAL_DATA_BYTES = 8 << 30    # tensors in external files, all together (densenet201 fp32: 80 MB)
MAX_ARCHIVE_BYTES = 8 << 30          # a TorchScript archive's records, all together, as declared
MAX_INFLATED_BYTES = 256 << 20       # of which in compressed records (torch.jit.save stores them uncompressed)


def check_archive_sizes(path: Path) -> None:
    """Refuse a zip archive whose records would make torch.jit.load allocate unbounded memory.

    torch.jit.load reads a record by allocating the size its zip entry declares and inflating
    into it: a 1.6 MB file whose one deflated record declares 1 GiB of zeros took 1.4 GB of
    memory. torch.jit.save stores records uncompressed, so their bytes are on disk; compressed
    records (a re-zipped archive) may expand to MAX_INFLATED_BYTES in all, each stored record
    must lie within the file, and all records together at most MAX_ARCHIVE_BYTES (like an ONNX
    model's external data). Checked from the zip's central directory, before anything is read."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return   # torch.jit.load refuses it with its own reason
    size = Path(path).stat().st_size
    total = inflated = 0
    for info in infos:
        total += info.file_size
        if info.compress_type == zipfile.ZIP_STORED and info.header_offset + info.file_size > size:
            raise WeightsError(f"{path}: zip record {info.filename!r} declares {info.file_size} bytes at offset "
                               f"{info.header_offset}, past the end of the file ({size} bytes); truncated?")
        if info.compress_type != zipfile.ZIP_STORED:
            inflated += info.file_size
            if inflated > MAX_INFLATED_BYTES:
                raise WeightsError(f"{path}: compressed zip records expand to more than {MAX_INFLATED_BYTES >> 20} MiB "
                                   f"(at {info.filename!r}, {info.file_size} bytes from {info.compress_size}); "
                                   "torch.jit.save stores records uncompressed: refusing to inflate it")
        if total > MAX_ARCHIVE_BYTES:
            raise WeightsError(f"{path}: zip records declare more than {MAX_ARCHIVE_BYTES >> 30} GiB "
                               f"(at {info.filename!r}); refusing to load it")


def _all_tensors(graph):
    """Every TensorProto of a graph: initializers, sparse initializers' values and indices,
    Constant/attribute values (sparse ones too), subgraphs'."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    """Every TensorProto in the attributes of `nodes` (and of their subgraphs)."""
    from onnx import AttributeProto

    for node in nodes:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                yield a.t
            elif a.type == AttributeProto.TENSORS:
                yield from a.tensors
            elif a.type == AttributeProto.SPARSE_TENSOR:
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            elif a.type == AttributeProto.SPARSE_TENSORS:
                for sp in a.sparse_tensors:
                    yield sp.values
                    yield sp.indices
            elif a.type == AttributeProto.GRAPH:
                yield from _all_tensors(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_tensors(g)


def _model_tensors(model):
    """Every TensorProto of a model: its graph's (`_all_tensors`), its local functions' and its
    training graphs' (the places `external_tensors` walks)."""
    yield from _all_tensors(model.graph)
    for fn in model.functions:
        yield from _node_tensors(fn.node)
    for info in model.training_info:
        yield from _all_tensors(info.initialization)
        yield from _all_tensors(info.algorithm)


@dataclass(frozen=True)
class ExternalTensor:
    """What a tensor stored outside the .onnx file says about its bytes."""

    name: str
    dims: tuple[int, ...]
    data_type: int                 # TensorProto.DataType
    info: dict[str, str]           # external_data: location, offset, length, checksum


# TensorProto.DataType → bytes per element (4-bit and string types are sized as declared).
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
             16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 23: 1}


def check_external_data(graph, path: Path) -> None:
    """`check_external_tensors` on a graph parsed by the onnx package."""
    from onnx import TensorProto

    check_external_tensors((ExternalTensor(t.name, tuple(t.dims), t.data_type,
                                           {e.key: e.value for e in t.external_data})
                            for t in _all_tensors(graph) if t.data_location == TensorProto.EXTERNAL), path)


def check_onnx_file(path: Path) -> bytes:
    """The bytes of an .onnx file after the checks `verify` makes before loading one, without the
    onnx package (the sidecar's shadow has only onnxruntime): at most MAX_ONNX_FILE_BYTES, and
    every external data tensor confined and sized (`check_external_tensors`), found by walking
    the protobuf (`external_tensors`). Raises WeightsError or RegistryError naming the file."""
    size = Path(path).stat().st_size
    if size > MAX_ONNX_FILE_BYTES:
        raise WeightsError(f"{path}: {size} bytes; an ONNX file holds at most 2 GiB (protobuf's limit), "
                           "larger models keep their tensors in external data files")
    raw = Path(path).read_bytes()
    try:
        tensors = list(external_tensors(raw))
    except ValueError as exc:
        raise WeightsError(f"{path}: not a valid ONNX model ({exc})") from None
    check_external_tensors(tensors, Path(path))
    return raw


def check_external_tensors(tensors, path: Path) -> None:
    """Refuse external data that would make loading read outside the model's directory or unbounded bytes.

    Each tensor's `location` must stay in the directory of the .onnx file (symlinks resolved,
    `sentinel.registry.confined`); its bytes (`length`, else the file from `offset` on) must
    exist and match what its dims and type declare; all of them together at most
    MAX_EXTERNAL_DATA_BYTES. Checked from the manifest and file sizes, before any is read."""
    from sentinel.registry import confined

    total = 0
    for t in tensors:
        info = t.info
        where = f"{path}: tensor {t.name!r} external data location"
        file = confined(path.parent, info.get("location", ""), where)
        if not file.is_file():
            raise WeightsError(f"{path}: tensor {t.name!r}: external data file {file} is missing")
        try:
            offset, length = int(info.get("offset") or 0), int(info.get("length") or 0)
        except ValueError:
            raise WeightsError(f"{path}: tensor {t.name!r}: offset/length are not integers") from None
        available = file.stat().st_size - offset
        n = length or available
        if offset < 0 or length < 0 or n > available:
            raise WeightsError(f"{path}: tensor {t.name!r} declares {n} bytes at offset {offset} of {file}, "
                               f"which holds {file.stat().st_size}")
        count = 1
        for d in t.dims:
            count *= d
        itemsize = _ITEMSIZE.get(t.data_type)
        want = n if itemsize is None else count * itemsize   # a type not sized here: its bytes as declared
        if want != n:
            raise WeightsError(f"{path}: tensor {t.name!r} has dims {list(t.dims)} ({want} bytes) "
                               f"but its external data holds {n} bytes")
        total += n
        if total > MAX_EXTERNAL_DATA_BYTES:
            raise WeightsError(f"{path}: external data exceeds {MAX_EXTERNAL_DATA_BYTES >> 30} GiB "
                               f"(at tensor {t.name!r}); refusing to load it")


# Protobuf field numbers (onnx.proto3) leading to every TensorProto of a model.
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS = (1, 2)                     # TrainingInfoProto: initialization, algorithm
_FUNCTION_NODE = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_SPARSE_TENSORS = (1, 2)                      # SparseTensorProto: values, indices
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_T_DIMS, _T_TYPE, _T_NAME, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 13, 14
MAX_GRAPH_DEPTH = 64


def external_tensors(raw: bytes):
    """Every tensor of a serialized ModelProto stored as external data, read from the protobuf
    wire format directly (lengths checked against the buffer; graphs nested at most
    MAX_GRAPH_DEPTH deep). Raises ValueError on bytes that are not a well-formed message."""
    buf = memoryview(raw)

    def graph(a: int, b: int, depth: int):
        if depth > MAX_GRAPH_DEPTH:
            raise ValueError(f"graphs nested more than {MAX_GRAPH_DEPTH} deep")
        for num, lo, hi in _messages(buf, a, b):
            if num == _GRAPH_NODE:
                yield from node(lo, hi, depth)
            elif num == _GRAPH_INITIALIZER:
                yield from tensor(lo, hi)
            elif num == _GRAPH_SPARSE:
                yield from sparse(lo, hi)

    def node(a: int, b: int, depth: int):
        for num, lo, hi in _messages(buf, a, b):
            if num == _NODE_ATTRIBUTE:
                for n2, lo2, hi2 in _messages(buf, lo, hi):
                    if n2 in (_ATTR_T, _ATTR_TENSORS):
                        yield from tensor(lo2, hi2)
                    elif n2 in (_ATTR_G, _ATTR_GRAPHS):
                        yield from graph(lo2, hi2, depth + 1)
                    elif n2 in (_ATTR_SPARSE, _ATTR_SPARSES):
                        yield from sparse(lo2, hi2)

    def sparse(a: int, b: int):
        for num, lo, hi in _messages(buf, a, b):
            if num in _SPARSE_TENSORS:
                yield from tensor(lo, hi)

    def tensor(a: int, b: int):
        dims: list[int] = []
        data_type, name, external, info = 0, "", False, {}
        for num, wire, v, lo, hi in _fields(buf, a, b):
            if num == _T_DIMS:
                vals = [v] if wire == 0 else _packed_varints(buf, lo, hi)
                dims.extend(x - (1 << 64) if x >= 1 << 63 else x for x in vals)
            elif num == _T_TYPE and wire == 0:
                data_type = v
            elif num == _T_NAME and wire == 2:
                name = bytes(buf[lo:hi]).decode("utf-8", "replace")
            elif num == _T_LOCATION and wire == 0:
                external = v == 1
            elif num == _T_EXTERNAL and wire == 2:
                kv = {k: bytes(buf[l2:h2]).decode("utf-8", "replace") for k, l2, h2 in _messages(buf, lo, hi)}
                info[kv.get(1, "")] = kv.get(2, "")
        if external:
            yield ExternalTensor(name, tuple(dims), data_type, info)

    for num, lo, hi in _messages(buf, 0, len(buf)):
        if num == _MODEL_GRAPH:
            yield from graph(lo, hi, 0)
        elif num == _MODEL_TRAINING:
            for n2, lo2, hi2 in _messages(buf, lo, hi):
                if n2 in _TRAINING_GRAPHS:
                    yield from graph(lo2, hi2, 1)
        elif num == _MODEL_FUNCTIONS:
            for n2, lo2, hi2 in _messages(buf, lo, hi):
                if n2 == _FUNCTION_NODE:
                    yield from node(lo2, hi2, 1)


def _fields(buf: memoryview, a: int, b: int):
    """(field number, wire type, varint value, start, end) of each field of the message in buf[a:b]."""
    i = a
    while i < b:
        key, i = read_varint(buf, i, b)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = read_varint(buf, i, b)
            yield num, 0, v, i, i
            continue
        if wire == 2:
            n, i = read_varint(buf, i, b)
            lo, i = i, i + n
        elif wire in (1, 5):
            lo, i = i, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} (groups are not used by ONNX)")
        if i > b:
            raise ValueError("a field runs past the end of its message")
        yield num, wire, 0, lo, i


def _messages(buf: memoryview, a: int, b: int):
    """(field number, start, end) of each length-delimited field of the message in buf[a:b]."""
    for num, wire, _, lo, hi in _fields(buf, a, b):
        if wire == 2:
            yield num, lo, hi


def _packed_varints(buf: memoryview, a: int, b: int) -> list[int]:
    out, i = [], a
    while i < b:
        v, i = read_varint(buf, i, b)
        out.append(v)
    return out


def _uses_external_data(model) -> bool:
    """Whether any tensor of the model is stored outside the file: initializers, sparse initializers,
    Constant values, subgraphs', local functions' (`_model_tensors`). Before, sparse initializers
    and functions were not looked at, so their external data escaped `check_external_tensors`
    and was resolved by the checker and onnxruntime against the process's working directory."""
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in _model_tensors(model))


def _load_external_data(model, base_dir: Path) -> None:
    """Read every external tensor of the model into it (after `check_external_tensors`).

    onnx's `load_external_data_for_model` skips sparse initializers, whose data onnxruntime would
    then look for relative to the working directory of the process (it is given bytes, not a path)."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in _model_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(base_dir))


def open_export(path: Path, threads: int | None = None, spin: bool = True) -> OnnxExport | TorchScriptExport:
    """Open an export by content: TorchScript files are zip archives, anything else is tried as ONNX."""
    if not path.exists():
        raise InfrastructureError(f"{path}: export not found")
    if not path.is_file():
        raise UsageError(f"{path}: is not a file")
    with open(path, "rb") as f:
        head = f.read(10)
    magic = head[:4]
    if magic == b"PK\x03\x04":
        kind = _archive_kind(path)
        if kind == "checkpoint":
            raise WeightsError(f"{path}: is a torch.save checkpoint (a pickle), not an export; sentinel never "
                               "unpickles. Verify an ONNX or TorchScript export of it (`sentinel export`)")
        if kind == "pt2":
            raise UsageError(f"{path}: is a torch.export archive (.pt2); verify runs ONNX or TorchScript: "
                             "convert it with torch.onnx.export(exported_program, ...) first")
        if kind.startswith("zip:"):
            raise WeightsError(f"{path}: is a zip archive holding {kind[4:]!r}, not a TorchScript file; "
                               "extract it and verify that file")
        return TorchScriptExport(path)
    if not head:
        raise WeightsError(f"{path}: is empty (0 bytes), not an export")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        # a pickle protocol 2-5 header: torch.save's legacy (non-zip) format, or a plain pickle
        raise WeightsError(f"{path}: is a pickle (torch.save's legacy format?), not an export; sentinel never "
                           "unpickles. Verify an ONNX or TorchScript export of it (`sentinel export`)")
    if len(head) == 10 and head[8:10] == b'{"' and 0 < int.from_bytes(head[:8], "little") < 1 << 30:
        # safetensors: an 8-byte little-endian header length, then the JSON header
        raise WeightsError(f"{path}: is a safetensors weights file, not an export; verify runs ONNX or "
                           "TorchScript exports (`sentinel export` makes them)")
    return OnnxExport(path, threads, spin)


def _archive_kind(path: Path) -> str:
    """What a PyTorch zip archive holds, from its member names (nothing is extracted or unpickled):
    `torchscript` (code/ and constants.pkl), `pt2` (torch.export), `checkpoint` (torch.save),
    `zip:NAME` (a plain zip holding the ONNX file NAME), or `unknown` (left to torch.jit.load to refuse)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            full = z.namelist()[:100_000]
    except (zipfile.BadZipFile, OSError, ValueError):
        return "unknown"
    names = [n.split("/", 1)[-1] for n in full]
    if any(n.startswith("code/") or n == "constants.pkl" for n in names):
        return "torchscript"
    if "archive_format" in names:
        return "pt2"
    if "data.pkl" in names:
        return "checkpoint"
    onnx_files = [n for n in full if n.lower().endswith(".onnx")]
    if onnx_files:
        return "zip:" + onnx_files[0]   # an ONNX model zipped for transfer
    return "unknown"
