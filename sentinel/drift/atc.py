"""Label-free accuracy: ATC after temperature scaling, and average confidence as the baseline.

ATC (Garg et al., ICLR 2022): on labelled source data pick the threshold t at which the
fraction of scores below t equals the source error; the estimated accuracy of a target window
is the fraction of its scores at or above t. Both estimators here use probabilities after
temperature scaling (Guo et al., ICML 2017) fitted on the golden set by minimising the
negative log-likelihood of its labels.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from sentinel.drift.features import entropy, softmax, softmax_entropy


class Score(str, enum.Enum):
    """The per-sample confidence score ATC thresholds."""

    NEG_ENTROPY = "neg_entropy"          # −entropy of the scaled softmax (Garg et al.'s better variant)
    MAX_CONFIDENCE = "max_confidence"    # largest scaled softmax probability


def score(probabilities: np.ndarray, kind: Score) -> np.ndarray:
    """Per-row score of the given kind (higher means more confident)."""
    if kind is Score.NEG_ENTROPY:
        return -entropy(probabilities)
    top: np.ndarray = np.asarray(probabilities, dtype=np.float64).max(axis=1)
    return top


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T in [0.05, 20] minimising the NLL of softmax(logits / T) on labelled data."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        lse = np.log(np.exp(s).sum(axis=1))
        return float((lse - s[np.arange(len(y)), y]).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


def fit_threshold(scores: np.ndarray, correct: np.ndarray) -> float:
    """Threshold t with #{scores < t} / n equal to the error rate (rounded to whole samples)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = int(round((1.0 - float(np.mean(correct))) * len(s)))
    return float(s[k]) if k < len(s) else float(np.inf)


@dataclass(frozen=True)
class AccuracyEstimator:
    """ATC and average-confidence estimates fitted on one labelled golden set."""

    temperature: float
    threshold: float                 # ATC threshold on `score_kind` of the scaled softmax
    score_kind: Score
    confidence_threshold: float      # ATC threshold on the unscaled max softmax (a histogram bucket bound)
    source_accuracy: float

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, kind: Score = Score.NEG_ENTROPY) -> AccuracyEstimator:
        """Fit temperature and thresholds on golden logits (or log-probabilities) and labels."""
        z = np.asarray(logits, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        correct = z.argmax(axis=1) == y
        t = fit_temperature(z, y)
        p, ent = softmax_entropy(z / t)          # the same computation `estimate` applies to windows
        thr = fit_threshold(-ent if kind is Score.NEG_ENTROPY else p.max(axis=1).astype(np.float64), correct)
        conf_thr = fit_threshold(softmax(z).max(axis=1), correct)
        return cls(t, thr, kind, conf_thr, float(correct.mean()))

    def atc(self, logits: np.ndarray) -> float:
        """Fraction of the window's scores at or above the threshold (NaN for an empty window)."""
        if len(logits) == 0:
            return float("nan")
        return float(np.mean(score(softmax(logits, self.temperature), self.score_kind) >= self.threshold))

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Per-sample ATC scores of the temperature-scaled softmax (compare with `threshold`)."""
        p, ent = softmax_entropy(_scaled32(logits, self.temperature))
        return -ent if self.score_kind is Score.NEG_ENTROPY else p.max(axis=1).astype(np.float64)

    def estimate(self, logits: np.ndarray) -> dict[str, float]:
        """Both estimates from one temperature-scaled softmax: {"atc": ..., "avg_conf": ...}."""
        if len(logits) == 0:
            return {"atc": float("nan"), "avg_conf": float("nan")}
        p, ent = softmax_entropy(_scaled32(logits, self.temperature))
        conf = p.max(axis=1)
        s = -ent if self.score_kind is Score.NEG_ENTROPY else conf.astype(np.float64)
        return {"atc": float(np.mean(s >= self.threshold)), "avg_conf": float(conf.mean(dtype=np.float64))}

    def average_confidence(self, logits: np.ndarray) -> float:
        """Mean max softmax probability after temperature scaling (NaN for an empty window)."""
        if len(logits) == 0:
            return float("nan")
        return float(softmax(logits, self.temperature).max(axis=1).mean())


def _scaled32(logits: np.ndarray, temperature: float) -> np.ndarray:
    """float32(logits / temperature) divided in float64, as softmax_entropy(logits / t) would, without
    the full float64 intermediate (numpy divides in float64 and rounds each result to the float32 output)."""
    z = np.asarray(logits, dtype=np.float64)
    return np.divide(z, temperature, out=np.empty(z.shape, np.float32), casting="same_kind")
