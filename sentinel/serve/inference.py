"""The served computation: decode the input's form, preprocess, run the DenseNet, softmax."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sentinel.registry import ModelEntry


class BadInput(ValueError):
    """An input tensor the model cannot take (answered with HTTP 400)."""


@dataclass(frozen=True)
class Prediction:
    """Outputs for a batch."""

    logits: np.ndarray         # N × classes float32
    probabilities: np.ndarray  # N × classes float32


class Predictor:
    """A registry model on CPU/GPU that accepts raw or network-shaped batches."""

    def __init__(self, entry: ModelEntry, *, skip_normalization: bool = False, device: str | None = None):
        self.entry = entry
        self.skip_normalization = skip_normalization
        self.net_shape = tuple(entry.manifest.input.shape)
        raw = entry.manifest.raw_input
        self.raw_shape = tuple(raw.shape) if raw is not None else None
        self.reference = entry.reference(device=device)

    def to_network(self, x: np.ndarray) -> np.ndarray:
        """A batch in the network's layout: raw inputs (model.yaml raw_input) are preprocessed here."""
        x = np.asarray(x)
        # Raw first: a raw batch is what a real client sends, and a skipped normalization
        # must show even when raw and network shapes coincide.
        if self.raw_shape is not None:
            if x.shape == self.raw_shape:
                x = x[None]
            if x.shape[1:] == self.raw_shape:
                pre = self.entry.manifest.preprocessing
                return pre.apply(x.astype(np.float32), normalize=not self.skip_normalization)
        if x.shape == self.net_shape:
            x = x[None]
        if x.shape[1:] == self.net_shape:
            return np.ascontiguousarray(x, dtype=np.float32)
        expected = f"N×{'×'.join(map(str, self.net_shape))}"
        if self.raw_shape is not None:
            expected = f"N×{'×'.join(map(str, self.raw_shape))} (raw) or {expected}"
        raise BadInput(f"input shape {list(x.shape)} does not fit {self.entry.spec}: expected {expected}")

    def predict(self, x: np.ndarray) -> Prediction:
        net = self.to_network(x)
        if not np.isfinite(net).all():
            # else the answer is NaN probabilities, which OIP v2 JSON writes as null in an FP32 tensor
            raise BadInput(f"input holds NaN or infinite values; {self.entry.spec} takes finite numbers")
        out = self.reference.run(net, embeddings=False)
        return Prediction(out.logits, out.probabilities)
