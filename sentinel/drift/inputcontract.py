"""The input contract of a model version: what its inputs looked like when the golden set was built.

Derived once from the golden set's network inputs (N×C×H×W float32) and stored beside it as
`contract.json` (its sha256 in manifest.json). Each sampled input is checked against it **per
sample**; a violated check means the sample lies outside what the model was validated on, so
the accuracy estimate does not trust it. Checks (names are the `check` label of
`sentinel_input_contract_violations_total`):

    shape          the sample's shape differs from the network input shape
    dtype          the wire dtype is of another kind (integer where float was expected, ...)
    nonfinite      a NaN or ±inf value
    out_of_range   a value beyond the golden range of its channel by more than `tolerance` × range
    saturated      the share of values at (or beyond) a channel's high extreme exceeds the golden maximum
    low_dynamic_range   the sample spans less than `range_floor` × the smallest golden span

Pure numpy; `check` takes arrays and returns a `ContractReport`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

CHECKS = ("shape", "dtype", "nonfinite", "out_of_range", "saturated", "low_dynamic_range")
QUANTILES = (0.001, 0.01, 0.05, 0.5, 0.95, 0.99, 0.999)

# A value this far beyond the golden range (as a share of the range) is out of range. Golden
# sets are small; 5% leaves room for unseen but legitimate extremes.
DEFAULT_TOLERANCE = 0.05
# A sample spanning less than this share of the smallest golden per-sample span is flat.
DEFAULT_RANGE_FLOOR = 0.25
# Margin on the golden maximum share of saturated values.
SATURATION_MARGIN = 0.05


@dataclass(frozen=True)
class InputContract:
    """Bounds of one model version's network inputs, per channel (JSON-serialisable)."""

    shape: tuple[int, ...]                   # C×H×W of one network input
    dtype_kind: str                          # numpy dtype kind of the wire inputs: "f", "i", "u"
    low: tuple[float, ...]                   # per channel, golden minimum
    high: tuple[float, ...]                  # per channel, golden maximum
    quantiles: tuple[tuple[float, ...], ...]  # per channel, values at QUANTILES (documentation, effect sizes)
    max_saturated: float                     # largest per-sample share of values at a channel extreme (+margin)
    min_span: tuple[float, ...]              # per channel, smallest per-sample max − min in the golden set
    tolerance: float = DEFAULT_TOLERANCE
    range_floor: float = DEFAULT_RANGE_FLOOR
    count: int = 0                           # golden samples it was derived from

    @classmethod
    def derive(cls, inputs: np.ndarray, dtype_kind: str = "f") -> InputContract:
        """The contract of N×C×H×W finite golden inputs."""
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim != 4 or len(x) < 1:
            raise ValueError(f"an input contract needs N×C×H×W golden inputs, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("golden inputs contain NaN or inf; cannot derive an input contract")
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        low, high = flat.min(axis=(0, 2)), flat.max(axis=(0, 2))
        q = np.quantile(flat.transpose(1, 0, 2).reshape(c, -1), QUANTILES, axis=1).T
        sat = _saturated_share(flat, low, high).max()
        span = (flat.max(axis=2) - flat.min(axis=2)).min(axis=0)
        return cls(tuple(int(s) for s in x.shape[1:]), dtype_kind, tuple(map(float, low)), tuple(map(float, high)),
                   tuple(tuple(map(float, row)) for row in q), float(min(1.0, sat + SATURATION_MARGIN)),
                   tuple(map(float, span)), count=int(n))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> InputContract:
        d = json.loads(text)
        try:
            return cls(shape=tuple(d["shape"]), dtype_kind=str(d["dtype_kind"]), low=tuple(d["low"]),
                       high=tuple(d["high"]), quantiles=tuple(tuple(r) for r in d["quantiles"]),
                       max_saturated=float(d["max_saturated"]), min_span=tuple(d["min_span"]),
                       tolerance=float(d.get("tolerance", DEFAULT_TOLERANCE)),
                       range_floor=float(d.get("range_floor", DEFAULT_RANGE_FLOOR)), count=int(d.get("count", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an input contract ({exc})") from None


@dataclass(frozen=True)
class ContractReport:
    """Per-sample outcome of `check`: `violations[i, j]` is True when sample i violates CHECKS[j]."""

    violations: np.ndarray            # N×len(CHECKS) bool

    @property
    def n(self) -> int:
        return int(self.violations.shape[0])

    @property
    def violating(self) -> np.ndarray:
        """N bool: the sample violates at least one check."""
        return np.asarray(self.violations.any(axis=1), dtype=bool)

    @property
    def untrusted(self) -> np.ndarray:
        """N bool: the sample violates a check on what the network sees (any check but `dtype`).

        The wire dtype alone does not change the values: integers 0–16 where floats 0–16 were
        expected are the same network input, so the accuracy estimate may still judge them (the
        violation is counted all the same)."""
        return untrusted(self.violations)

    def counts(self) -> dict[str, int]:
        """Violating samples per check."""
        return {name: int(k) for name, k in zip(CHECKS, self.violations.sum(axis=0), strict=True)}


def untrusted(violations: np.ndarray) -> np.ndarray:
    """N bool from an N×len(CHECKS) violation matrix: any check but `dtype` (see ContractReport.untrusted)."""
    v = np.asarray(violations, bool)
    keep = [i for i, name in enumerate(CHECKS) if name != "dtype"]
    return np.asarray(v[:, keep].any(axis=1), dtype=bool)


def _saturated_share(flat: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """N: share of values at or beyond their channel's high extreme (within 1e-6 of the range).

    Only the high end: the low end of many images is their background, whose share varies with
    content (a smaller digit), while clipped highlights are what a wrong scale or binarisation makes.
    """
    eps = 1e-6 * np.maximum(high - low, 1e-12)
    at = flat >= (high - eps)[None, :, None]
    share: np.ndarray = at.reshape(len(flat), -1).mean(axis=1)
    return share


def check(contract: InputContract, inputs: np.ndarray, *, dtype_kind: str | None = None) -> ContractReport:
    """Check a batch of network inputs (N×C×H×W) sample by sample.

    `dtype_kind` is the kind of the array as it arrived on the wire (None: not known, not
    checked). A batch whose per-sample shape differs violates `shape` on every sample and no
    other check is run on it.
    """
    x = np.asarray(inputs)
    n = int(x.shape[0]) if x.ndim >= 1 else 1
    v = np.zeros((n, len(CHECKS)), dtype=bool)
    if dtype_kind is not None and dtype_kind != contract.dtype_kind and \
            not (dtype_kind in "iu" and contract.dtype_kind in "iu"):
        v[:, CHECKS.index("dtype")] = True
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(contract.shape):
        v[:, CHECKS.index("shape")] = True
        return ContractReport(v)
    c = x.shape[1]
    flat = x.reshape(n, c, -1).astype(np.float64, copy=False)
    finite = np.isfinite(flat)
    v[:, CHECKS.index("nonfinite")] = ~finite.reshape(n, -1).all(axis=1)
    low, high = np.asarray(contract.low), np.asarray(contract.high)
    rng = np.maximum(high - low, 1e-12)
    safe = np.where(finite, flat, low[None, :, None])
    tol = contract.tolerance * rng
    out = (safe < (low - tol)[None, :, None]) | (safe > (high + tol)[None, :, None])
    v[:, CHECKS.index("out_of_range")] = out.reshape(n, -1).any(axis=1)
    v[:, CHECKS.index("saturated")] = _saturated_share(safe, low, high) > contract.max_saturated
    span = safe.max(axis=2) - safe.min(axis=2)
    v[:, CHECKS.index("low_dynamic_range")] = (span < contract.range_floor * np.asarray(contract.min_span)).any(axis=1)
    return ContractReport(v)
