"""Synthetic input series for promtool unit tests, and the arithmetic they should produce.

A `Profile` says, step by step, how much traffic an SLI sees and which fraction of it is
bad. `input_series` turns it into promtool `input_series` for the SLI's real metric
names; `error_ratio` computes what the recording rules must record for it, the way
Prometheus 2 does for samples exactly on the step grid: a range `[t-w, t]` closed at
both ends, counters starting at 0 (so `rate()` does not extrapolate), gauges averaged
sample by sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sentinel import metricnames as mn
from sentinel.slo.spec import SloSpec

# Requests per step. Large and round, so that bad counts are whole numbers for every
# objective with up to six digits and ratios are exact.
TRAFFIC_PER_STEP = 1_000_000
INSTANCES = ("sentinel-a:9090", "sentinel-b:9090")
# Each instance spells the latency bucket differently, as Prometheus 2 stores what the
# exporter wrote; the generated `le` regex must catch both.
LE_SPELLINGS = ("{:g}", "{:.3f}")


@dataclass(frozen=True)
class Profile:
    """Per-step bad fraction (`bad(step)`, steps 0..steps) at a constant traffic rate."""

    steps: int
    bad: Callable[[int], float]
    traffic: int = TRAFFIC_PER_STEP
    bad_series_exists: bool = True  # False: no 5xx/disagree series at all (exercises `or 0 * total`)

    def bad_count(self, step: int) -> int:
        """Bad events counted in the increment that ends at `step` (step >= 1)."""
        return int(round(self.bad(step) * self.traffic))


def healthy(steps: int, traffic: int = TRAFFIC_PER_STEP) -> Profile:
    return Profile(steps, lambda _s: 0.0, traffic, bad_series_exists=False)


def _fmt(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def compress(values: list[float]) -> str:
    """promtool expanding notation for a list of values (`0+10x5 60+20x3`)."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        diff = values[i + 1] - values[i] if i + 1 < len(values) else 0.0
        while j + 1 < len(values) and values[j + 1] - values[j] == diff:
            j += 1
        count = j - i
        start = _fmt(values[i])
        if count == 0:
            parts.append(start)
        elif diff == 0:
            parts.append(f"{start}x{count}")
        elif diff > 0:
            parts.append(f"{start}+{_fmt(diff)}x{count}")
        else:
            parts.append(f"{start}-{_fmt(-diff)}x{count}")
        i = j + 1
    return " ".join(parts)


def _counter(increments: list[int]) -> list[float]:
    out = [0.0]
    for inc in increments:
        out.append(out[-1] + inc)
    return out


def _series(metric: str, labels: dict[str, str], values: list[float]) -> dict[str, str]:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{label_text}}}", "values": compress(values)}


def input_key(slo: SloSpec) -> tuple[str, str, float | None]:
    """What identifies the input series `input_series` writes for `slo`.

    Two SLOs with the same key read the very same series (two availability SLOs of one model,
    say, with different objectives), so one promtool test cannot give them different profiles.
    Latency SLOs with different thresholds differ in their bucket and share only `_count` and
    the `+Inf` bucket, which depend on the traffic alone.
    """
    return (slo.model, slo.sli, slo.threshold if slo.sli == "latency" else None)


def input_series(slo: SloSpec, profile: Profile, samples: int | None = None) -> list[dict[str, str]]:
    """promtool input series feeding `slo`'s SLI with `profile`, split over two instances.

    `samples`: what the accuracy estimates rest on (default the SLO's own `min_samples`); give the
    largest `min_samples` of the model's estimated-accuracy SLOs, which all read the same gauge.
    """
    steps = range(1, profile.steps + 1)
    totals = [profile.traffic] * profile.steps if profile.traffic else [0] * profile.steps
    bads = [profile.bad_count(s) if profile.traffic else 0 for s in steps]
    out: list[dict[str, str]] = []
    model = slo.model
    for k, instance in enumerate(INSTANCES):
        # instance a takes the odd unit of an odd count, so the halves add up exactly
        tot_k = [(t + (1 - k)) // 2 if t % 2 else t // 2 for t in totals]
        bad_k = [(b + (1 - k)) // 2 if b % 2 else b // 2 for b in bads]
        good_k = [t - b for t, b in zip(tot_k, bad_k, strict=False)]
        base = {"instance": instance, "job": "sentinel", "model": model}
        if slo.sli == "availability":
            name = mn.REQUESTS.sample_name
            out.append(_series(name, {**base, "protocol": "v2", "code": "200"}, _counter(good_k)))
            if profile.bad_series_exists:
                out.append(_series(name, {**base, "protocol": "v2", "code": "503"}, _counter(bad_k)))
        elif slo.sli == "latency":
            assert slo.threshold is not None
            hist = mn.REQUEST_DURATION.name
            le = LE_SPELLINGS[k].format(slo.threshold)
            lab = {**base, "protocol": "v2", "code": "200"}
            out.append(_series(hist + "_bucket", {**lab, "le": le}, _counter(good_k)))
            out.append(_series(hist + "_bucket", {**lab, "le": "+Inf"}, _counter(tot_k)))
            out.append(_series(hist + "_count", lab, _counter(tot_k)))
        elif slo.sli == "agreement":
            name = mn.REFERENCE_AGREEMENT.sample_name
            source = ("shadow", "replay")[k]
            out.append(_series(name, {**base, "source": source, "result": "agree"}, _counter(good_k)))
            if profile.bad_series_exists:
                out.append(_series(name, {**base, "source": source, "result": "disagree"}, _counter(bad_k)))
        else:
            # rounded as the recorded ratios are (sli.RATIO_DECIMALS): 1 - 0.07 is 0.9299999999999999,
            # an estimate "below" an objective of 0.93 that it equals
            values = [round(1.0 - profile.bad(s), 12) for s in range(0, profile.steps + 1)]
            out.append(_series(mn.ESTIMATED_ACCURACY.name, {**base, "method": "atc_lower"}, values))
            # every estimate rests on exactly the SLO's minimum (the largest of the model's) and is
            # reliable, so every one counts
            floor = slo.sample_floor if samples is None else samples
            out.append(_series(mn.ACCURACY_ESTIMATE_SAMPLES.name, base, [float(floor)] * len(values)))
            out.append(_series(mn.ACCURACY_ESTIMATE_RELIABLE.name, base, [1.0] * len(values)))
    return out


def error_ratio(slo: SloSpec, profile: Profile, step: int, window_steps: int) -> float | None:
    """The error ratio the recording rule records at `step` for a window of `window_steps`.

    None where Prometheus has nothing to compute (a counter range with a single sample).
    """
    if slo.sli == "estimated_accuracy":
        first = max(0, step - window_steps)
        samples = [profile.bad(s) for s in range(first, step + 1)]
        return sum(samples) / len(samples)
    n = min(window_steps, step)
    if n <= 0:
        return None
    if not profile.traffic:
        return 0.0
    bad = sum(profile.bad_count(s) for s in range(step - n + 1, step + 1))
    return bad / (profile.traffic * n)
