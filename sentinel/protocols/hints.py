"""DecodeHints for a configured model: what its config and registry entry say about its inputs."""

from __future__ import annotations

import logging
from typing import Any

from sentinel.protocols.base import DecodeHints

log = logging.getLogger("sentinel.protocols")


def hints_for(config: Any, model: Any) -> DecodeHints:
    """Hints for `model` (a ModelConfig of `config`): config fields first, then the registry entry.

    Class names are left out (the analysis needs score vectors, not a top-1 name); their
    count is kept, to find the score output among several.
    A registry that cannot be read leaves the hints at what the config says (decoding still
    works; raw octet-stream bodies are then refused with a message naming the field).
    """
    raw_shape = tuple(model.raw_input_shape) if getattr(model, "raw_input_shape", None) else None
    raw_dtype = getattr(model, "raw_input_dtype", "float32")
    input_shape = None
    num_classes = None
    layout = None
    try:
        from sentinel.registry import Registry

        entry = Registry(config.resolve(config.registry), default_model=model.name).resolve(
            f"{model.name}:{model.version}")
        man = entry.manifest
        input_shape = tuple(man.input.shape)
        num_classes = len(man.classes) or None
        layout = man.preprocessing.layout if man.preprocessing.layout in ("NHW", "NHWC", "NCHW") else None
        if raw_shape is None:
            if man.raw_input is not None:
                raw_shape, raw_dtype = tuple(man.raw_input.shape), man.raw_input.dtype
            else:
                raw_shape, raw_dtype = input_shape, man.input.dtype
    except Exception as exc:  # noqa: BLE001 - no registry entry: the config's fields are all we know
        log.info("decode hints for %s: registry entry not readable (%s); using the config only", model.name, exc)
    return DecodeHints(raw_shape=raw_shape, raw_dtype=raw_dtype, input_shape=input_shape,
                       max_image_pixels=getattr(model, "max_image_pixels", None), num_classes=num_classes,
                       raw_layout=layout)
