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
        self._model_labels = {"model": model}
        self._class_labels: dict[int, dict[str, str]] = {}   # class index → labels (at most MAX_CLASS_LABELS + 1)

    def _labels_of(self, c: int) -> dict[str, str]:
        if c >= MAX_CLASS_LABELS:
            c = MAX_CLASS_LABELS
        labels = self._class_labels.get(c)
        if labels is None:
            label = str(c) if c < MAX_CLASS_LABELS else "other"
            labels = self._class_labels[c] = {"model": self.model, "class": label}
        return labels

    def observe(self, batch) -> list:
        from sentinel.analysis.contract import MetricUpdate

        self.batches += 1
        if batch.outputs is None:
            return []
        scores = np.asarray(batch.outputs, dtype=np.float64)
        if scores.ndim == 1:
            scores = scores[None]
        finite = np.isfinite(scores).all(axis=1)
        out = []
        if not finite.all():   # rows as served: a NaN row is the model's failure, not class 0
            bad = float((~finite).sum())
            out.append(MetricUpdate(mn.DRIFT_REJECTED.name, {"model": self.model, "reason": "nonfinite_output"},
                                    "inc", bad))
            scores = scores[finite]
            if not len(scores):
                return out
        probs = softmax(scores) if batch.output_kind == "logits" else scores
        conf = probs.max(axis=1)
        cls = probs.argmax(axis=1)
        n = len(cls)
        self.predictions += n
        confs = conf.tolist()
        if n == 1:   # the usual sample: no np.unique, no reduction for one value
            self.last_mean_confidence = confs[0]
            counts: list[tuple[int, int]] = [(int(cls[0]), 1)]
        else:
            self.last_mean_confidence = float(conf.mean())
            counts = [(int(c), int(k)) for c, k in zip(*np.unique(cls, return_counts=True), strict=True)]
        out.extend(MetricUpdate(mn.PREDICTIONS.name, self._labels_of(c), "inc", float(k)) for c, k in counts)
        labels = self._model_labels
        out.extend(MetricUpdate(mn.PREDICTION_CONFIDENCE.name, labels, "observe", v) for v in confs)
        return out

    def status(self) -> dict:
        return {"monitor": "builtin", "batches": self.batches, "predictions": self.predictions,
                "mean_confidence": self.last_mean_confidence}


def build_builtin(config, model_config) -> BuiltinMonitor:
    return BuiltinMonitor(model_config.name)
