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
    """Read tensors from a safetensors file or a weights-only torch checkpoint."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: weights file not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"{p}: not a valid safetensors file ({exc})") from None
    import pickle

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{p}: refused: this checkpoint needs unrestricted unpickling, which can run arbitrary code "
            f"({str(exc).splitlines()[0] if str(exc) else 'unsupported global'}). "
            "Convert it to safetensors, or save only the state_dict."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"{p}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: expected a mapping of parameter names to tensors")
    return dict(obj)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights strictly: every key present, none extra, every shape equal."""
    state = remap_legacy_keys(read_state_dict(path))
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
