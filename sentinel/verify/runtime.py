"""Running an export on numpy inputs: onnxruntime for ONNX, torch.jit for TorchScript."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from sentinel.errors import InfrastructureError, UsageError, WeightsError

Precision = Literal["fp32", "fp16", "int8"]


def _first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, safe for exceptions with an empty message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


class OnnxExport:
    """An ONNX file in an onnxruntime session; `with_outputs` builds one exposing intermediate values."""

    format = "onnx"

    def __init__(self, path: Path, threads: int | None = None):
        import onnx

        self.path = path
        self.threads = threads
        try:
            self.model = onnx.load(str(path))
            onnx.checker.check_model(self.model)
        except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise assorted types
            raise WeightsError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
        self.session = self._session(self.model)
        try:   # names and shapes come from the file: non-UTF-8 bytes there raise UnicodeDecodeError
            inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
            if not inputs or not outputs:
                raise WeightsError(f"{path}: the ONNX graph has no inputs or no outputs")
            inp = inputs[0]
            self.input_name = inp.name
            self.input_dtype = np.float16 if "float16" in inp.type else np.float32
            self.input_shape = tuple(inp.shape)
            self.output_names = [o.name for o in outputs]
        except (UnicodeDecodeError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"{path}: unreadable inputs or outputs in the ONNX graph ({_first_line(exc)})") from None
        b = self.input_shape[0] if self.input_shape else None
        self.fixed_batch = b if isinstance(b, int) and b > 0 else None

    def _session(self, model):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        try:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors have no common base
            raise WeightsError(f"{self.path}: onnxruntime cannot load it ({_first_line(exc)})") from None

    @property
    def precision(self) -> Precision:
        """int8 when the graph quantizes, fp16 when its input is half, else fp32."""
        if any(n.op_type in ("QuantizeLinear", "QLinearConv", "ConvInteger") for n in self.model.graph.node):
            return "int8"
        return "fp16" if self.input_dtype == np.float16 else "fp32"

    def run(self, x: np.ndarray, session=None, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """All outputs (or `names`) for a batch, split to the export's fixed batch size if it has one."""
        sess = session or self.session
        names = names or self.output_names
        step = self.fixed_batch or 16  # small batches stay in cache; 64 was no faster on 2 cores
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i in range(0, len(x), step):
            chunk = np.ascontiguousarray(x[i:i + step], dtype=self.input_dtype)
            if self.fixed_batch and len(chunk) != self.fixed_batch:
                raise UsageError(f"{self.path}: has a fixed batch of {self.fixed_batch}; "
                                 f"cannot run a batch of {len(chunk)}")
            for n, v in zip(names, sess.run(names, {self.input_name: chunk}), strict=False):
                parts[n].append(np.asarray(v, dtype=np.float32))
        return {n: np.concatenate(v) for n, v in parts.items()}

    def with_outputs(self, values: list[str]):
        """A session that also returns the named intermediate values."""
        import onnx
        from onnx import TensorProto, helper

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        have = {o.name for o in m.graph.output}
        for v in values:
            if v not in have:
                m.graph.output.append(helper.make_tensor_value_info(v, TensorProto.FLOAT, None))
        return self._session(m)


class TorchScriptExport:
    """A TorchScript file run with torch.jit on CPU."""

    format = "torchscript"
    fixed_batch = None
    precision: Precision = "fp32"

    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 - torch.jit raises RuntimeError and others
            raise WeightsError(f"{path}: not a loadable TorchScript file ({_first_line(exc)})") from None
        self.output_names = ["logits"]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), 64):
                outs.append(self.module(torch.from_numpy(np.ascontiguousarray(x[i:i + 64]))).float().numpy())
        return {"logits": np.concatenate(outs)}


def open_export(path: Path, threads: int | None = None) -> OnnxExport | TorchScriptExport:
    """Open an export by content: TorchScript files are zip archives, anything else is tried as ONNX."""
    if not path.exists():
        raise InfrastructureError(f"{path}: export not found")
    if not path.is_file():
        raise UsageError(f"{path}: is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        return TorchScriptExport(path)
    return OnnxExport(path, threads)
