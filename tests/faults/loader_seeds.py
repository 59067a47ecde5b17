"""Valid seed files for the loader tests and fuzzers, and the mutations applied to them."""

from __future__ import annotations

import io
import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sentinel.errors import SentinelError, WeightsError


def state_dict():
    import torch

    g = torch.Generator().manual_seed(0)
    return {"features.conv0.weight": torch.randn(4, 1, 3, 3, generator=g),
            "features.norm0.running_mean": torch.zeros(4),
            "features.norm0.num_batches_tracked": torch.tensor(3),
            "classifier.bias": torch.randn(10, generator=g, dtype=torch.float64)}


def pt_zip() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state_dict(), buf)
    return buf.getvalue()


def pt_legacy() -> bytes:
    """The pre-1.6 torch format (torchvision's published DenseNet checkpoints use it)."""
    import torch

    buf = io.BytesIO()
    torch.save(state_dict(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def safetensors_file() -> bytes:
    from safetensors.torch import save

    return save(state_dict())


def onnx_file() -> bytes:
    """A small Gemm + Relu graph with initializers (weights inside the file)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "seed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def safetensors_with_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: truncate, flip bytes, overwrite a word, delete, duplicate, splice."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            break
        op = rng.randrange(7)
        p = rng.randrange(len(b))
        if op == 0:
            del b[rng.randrange(len(b)):]
        elif op == 1:
            b[p] ^= 1 << rng.randrange(8)
        elif op == 2:
            b[p:p + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xff" * 4, b"\x00" * 4,
                                     rng.randbytes(4)])
        elif op == 3:
            del b[p:p + rng.randint(1, 64)]
        elif op == 4:
            b[p:p] = b[p:p + rng.randint(1, 64)]
        elif op == 5:
            b[p] = rng.randrange(256)
        else:
            q = rng.randrange(len(b))
            b[p:p + 16] = b[q:q + 16]
    return bytes(b)


def expect_loaded_or_weights_error(load: Callable[[Path], object], path: Path) -> object | None:
    """A fuzzed file either loads or raises a one-line WeightsError naming it; nothing else may escape."""
    try:
        got = load(path)
    except WeightsError as exc:
        msg = str(exc)
        assert str(path) in msg and "\n" not in msg, msg
        return None
    except SentinelError as exc:
        raise AssertionError(f"{path}: {type(exc).__name__} instead of WeightsError: {exc}") from exc
    if isinstance(got, dict):   # read_state_dict: only named tensors come back
        import torch

        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in got.items())
    return got
