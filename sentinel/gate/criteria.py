"""One judgement per criterion, from the counts of both versions over the window; pure.

Each criterion says which test it ran, the statistic and p-value, an effect size with the
threshold it was held to, and the sample counts. It fails only when the difference is both
statistically significant (p below the per-criterion alpha) *and* larger than its effect
threshold: at large counts any tiny difference is significant, and a gate that fails on
those teaches people to ignore it. Below its minimum sample count a criterion is
`inconclusive`, never `pass`; a criterion whose series no sidecar exports is `skipped`.

| criterion | test | effect size (fails above) |
| --- | --- | --- |
| error_ratio | two-proportion z (Fisher's exact when sparse), one-sided; binomial against the SLO budget; the same two-proportion test on 4xx | ratio difference > SLO budget; 4xx ratio difference > max_client_error_increase |
| latency | chi-square homogeneity on bucket increments, and one-sided exact tests of the share above each tail bound (alpha split) | P95 or P99 ratio > tolerance and slower by > min diff |
| prediction_distribution | chi-square homogeneity on predicted-class increments, and per-class exact tests (alpha split) | Cramér's V at an equal split > max_cramers_v |
| reference_agreement | two-proportion z on disagreements, one-sided | agreement drop > max_agreement_drop |
| accuracy | two-proportion z on likely_correct verdicts (lower bound), one-sided; ATC estimate when verdicts are absent | drop > max_accuracy_drop |
| drift | canary: share of the window its combined alarm was up (pass when the baseline's was up as long) | share > max_drift_alarm_share |
| input_contract | canary: binomial test of violating samples against the allowed ratio; against the baseline's when it violates too | ratio (or excess over the baseline's) > max_contract_violation_ratio |
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

from sentinel.gate import stats
from sentinel.gate.queries import CLIENT_CODE_REGEX
from sentinel.gate.settings import GateSettings

CLIENT_CODE = re.compile(CLIENT_CODE_REGEX)   # refused requests: no SLO budget spent, still compared


class Verdict(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class VersionData:
    """Counts of one version over the window (empty mappings / None where no series exist)."""

    codes: dict[str, float] = field(default_factory=dict)           # requests by code
    buckets: dict[float, float] = field(default_factory=dict)       # cumulative latency buckets, le -> count
    classes: dict[str, float] = field(default_factory=dict)         # predictions by class
    agreement: dict[str, float] = field(default_factory=dict)       # agree / disagree
    verdicts: dict[str, float] = field(default_factory=dict)        # likely_correct / likely_wrong / unknown
    reliable: float | None = None                                   # min reliability flag in the window
    atc: float | None = None                                        # ATC estimate averaged over the window
    drift: dict[str, float] = field(default_factory=dict)           # detector -> share of window alarming
    contract_checked: float | None = None
    contract_violating: float | None = None
    contract_by_check: dict[str, float] = field(default_factory=dict)
    diagnosis_kind: tuple[str, ...] = ()
    diagnosis_transform: tuple[str, ...] = ()


@dataclass(frozen=True)
class Criterion:
    """The judgement of one criterion."""

    name: str
    verdict: Verdict
    summary: str                       # one sentence with the numbers
    test: str = ""
    statistic: float | None = None
    p_value: float | None = None
    alpha: float | None = None
    effect_name: str = ""
    effect: float | None = None
    effect_threshold: float | None = None
    n_baseline: int | None = None
    n_canary: int | None = None
    baseline: float | None = None
    canary: float | None = None


def _n(x: float) -> int:
    """Counts from `increase()` are extrapolated floats; the tests take whole events."""
    return int(round(max(0.0, x)))


def _fmt_p(p: float) -> str:
    return "nan" if p is None or math.isnan(p) else f"{p:.2g}"


def _too_few(name: str, what: str, n_b: int, n_c: int, need: int) -> Criterion:
    return Criterion(name, Verdict.INCONCLUSIVE,
                     f"too few {what} to judge: baseline {n_b}, canary {n_c}, need {need} each",
                     n_baseline=n_b, n_canary=n_c)


def error_ratio(b: VersionData, c: VersionData, s: GateSettings, alpha: float, budget: float,
                bad_code: str) -> Criterion:
    """Errors: canary significantly worse than baseline by more than the budget, or above the budget."""
    name = "error_ratio"
    if not b.codes and not c.codes:
        return Criterion(name, Verdict.SKIPPED, "no request series for either version")
    pat = re.compile(bad_code)
    n_b, n_c = _n(sum(b.codes.values())), _n(sum(c.codes.values()))
    bad_b = _n(sum(v for k, v in b.codes.items() if pat.fullmatch(k)))
    bad_c = _n(sum(v for k, v in c.codes.items() if pat.fullmatch(k)))
    if min(n_b, n_c) < s.min_requests:
        return _too_few(name, "requests", n_b, n_c, s.min_requests)
    r_b, r_c = bad_b / n_b, bad_c / n_c
    vs_base = stats.two_proportions(bad_b, n_b, bad_c, n_c)
    vs_budget = stats.above_rate(bad_c, n_c, budget)
    diff = r_c - r_b
    worse = vs_base.p_value < alpha and diff > budget
    # When the baseline itself is above the budget, the budget cannot tell the versions apart:
    # failing every canary there would block the very rollout that fixes it. The comparison
    # with the baseline decides.
    base_over = stats.above_rate(bad_b, n_b, budget).p_value < alpha
    over = vs_budget.p_value < alpha and not base_over
    # Client errors (4xx) do not spend the SLO budget, but on the same traffic a canary that
    # refuses more requests than its baseline (a changed input contract, a route it lacks)
    # fails its clients all the same.
    cli_b = _n(sum(v for k, v in b.codes.items() if CLIENT_CODE.fullmatch(k)))
    cli_c = _n(sum(v for k, v in c.codes.items() if CLIENT_CODE.fullmatch(k)))
    q_b, q_c = cli_b / n_b, cli_c / n_c
    vs_cli = stats.two_proportions(cli_b, n_b, cli_c, n_c)
    cli_diff = q_c - q_b
    refuses = vs_cli.p_value < alpha and cli_diff > s.max_client_error_increase
    common = dict(test=f"{vs_base.test} vs baseline; binomial vs budget {budget:g}", statistic=vs_base.statistic,
                  p_value=vs_base.p_value, alpha=alpha, effect_name="error ratio difference", effect=diff,
                  effect_threshold=budget, n_baseline=n_b, n_canary=n_c, baseline=r_b, canary=r_c)
    text = (f"canary error ratio {r_c:.4f} ({bad_c}/{n_c}) vs baseline {r_b:.4f} ({bad_b}/{n_b}), "
            f"p={_fmt_p(vs_base.p_value)}; vs SLO budget {budget:g} p={_fmt_p(vs_budget.p_value)}")
    if base_over and vs_budget.p_value < alpha:
        text += "; the baseline is above the SLO budget too, so only the comparison with it counts"
    if cli_b or cli_c:
        text += (f"; client errors (4xx) {q_c:.4f} ({cli_c}/{n_c}) vs {q_b:.4f} ({cli_b}/{n_b}), "
                 f"p={_fmt_p(vs_cli.p_value)}")
    if worse or over or refuses:
        why = []
        if worse:
            why.append(f"higher than baseline by {diff:.4f} > {budget:g}")
        if over:
            why.append(f"above the SLO budget {budget:g}")
        if refuses:
            why.append(f"client errors (4xx) higher than baseline by {cli_diff:.4f} > {s.max_client_error_increase:g}")
        return Criterion(name, Verdict.FAIL, text + ": " + " and ".join(why), **common)
    return Criterion(name, Verdict.PASS, text, **common)


def latency(b: VersionData, c: VersionData, s: GateSettings, alpha: float) -> Criterion:
    """Latency: bucket counts differ (chi-square) and P95 or P99 is slower beyond the tolerance."""
    name = "latency"
    if not b.buckets and not c.buckets:
        return Criterion(name, Verdict.SKIPPED, "no latency histogram for either version")
    # The +Inf bucket counts every request; without it the requests slower than the top bound
    # are in no bucket, and a canary whose slowest tenth went past it would look as fast.
    no_total = [f"{role}'s (top bound {max(d.buckets) * 1000:g} ms)" for role, d in (("baseline", b), ("canary", c))
                if d.buckets and math.inf not in d.buckets]
    if no_total:
        return Criterion(name, Verdict.INCONCLUSIVE,
                         f"the {' and the '.join(no_total)} latency histogram has no le=\"+Inf\" bucket on every "
                         "series, so requests slower than its top bound are counted nowhere: check that no "
                         "relabelling drops le=\"+Inf\"")
    n_b, n_c = _n(max(b.buckets.values(), default=0)), _n(max(c.buckets.values(), default=0))
    if min(n_b, n_c) < s.min_requests:
        return _too_few(name, "requests", n_b, n_c, s.min_requests)
    # Cumulative buckets compare only at bounds both histograms have: a bound one version
    # lacks is not a count of 0 there, and comparing different layouts bucket by bucket
    # would find a "difference" in the layouts rather than in the latencies.
    bounds = sorted(set(b.buckets) & set(c.buckets))
    finite_bounds = [le for le in bounds if not math.isinf(le)]
    if not finite_bounds:
        return Criterion(name, Verdict.INCONCLUSIVE,
                         "the versions' latency histograms share no finite bucket bound "
                         f"(baseline: {_bounds(b.buckets)}; canary: {_bounds(c.buckets)}), so their "
                         "latencies cannot be compared: give both sidecars the same buckets",
                         n_baseline=n_b, n_canary=n_c)
    if math.inf not in bounds:
        bounds.append(math.inf)
    cum_b = {le: b.buckets.get(le, float(n_b)) for le in bounds}
    cum_c = {le: c.buckets.get(le, float(n_c)) for le in bounds}
    layouts = "" if set(b.buckets) == set(c.buckets) else (
        f"; bucket layouts differ, compared on the {len(finite_bounds)} finite bounds both have")
    h = stats.homogeneity(stats.differences(cum_b), stats.differences(cum_c))
    # The chi-square merges sparse buckets (expected count >= 5), and the slowest 1% of a few
    # hundred requests are a handful: a tail 10x slower in 6 of 300 requests merged into its
    # neighbour and passed at p=1. Exact tests on the requests above each tail bound merge
    # nothing; alpha is split between the two tests (Bonferroni), so the criterion's false-fail
    # rate stays alpha. `p` is the smaller p-value times 2, compared with alpha.
    t = stats.tail_shift(cum_b, cum_c)
    p = min(1.0, 2 * min(h.p_value, t.p_value))
    significant = p < alpha
    parts, slower = [], []
    worst_ratio = 0.0
    top = finite_bounds[-1]
    beyond = []   # quantiles of the canary above the highest shared bound, the baseline's below it
    for q in (0.95, 0.99):
        qb, qc = stats.quantile(q, cum_b), stats.quantile(q, cum_c)
        ratio = qc / qb if qb > 0 else math.inf if qc > 0 else 1.0
        worst_ratio = max(worst_ratio, ratio)
        unbounded = cum_c[top] < q * n_c and cum_b[top] >= q * n_b
        parts.append(f"P{int(q * 100)} {'>' if unbounded else ''}{qc * 1000:.1f} ms vs {qb * 1000:.1f} ms "
                     f"(x{'>' if unbounded else ''}{ratio:.2f})")
        if ratio > s.latency_tolerance and qc - qb > s.latency_min_diff_s:
            slower.append(f"P{int(q * 100)}")
        elif unbounded:
            beyond.append(f"P{int(q * 100)}")
    tail = ""
    if t.tested:
        tail = (f"; tail above {t.bound * 1000:g} ms: canary {t.above_c}/{n_c} vs baseline {t.above_b}/{n_b}, "
                f"exact test p={_fmt_p(t.p_value)}" + (f" (corrected for {t.tested} bounds)" if t.tested > 1 else ""))
    text = (f"canary {', '.join(parts)}; chi-square on {h.columns} buckets p={_fmt_p(h.p_value)}, "
            f"Cramér's V {h.cramers_v:.3f}{tail}{layouts}")
    common = dict(test="chi_square_homogeneity(latency buckets) + fisher_exact(tail above each bound), Bonferroni",
                  statistic=h.statistic, p_value=p,
                  alpha=alpha, effect_name="worst P95/P99 ratio", effect=worst_ratio,
                  effect_threshold=s.latency_tolerance, n_baseline=n_b, n_canary=n_c,
                  baseline=stats.quantile(0.99, cum_b), canary=stats.quantile(0.99, cum_c))
    if significant and slower:
        return Criterion(name, Verdict.FAIL,
                         text + f": {' and '.join(slower)} slower than x{s.latency_tolerance:g} "
                                f"and by more than {s.latency_min_diff_s * 1000:g} ms", **common)
    if significant and beyond:
        # Only a lower bound is known (the +Inf bucket): "x1.1" may be x1.1 or x10.
        return Criterion(name, Verdict.INCONCLUSIVE,
                         text + f": the canary's {' and '.join(beyond)} lie above the highest shared bucket "
                                f"bound ({top * 1000:g} ms), the baseline's below it; how much slower is unknown",
                         **common)
    if (slower or beyond) and t.p_value < s.alpha and t.attainable >= alpha / 2:
        # A slower-looking quantile, tail evidence at the gate's own alpha, and too few requests
        # above the bound for the test to reach the criterion's share of alpha even had every one
        # of them been the canary's: typically a handful of slow canary requests at an equal
        # split (6 of 300 against none of 300 happens by chance 1.5% of the time). More traffic
        # settles it; a pass would not. Where the test could have rejected and did not (dozens of
        # requests above), its "no" is an answer: pass. Same distributions land here at most
        # alpha of the time, and less: a quantile must look slower too, the tail be thin.
        looks = slower + beyond
        return Criterion(name, Verdict.INCONCLUSIVE,
                         text + f": {' and '.join(looks)} look{'s' if len(looks) == 1 else ''} slower"
                                f"{f' than x{s.latency_tolerance:g}' if slower else ''}, but the tail test "
                                f"(p={_fmt_p(t.p_value)}) is not significant at {_fmt_p(alpha / 2)}, nor could be on "
                                f"{t.above_b + t.above_c} requests above {t.bound * 1000:g} ms: too few slow requests "
                                "to tell; judge a longer window", **common)
    return Criterion(name, Verdict.PASS, text, **common)


def _bounds(buckets: dict[float, float]) -> str:
    shown = [f"{le:g}" for le in sorted(buckets)]
    if len(shown) > 9:
        shown = shown[:8] + ["...", shown[-1]]
    return ", ".join(shown) or "none"


def prediction_distribution(b: VersionData, c: VersionData, s: GateSettings, alpha: float) -> Criterion:
    """Predicted classes: same traffic, different answers is news even without errors."""
    name = "prediction_distribution"
    if not b.classes and not c.classes:
        return Criterion(name, Verdict.SKIPPED, "no predicted-class series for either version (analysis off?)")
    classes = sorted(set(b.classes) | set(c.classes), key=lambda k: (len(k), k))
    vb = [b.classes.get(k, 0.0) for k in classes]
    vc = [c.classes.get(k, 0.0) for k in classes]
    n_b, n_c = _n(sum(vb)), _n(sum(vc))
    if min(n_b, n_c) < s.min_predictions:
        return _too_few(name, "sampled predictions", n_b, n_c, s.min_predictions)
    counts_b, counts_c = [round(x) for x in vb], [round(x) for x in vc]
    h = stats.homogeneity(counts_b, counts_c)
    # Omnibus chi-square and per-class exact tests, alpha split between them: the chi-square
    # merges sparse classes, so a class only one version predicts needs the per-class test.
    worst, p_class = stats.category_shift(counts_b, counts_c)
    moved = sorted(classes, key=lambda k: -abs(c.classes.get(k, 0) / max(n_c, 1) - b.classes.get(k, 0) / max(n_b, 1)))
    top = ", ".join(f"class {k} {c.classes.get(k, 0) / n_c:.1%} vs {b.classes.get(k, 0) / n_b:.1%}"
                    for k in moved[:3])
    # The effect is Cramér's V at an equal split: the plain V shrinks with the canary's share
    # of traffic (a 1% canary could never reach 0.1), so the threshold would mean nothing.
    split = "" if n_b == n_c else f" at equal traffic (V {h.cramers_v:.3f} at this {n_c}:{n_b} split)"
    per_class = f"; per-class test p={_fmt_p(p_class)} (class {classes[worst]})" if worst >= 0 else ""
    text = (f"chi-square over {h.columns} classes p={_fmt_p(h.p_value)}{per_class}, Cramér's V "
            f"{h.balanced_v:.3f}{split} (threshold {s.max_cramers_v:g}); largest shifts: {top}")
    common = dict(test="chi_square_homogeneity(predicted classes)", statistic=h.statistic, p_value=h.p_value,
                  alpha=alpha, effect_name="Cramér's V (equal split)", effect=h.balanced_v,
                  effect_threshold=s.max_cramers_v, n_baseline=n_b, n_canary=n_c)
    if min(h.p_value, p_class) < alpha / 2 and h.balanced_v > s.max_cramers_v:
        return Criterion(name, Verdict.FAIL, "canary predicts differently: " + text, **common)
    return Criterion(name, Verdict.PASS, text, **common)


def _proportion_drop(name: str, what: str, good_b: int, n_b: int, good_c: int, n_c: int, max_drop: float,
                     alpha: float, test_name: str) -> Criterion:
    r_b, r_c = good_b / n_b, good_c / n_c
    t = stats.two_proportions(n_b - good_b, n_b, n_c - good_c, n_c)   # canary has more "not good"?
    drop = r_b - r_c
    text = (f"canary {what} {r_c:.3f} ({good_c}/{n_c}) vs baseline {r_b:.3f} ({good_b}/{n_b}), "
            f"drop {drop:+.3f} (allowed {max_drop:g}), p={_fmt_p(t.p_value)}")
    common = dict(test=f"{t.test}({test_name})", statistic=t.statistic, p_value=t.p_value, alpha=alpha,
                  effect_name=f"{what} drop", effect=drop, effect_threshold=max_drop, n_baseline=n_b,
                  n_canary=n_c, baseline=r_b, canary=r_c)
    if t.p_value < alpha and drop > max_drop:
        return Criterion(name, Verdict.FAIL, text, **common)
    return Criterion(name, Verdict.PASS, text, **common)


def reference_agreement(b: VersionData, c: VersionData, s: GateSettings, alpha: float) -> Criterion:
    """Agreement with the reference model (shadow and replay), canary against baseline."""
    name = "reference_agreement"
    if not b.agreement and not c.agreement:
        return Criterion(name, Verdict.SKIPPED, "no reference agreement series (shadow and replay off?)")
    n_b, n_c = _n(sum(b.agreement.values())), _n(sum(c.agreement.values()))
    if min(n_b, n_c) < s.min_compared:
        return _too_few(name, "compared predictions", n_b, n_c, s.min_compared)
    return _proportion_drop(name, "agreement", _n(b.agreement.get("agree", 0)), n_b,
                            _n(c.agreement.get("agree", 0)), n_c, s.max_agreement_drop, alpha, "disagreements")


def _unreliable(b: VersionData, c: VersionData) -> str:
    """The sentence saying whose accuracy estimate was flagged unreliable in the window ("" if none)."""
    which = " and ".join(v for v, d in (("baseline", b), ("canary", c)) if d.reliable == 0)
    return f"the accuracy estimate of the {which} was flagged unreliable in the window" if which else ""


def accuracy(b: VersionData, c: VersionData, s: GateSettings, alpha: float, n_b_pred: int,
             n_c_pred: int) -> Criterion:
    """Label-free accuracy: the verdicts' lower bound where exported, else the ATC estimate."""
    name = "accuracy"
    if b.verdicts or c.verdicts:
        n_b, n_c = _n(sum(b.verdicts.values())), _n(sum(c.verdicts.values()))
        if min(n_b, n_c) < s.min_compared:
            return _too_few(name, "accuracy verdicts", n_b, n_c, s.min_compared)
        if unreliable := _unreliable(b, c):
            return Criterion(name, Verdict.INCONCLUSIVE, unreliable, n_baseline=n_b, n_canary=n_c)
        return _proportion_drop(name, "accuracy lower bound", _n(b.verdicts.get("likely_correct", 0)), n_b,
                                _n(c.verdicts.get("likely_correct", 0)), n_c, s.max_accuracy_drop, alpha,
                                "likely_correct verdicts")
    if b.atc is None and c.atc is None:
        return Criterion(name, Verdict.SKIPPED, "no accuracy verdicts or ATC estimate for either version")
    if b.atc is None or c.atc is None or min(n_b_pred, n_c_pred) < s.min_compared:
        return _too_few(name, "sampled predictions with an ATC estimate", n_b_pred if b.atc is not None else 0,
                        n_c_pred if c.atc is not None else 0, s.min_compared)
    if unreliable := _unreliable(b, c):
        return Criterion(name, Verdict.INCONCLUSIVE, unreliable, n_baseline=n_b_pred, n_canary=n_c_pred)
    # The ATC estimate is the share of sampled predictions whose confidence clears the
    # fitted threshold: treated as that many successes out of the sampled predictions.
    return _proportion_drop(name, "ATC accuracy estimate", _n(b.atc * n_b_pred), n_b_pred,
                            _n(c.atc * n_c_pred), n_c_pred, s.max_accuracy_drop, alpha,
                            "confidence above the ATC threshold")


def drift(c: VersionData, s: GateSettings, b: VersionData | None = None) -> Criterion:
    """The canary's combined drift alarm must not be up for most of the window, unless the baseline's was too.

    Both versions see the same traffic: when the baseline alarmed as long, the traffic drifted,
    and holding the canary back would not undo it (the criteria comparing the versions judge it).
    """
    name = "drift"
    if not c.drift:
        return Criterion(name, Verdict.SKIPPED, "no drift alarm series for the canary (analysis off?)")
    from sentinel.gate.queries import COMBINED_DETECTOR

    share = c.drift.get(COMBINED_DETECTOR, max(c.drift.values()))
    alarming = sorted(d for d, v in c.drift.items() if v > 0 and d != COMBINED_DETECTOR)
    words = ""
    said = tuple(d for d in c.diagnosis_kind + c.diagnosis_transform if d not in ("none", ""))
    if said:
        words = "; diagnosis: " + ", ".join(said)
    text = (f"canary's combined drift alarm up {share:.0%} of the window (allowed {s.max_drift_alarm_share:.0%})"
            + (f"; detectors that alarmed: {', '.join(alarming)}" if alarming else "") + words)
    common = dict(test="share of window alarming", effect_name="alarm share", effect=share,
                  effect_threshold=s.max_drift_alarm_share, canary=share)
    if share > s.max_drift_alarm_share:
        base = None if b is None or not b.drift else b.drift.get(COMBINED_DETECTOR, max(b.drift.values()))
        if base is not None and base > s.max_drift_alarm_share:
            return Criterion(name, Verdict.PASS,
                             text + f"; the baseline's was up {base:.0%} of the window too: the traffic drifted, "
                                    "not the canary", **common)
        return Criterion(name, Verdict.FAIL, text, **common)
    return Criterion(name, Verdict.PASS, text, **common)


def input_contract(c: VersionData, s: GateSettings, alpha: float, b: VersionData | None = None) -> Criterion:
    """The canary's share of sampled inputs violating its input contract, against the allowed ratio.

    When the baseline's inputs (the same traffic) violate its contract beyond the ratio too, the
    clients send bad inputs: the canary then fails only if it rejects significantly more.
    """
    name = "input_contract"
    if c.contract_checked is None:
        return Criterion(name, Verdict.SKIPPED, "no input-contract series for the canary")
    n, bad = _n(c.contract_checked), _n(c.contract_violating or 0)
    if n < s.min_compared:
        return Criterion(name, Verdict.INCONCLUSIVE,
                         f"too few inputs checked against the contract: canary {n}, need {s.min_compared}",
                         n_canary=n)
    t = stats.above_rate(bad, n, s.max_contract_violation_ratio)
    checks = ", ".join(f"{k} {_n(v)}" for k, v in sorted(c.contract_by_check.items(), key=lambda kv: -kv[1]) if v > 0)
    text = (f"canary: {bad}/{n} sampled inputs violate the input contract ({bad / n:.2%}, allowed "
            f"{s.max_contract_violation_ratio:.2%}), p={_fmt_p(t.p_value)}" + (f"; by check: {checks}" if checks else ""))
    common = dict(test="binomial vs allowed ratio", statistic=bad / n, p_value=t.p_value, alpha=alpha,
                  effect_name="violating ratio", effect=bad / n, effect_threshold=s.max_contract_violation_ratio,
                  n_canary=n, canary=bad / n)
    if t.p_value < alpha and b is not None and b.contract_checked is not None and _n(b.contract_checked) >= s.min_compared:
        n_b, bad_b = _n(b.contract_checked), _n(b.contract_violating or 0)
        if stats.above_rate(bad_b, n_b, s.max_contract_violation_ratio).p_value < alpha:
            vs = stats.two_proportions(bad_b, n_b, bad, n)
            text += (f"; the baseline's inputs violate its contract too ({bad_b}/{n_b}, {bad_b / n_b:.2%}): "
                     f"canary vs baseline p={_fmt_p(vs.p_value)}")
            if vs.p_value < alpha and bad / n - bad_b / n_b > s.max_contract_violation_ratio:
                return Criterion(name, Verdict.FAIL, text + f": higher by more than "
                                 f"{s.max_contract_violation_ratio:.2%}", **common)
            return Criterion(name, Verdict.PASS, text + ": the traffic breaks the contract, not the canary",
                             **common)
    if t.p_value < alpha:
        return Criterion(name, Verdict.FAIL, text, **common)
    return Criterion(name, Verdict.PASS, text, **common)
