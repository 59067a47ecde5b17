"""The reference DenseNet: torchvision-compatible architecture, safe weight loading, runtime.

Names are loaded lazily: `sentinel.reference.arch` (shapes, no torch) can be imported
without pulling in torch; everything else imports torch on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ARCHS": "arch",
    "DenseNetConfig": "arch",
    "resolve_config": "arch",
    "DenseNet": "densenet",
    "build_densenet": "densenet",
    "count_parameters": "densenet",
    "ReferenceModel": "runtime",
    "select_device": "runtime",
    "set_deterministic": "runtime",
    "load_weights": "weights",
    "read_state_dict": "weights",
    "remap_legacy_keys": "weights",
    "save_weights": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sentinel.reference.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sentinel.reference' has no attribute {name!r}")
