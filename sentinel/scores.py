"""Class scores: the one softmax and the one rule telling logits from probabilities (numpy only).

Every module that turns logits into probabilities (reference, drift, verify, analysis,
replay, the proxy's built-in monitor) calls `softmax` here, and every decoder that must
say whether a served output holds logits or probabilities calls `output_kind`, so a reply
is read the same way on every path.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

OutputKind = Literal["logits", "probabilities"]


def softmax(logits: np.ndarray, temperature: float = 1.0, *, dtype: type = np.float64) -> np.ndarray:
    """Softmax along the last axis of logits / temperature, computed stably, returned as `dtype`."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature != 1.0:
        z = z / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(dtype, copy=False)


def softmax_entropy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (float32, like served outputs) and their entropy, without a log per class.

    With z = logits − max and S = Σ exp z: log p = z − log S, so H = log S − Σ p·z. Computed in
    float32, which is 4–5× faster than float64 on a 1,000-class window and as precise as the
    outputs a server sends.
    """
    z = np.asarray(logits, dtype=np.float32)
    # In place where z is a fresh array: a 1,000-class window's arrays are megabytes each, and
    # every new one is paid for again in page faults (same operations, same results).
    if z is logits:
        z = z - z.max(axis=1, keepdims=True)
    else:
        z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    s = p.sum(axis=1, keepdims=True)
    p /= s
    return p, (np.log(s[:, 0]) - np.einsum("ij,ij->i", p, z)).astype(np.float64)


def is_distribution(scores: np.ndarray, atol: float = 1e-3) -> bool:
    """True when every row is non-negative, at most 1, and sums to one (within atol)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return False
    if not (s.min() >= -1e-6 and s.max() <= 1 + 1e-6):   # checked first: row sums of huge logits could overflow
        return False
    # np.allclose(row sums, 1, atol) without its per-call overhead (rtol 1e-5 of 1; NaN is never close)
    return bool((np.abs(s.sum(axis=-1) - 1.0) <= atol + 1e-5).all())


def output_kind(scores: np.ndarray, name: str = "") -> OutputKind:
    """Logits or probabilities: by the output's name when it says (prob/softmax, logit), else by value.

    Probabilities are non-negative and sum to one per row; logits almost never are.
    """
    lname = name.lower()
    if "prob" in lname or "softmax" in lname:
        return "probabilities"
    if "logit" in lname:
        return "logits"
    return "probabilities" if is_distribution(scores) else "logits"
