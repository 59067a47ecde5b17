"""The monitor used until `sentinel.analysis.monitor` exists: class counts and confidence only."""

from __future__ import annotations

import numpy as np

from sentinel import metricnames as mn
from sentinel.metricnames import MAX_CLASS_LABELS
from sentinel.scores import softmax


class BuiltinMonitor:
    """Counts predicted classes and observes max-softmax confidence; numpy only."""

    def __init__(self, model: str):
        self.model = model
        self.batches = 0
        self.predictions = 0
        self.last_mean_confidence: float | None = None

    def observe(self, batch) -> list:
        from sentinel.analysis.contract import MetricUpdate

        self.batches += 1
        if batch.outputs is None:
            return []
        scores = np.asarray(batch.outputs, dtype=np.float64)
        probs = softmax(scores) if batch.output_kind == "logits" else scores
        conf = probs.max(axis=1)
        cls = probs.argmax(axis=1)
        self.predictions += len(cls)
        self.last_mean_confidence = float(conf.mean())
        out = []
        for c, n in zip(*np.unique(cls, return_counts=True), strict=False):
            label = str(int(c)) if c < MAX_CLASS_LABELS else "other"
            out.append(MetricUpdate(mn.PREDICTIONS.name, {"model": self.model, "class": label}, "inc", float(n)))
        for v in conf:
            out.append(MetricUpdate(mn.PREDICTION_CONFIDENCE.name, {"model": self.model}, "observe", float(v)))
        return out

    def status(self) -> dict:
        return {"monitor": "builtin", "batches": self.batches, "predictions": self.predictions,
                "mean_confidence": self.last_mean_confidence}


def build_builtin(config, model_config) -> BuiltinMonitor:
    return BuiltinMonitor(model_config.name)
