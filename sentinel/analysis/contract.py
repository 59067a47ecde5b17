"""The seam between the sidecar (decoding, worker process) and the analysis (monitors).

The sidecar decodes sampled request/response pairs into `DecodedBatch` values and hands
them to a `ModelMonitor` running in the analysis process; the monitor returns
`MetricUpdate` values, which travel back to the daemon's main process and are applied to
its Prometheus registry there. Both types are plain picklable values; neither side does
I/O through the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

InputForm = Literal["raw", "network"]       # raw: as model.yaml's raw_input; network: N×C×H×W
OutputKind = Literal["logits", "probabilities"]
Op = Literal["set", "inc", "observe"]


@dataclass(frozen=True)
class DecodedBatch:
    """Arrays decoded from one sampled request/response (or one joined CloudEvent pair)."""

    model: str                              # model name as configured (not the path name)
    inputs: np.ndarray | None = None        # batch-first; None when the request did not decode
    input_form: InputForm | None = None
    outputs: np.ndarray | None = None       # N × classes; None when the response did not decode
    output_kind: OutputKind | None = None
    source: Literal["proxy", "ingest", "replay"] = "proxy"
    request_id: str | None = None
    timestamp: float = 0.0


@dataclass(frozen=True)
class MetricUpdate:
    """One change to a metric in sentinel.metricnames (by MetricSpec.name)."""

    metric: str
    labels: dict[str, str] = field(default_factory=dict)
    op: Op = "set"
    value: float = 0.0


class Monitor(Protocol):
    """What the analysis process calls for each decoded batch of one model."""

    def observe(self, batch: DecodedBatch) -> list[MetricUpdate]: ...

    def status(self) -> dict: ...
