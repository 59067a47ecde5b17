"""Names every part of sentinel shares about the wire: protocol names and the canary header.

Pure constants (no numpy), so config, routing and the proxy process import them freely.
"""

from __future__ import annotations

from typing import Literal

# The HTTP inference protocols a model endpoint speaks (config `models[].protocol`,
# model.yaml `served.protocol`, routes, replay --protocol).
WireProtocol = Literal["v2", "v1", "torchserve"]
HTTP_PROTOCOLS: tuple[WireProtocol, ...] = ("v2", "v1", "torchserve")

# Codec names the decoders dispatch on (`sentinel.protocols.codec(name)`): the HTTP ones,
# OIP v2 gRPC messages (serialized ModelInferRequest/ModelInferResponse), and "auto",
# which sniffs the protocol of each body (KServe logger CloudEvents carry none).
GRPC = "oip_v2_grpc"
AUTO = "auto"

# Requests carrying this header are the daemon's own canary: left out of traffic SLIs and drift.
CANARY_HEADER = "X-Sentinel-Canary"
