"""Loading and saving reference weights safely.

Weights come from safetensors files, or from torch checkpoints read with
`weights_only=True`. A checkpoint that needs arbitrary unpickling is refused; nothing
is fetched from the network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sentinel.errors import WeightsError

# Pre-0.4 torchvision checkpoints name dense-layer modules `norm.1`, `conv.2`, ...
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def remap_legacy_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `...denselayerN.norm.1.weight` to `...denselayerN.norm1.weight` and strip `module.`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        m = _OLD_KEY.match(k)
        if m:
            k = m.group(1) + m.group(2)
        out[k] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file or a weights-only torch checkpoint.

    Whatever a malformed file makes the readers raise (torch's unpickler alone raises
    KeyError, IndexError, struct.error, AssertionError, ... on corrupt input) becomes a
    WeightsError that names the file; so does a file holding anything but named tensors.
    """
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: weights file not found")
    if not p.is_file():   # a FIFO or device would block the reader forever
        raise WeightsError(f"{p}: not a regular file")
    state = _read_safetensors(p) if p.suffix == ".safetensors" else _read_torch(p)
    check_tensors(state, p)
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(p)))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, and whatever torch raises on its dtypes
        raise WeightsError(f"{p}: not a valid safetensors file ({_first_line(exc)})") from None


_NESTED = ("state_dict", "model_state_dict", "model")


def _read_torch(p: Path) -> dict[str, torch.Tensor]:
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():   # e.g. "unsupported pickle protocol" on a corrupt file
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        if "GLOBAL" in detail or "global" in detail:
            raise WeightsError(
                f"{p}: refused: this checkpoint needs unrestricted unpickling, which can run arbitrary code "
                f"({detail}). {_CONVERT}") from None
        raise WeightsError(
            f"{p}: refused: this checkpoint needs unrestricted unpickling or is corrupt: the weights-only "
            f"unpickler cannot read it ({detail}). {_CONVERT}") from None
    except Exception as exc:  # noqa: BLE001 - torch's readers raise many types on corrupt bytes
        raise WeightsError(f"{p}: not a readable torch checkpoint ({_first_line(exc)})") from None
    # A training checkpoint nests the weights beside the optimizer state, epoch, ...
    for key in _NESTED:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{p}: expected a mapping of parameter names to tensors, found a {type(obj).__name__}")
    return obj


_CONVERT = ("Convert it where it was made, with code you trust: torch.save(model.state_dict(), 'weights.pt') "
            "or safetensors.torch.save_file(model.state_dict(), 'model.safetensors'), which hold only tensors.")


def _unpickler_detail(text: str) -> str:
    """The informative line of torch's weights-only error (it wraps it in boilerplate)."""
    marker = "WeightsUnpickler error:"
    if marker in text:   # torch >= 2.6: "... WeightsUnpickler error: Unsupported global: GLOBAL x.Y was not ..."
        what = text.split(marker, 1)[1].strip().split(". ", 1)[0].splitlines()[0].strip()
        if what:
            return what[:200]
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error",
              "(1)", "(2)")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(boiler):
            return line[:200]
    return "no detail"


def check_tensors(state: dict, p: Path) -> None:
    """Raise WeightsError unless `state` maps names to dense, finite, real-valued tensors."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise WeightsError(f"{p}: expected parameter names (strings) as keys, found {type(key).__name__} {key!r:.50}")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{p}: {key!r:.100} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_quantized or value.is_meta:
            raise WeightsError(f"{p}: {key!r:.100} is not a dense tensor ({value.layout}, {value.dtype})")
        if value.is_complex() or value.dtype == torch.bool:
            raise WeightsError(f"{p}: {key!r:.100} has dtype {value.dtype}; weights are real numbers")
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise WeightsError(f"{p}: {key!r:.100} contains NaN or infinite values")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights strictly: every key present, none extra, every shape equal."""
    return load_state(model, remap_legacy_keys(read_state_dict(path)), path)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Load a state dict read from `path` strictly (errors name `path`, each key and both shapes)."""
    own = model.state_dict()
    problems: list[str] = []
    for k in own:
        if k not in state:
            problems.append(f"missing key {k!r}")
    for k in state:
        if k not in own:
            problems.append(f"unexpected key {k!r}")
        elif tuple(state[k].shape) != tuple(own[k].shape):
            problems.append(f"key {k!r} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}")
        elif own[k].is_floating_point() and not state[k].is_floating_point():
            problems.append(f"key {k!r} has dtype {state[k].dtype}, the model expects floating point")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise WeightsError(f"{path}: weights do not fit the architecture: " + "; ".join(problems[:5]) + more)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Save a state dict as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
