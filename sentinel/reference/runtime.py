"""Running the reference: device choice, deterministic settings, batched inference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sentinel import scores
from sentinel.reference.densenet import DenseNet


def select_device(prefer: str | None = None) -> torch.device:
    """`prefer` when given ("cpu", "cuda", "cuda:1"), else CUDA when present, else CPU."""
    if prefer:
        dev = torch.device(prefer)
        if dev.type == "cuda" and not torch.cuda.is_available():
            from sentinel.errors import InfrastructureError

            raise InfrastructureError(f"device {prefer!r} requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_deterministic() -> None:
    """Deterministic kernels where they exist (warnings, not errors, where they don't)."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass(frozen=True)
class Outputs:
    """Reference outputs for a batch of network inputs."""

    logits: np.ndarray       # N × classes, float32
    probabilities: np.ndarray  # N × classes, float32 (softmax of logits)
    embeddings: np.ndarray   # N × embedding width, float32


class ReferenceModel:
    """A DenseNet in eval mode on a device, run in batches on numpy inputs."""

    def __init__(self, model: DenseNet, device: torch.device | str | None = None, batch_size: int = 64):
        set_deterministic()
        self.device = select_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def run(self, inputs: np.ndarray, *, embeddings: bool = True) -> Outputs:
        """Logits, probabilities and (optionally) embeddings for N×C×H×W float32 inputs."""
        x_all = np.ascontiguousarray(inputs, dtype=np.float32)
        logits, embs = [], []
        with torch.inference_mode():
            for i in range(0, len(x_all), self.batch_size):
                x = torch.from_numpy(x_all[i:i + self.batch_size]).to(self.device)
                lg, em = self.model.forward_with_embedding(x)
                logits.append(lg.float().cpu().numpy())
                if embeddings:
                    embs.append(em.float().cpu().numpy())
        lg_np = np.concatenate(logits) if logits else np.zeros((0, self.num_classes), np.float32)
        em_np = (np.concatenate(embs) if embs else np.zeros((0, self.model.embedding_width), np.float32))
        return Outputs(lg_np, softmax(lg_np), em_np)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities as float32, like served outputs (`sentinel.scores.softmax`)."""
    return scores.softmax(logits, dtype=np.float32)
