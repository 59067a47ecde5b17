"""The reference DenseNet: torchvision-compatible architecture, safe weight loading, runtime.

Importing this package imports torch.
"""

from __future__ import annotations

from sentinel.reference.densenet import (
    ARCHS,
    DenseNet,
    DenseNetConfig,
    build_densenet,
    count_parameters,
    resolve_config,
)
from sentinel.reference.runtime import ReferenceModel, select_device, set_deterministic
from sentinel.reference.weights import load_weights, read_state_dict, remap_legacy_keys, save_weights

__all__ = [
    "ARCHS",
    "DenseNet",
    "DenseNetConfig",
    "ReferenceModel",
    "build_densenet",
    "count_parameters",
    "load_weights",
    "read_state_dict",
    "remap_legacy_keys",
    "resolve_config",
    "save_weights",
    "select_device",
    "set_deterministic",
]
