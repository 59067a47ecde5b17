"""Which model and protocol an inference request path names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

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


def request_path(target: str) -> str:
    """The decoded path of a request target: query dropped, absolute-form reduced, %XX decoded.

    Model servers (Starlette, Triton) route on the percent-decoded path and accept the
    absolute form (`http://host/v2/...`), so the proxy must see the same route they do.
    """
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        scheme, sep, rest = path.partition("://")
        if sep and scheme.lower() in ("http", "https"):
            slash = rest.find("/")
            path = rest[slash:] if slash >= 0 else "/"
    if "%" in path:
        path = unquote(path, errors="replace")
    return path


def match(path: str) -> Route | None:
    """The route of a request target (origin- or absolute-form, percent-encoded or not), or None."""
    path = request_path(path)
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
