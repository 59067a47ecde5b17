"""What an export must meet, by precision.

fp32: every logit within atol + rtol·|ref| (defaults 1e-4 and 1e-3: PyTorch's ONNX Runtime
tutorial uses rtol 1e-3, ONNX's backend tests relax densenet121 to 2e-3) and 100% top-1
agreement. fp16: 1e-2/1e-2 and 99.5%. bf16 (8 mantissa bits against fp16's 11, so about 8×
the rounding error): 5e-2/5e-2 and 99%. int8: judged by top-1 agreement (at least 99%) and a
bound on the 99th percentile of absolute probability error (0.05); per-element logit
tolerances mean little after quantization, so they are reported, not required.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Policy:
    precision: str
    atol: float                        # on logits
    rtol: float
    min_top1: float                    # fraction of samples whose argmax matches the reference
    prob_p99_abs: float | None = None  # bound on the 99th percentile of |Δp| (int8)
    elementwise: bool = True           # require every logit within atol/rtol
    layer_rel: float = 1e-4            # a checkpoint diverges when max|Δ| > layer_rel · max|ref|

    def as_dict(self) -> dict[str, object]:
        return {"precision": self.precision, "atol": self.atol, "rtol": self.rtol, "min_top1": self.min_top1,
                "prob_p99_abs": self.prob_p99_abs, "elementwise": self.elementwise, "layer_rel": self.layer_rel}


POLICIES = {
    "fp32": Policy("fp32", atol=1e-4, rtol=1e-3, min_top1=1.0, layer_rel=1e-4),
    "fp16": Policy("fp16", atol=1e-2, rtol=1e-2, min_top1=0.995, layer_rel=1e-2),
    "bf16": Policy("bf16", atol=5e-2, rtol=5e-2, min_top1=0.99, layer_rel=5e-2),
    "int8": Policy("int8", atol=0.1, rtol=0.1, min_top1=0.99, prob_p99_abs=0.05, elementwise=False, layer_rel=0.1),
}


def policy_for(precision: str, *, atol: float | None = None, rtol: float | None = None,
               min_top1: float | None = None) -> Policy:
    """The default policy of a precision with command-line overrides applied (UsageError when out of range)."""
    import math

    from sentinel.errors import UsageError

    problems = [f"--{flag} must be a finite number ≥ 0, got {v}" for flag, v in (("atol", atol), ("rtol", rtol))
                if v is not None and not (math.isfinite(v) and v >= 0)]
    if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:   # NaN fails both comparisons
        problems.append(f"--min-top1 must be a fraction between 0 and 1, got {min_top1}")
    if problems:
        raise UsageError("; ".join(problems))
    p = POLICIES[precision]
    changes = {k: v for k, v in (("atol", atol), ("rtol", rtol), ("min_top1", min_top1)) if v is not None}
    return replace(p, **changes) if changes else p
