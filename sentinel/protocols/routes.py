"""Which model and protocol an inference request path names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sentinel.protocols.names import WireProtocol

RouteProtocol = WireProtocol  # one protocol-name literal: sentinel.protocols.names

_V2 = re.compile(r"/v2/models/([^/?#]+)(?:/versions/([^/?#]+))?/infer")
_V1 = re.compile(r"/v1/models/([^/:?#]+)(?:/versions/([^/:?#]+))?:predict")
_TS = re.compile(r"/predictions/([^/?#]+)(?:/([^/?#]+))?")


@dataclass(frozen=True, slots=True)
class Route:
    """An inference path: model name as it appears in the path, optional version, protocol."""

    model: str
    version: str | None
    protocol: RouteProtocol


def match(path: str) -> Route | None:
    """The route of an inference path (query string ignored), or None for other paths."""
    path = path.split("?", 1)[0]
    if path.startswith("/v2/"):
        m = _V2.fullmatch(path)
        return Route(m.group(1), m.group(2), "v2") if m else None
    if path.startswith("/v1/"):
        m = _V1.fullmatch(path)
        return Route(m.group(1), m.group(2), "v1") if m else None
    if path.startswith("/predictions/"):
        m = _TS.fullmatch(path)
        return Route(m.group(1), m.group(2), "torchserve") if m else None
    return None
