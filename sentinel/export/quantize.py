"""int8 ONNX by onnxruntime static quantization (QDQ, signed int8 activations and weights).

QDQ with S8S8 is onnxruntime's recommended start for CNNs on CPU (see ANCHORS.md); the
QOperator format once broke DenseNet's one-input Concat. Activation ranges are calibrated
on golden inputs (MinMax), so the calibration data is pinned and digest-checked too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from sentinel.errors import InfrastructureError


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, *, per_channel: bool = True,
                  batch: int | None = None, activations: Literal["s8", "u8"] = "s8",
                  fmt: Literal["qdq", "qoperator"] = "qdq") -> Path:
    """Quantize an fp32 ONNX model, calibrating on `calibration` (N×C×H×W float32).

    `activations="u8"` (U8S8) and `fmt="qoperator"` trade onnxruntime's recommended default
    for speed on x86 CPUs without VNNI, where its U8S8 kernels are the fast path
    (benchmarks/verify_bench.py measures all three).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(fp32))
    input_name = model.graph.input[0].name
    dims = model.graph.input[0].type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    step = fixed or batch or 16

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._i >= len(calibration):
                return None
            chunk = np.ascontiguousarray(calibration[self._i:self._i + step], dtype=np.float32)
            self._i += step
            if fixed and len(chunk) != fixed:
                return None
            return {input_name: chunk}

    # onnxruntime's default op list, less BatchNormalization: DenseNet's pre-activation BNs
    # (the ones not folded into a convolution) have 1-D scales that per-channel weight
    # quantization cannot take (it warns and falls back); they stay float between DQ and Q.
    ops = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - {"BatchNormalization"})
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        try:
            # Shape inference and graph clean-up first, as onnxruntime recommends before quantizing.
            quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
            quantize_static(str(prepped), str(out), _Reader(),
                            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            activation_type=QuantType.QInt8 if activations == "s8" else QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            per_channel=per_channel, op_types_to_quantize=ops,
                            # U8S8 on x86 without VNNI: the AVX2 kernels add pairs of u8·s8 products in
                            # 16 bits, which saturates with 8-bit weights; 7-bit weights cannot (as
                            # onnxruntime's quantization guide advises). Digits:v3 U8S8: top-1 98.3-98.7%
                            # with 8 bits, 99.7-100% with 7 on this machine (QDQ, QOperator).
                            reduce_range=activations == "u8")
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many unrelated types
            raise InfrastructureError(f"int8 quantization of {fp32} failed: {type(exc).__name__}: {exc}") from None
    return out
