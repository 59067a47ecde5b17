"""Generate `promtool test rules` unit tests for the generated rules.

Every test feeds all SLOs of the file at once (their outages staggered where needed):

* recovery: after a healthy steady state as long as the slowest page window, every
  request fails until the fast page pair (1h/5m at 30 days) fires; the test pins that
  step (the page is firing there and, where unambiguous, not a step earlier: the
  Workbook's detection time rounded up to the test step), then traffic is healthy again
  and the page must be resolved within the short window of the page pairs the outage
  tripped, plus one step;
* long recovery: the same, with an outage long enough for the slow page pair (6h/30m),
  whose 30-minute short window then sets the reset time;
* slow burn: errors at 1.1x the sustainable rate from the start; a ticket, never a page;
* exact budget: errors at exactly the sustainable rate (the budget spent exactly over the
  period); nothing fires;
* idle: series present, no requests: recorded ratios are 0 (not NaN), nothing fires;
* absent: no sentinel series at all: only SentinelMetricsAbsent fires, after its `for`.

The expected alerts at each checked instant (labels, annotations, the burn rate in the
description) come from `sentinel.slo.series`, which computes what Prometheus 2 computes
for samples on the step grid. No check sits where a burn rate is within `MARGIN` of a
threshold or where a one-sample-shorter range (Prometheus 3's left-open ranges) would
change the verdict; the generator staggers outages to avoid such instants and raises
GenerationError when it cannot.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sentinel.errors import SentinelError
from sentinel.slo import recorded, series
from sentinel.slo.durations import format_duration, parse_duration
from sentinel.slo.model import RuleFile, dump_yaml
from sentinel.slo.rules import ABSENT_ALERT, BURN_ALERT, alert_names, estimate_age_s
from sentinel.slo.sli import required_selectors
from sentinel.slo.spec import SloFile, SloSpec
from sentinel.slo.windows import BurnWindow, WindowPlan, plan_windows

TEST_FILE = "sentinel-slo.test.yml"
MARGIN = 0.01          # relative distance a burn rate must keep from a threshold at a check
SLOW_BURN = 1.1        # "just over 1x"
MAX_STAGGER = 30       # steps an SLO's outage may be delayed to keep check instants clear


class GenerationError(SentinelError):
    """The generator could not find unambiguous check instants (a bug, or an odd SLO file)."""

    exit_code = 1


@dataclass(frozen=True)
class Pins:
    """Times the generated tests pin for one SLO, in seconds."""

    slo: str
    model: str
    objective: float
    detection_s: float         # Workbook detection time of a full outage (fastest page pair)
    page_within_s: int         # the test asserts the page is firing by then
    reset_within_s: int        # page resolved this long after a short outage ends
    slow_reset_within_s: int   # ... after an outage long enough for the slow page pair


@dataclass(frozen=True)
class GeneratedTests:
    filename: str
    text: str
    pins: tuple[Pins, ...]


def test_step_s(spec: SloFile) -> int:
    """The step of the synthetic series and of rule evaluation in the tests.

    At most a minute, at most a quarter of the shortest window, and a divisor of every
    window, so each range holds a whole number of steps (4m40s windows of a 28-day
    period get 56-second steps).
    """
    plan = plan_windows(spec.period_seconds, spec.scrape_interval_seconds)
    common = 0
    for span in plan.ranges_s:
        common = math.gcd(common, span)
    limit = max(1, min(60, plan.ranges_s[0] // 4))
    return max(d for d in range(1, limit + 1) if common % d == 0)


def _steps(seconds: float, step: int) -> int:
    return int(math.ceil(seconds / step - 1e-9))


class _Scenario:
    """Expected alerts for one SLO driven by one profile."""

    def __init__(self, slo: SloSpec, profile: series.Profile, plan: WindowPlan, step: int):
        self.slo, self.profile, self.plan, self.step = slo, profile, plan, step

    def burn(self, window_s: int, at: int, shorter_by: int = 0) -> float | None:
        w = window_s // self.step - shorter_by
        ratio = series.error_ratio(self.slo, self.profile, at, max(1, w))
        return None if ratio is None else round(ratio, 12) / self.slo.budget

    def pair_fires(self, pair: BurnWindow, at: int, shorter_by: int = 0) -> bool:
        lo = self.burn(pair.long_s, at, shorter_by)
        sh = self.burn(pair.short_s, at, shorter_by)
        factor = pair.factor_for(self.slo.budget)
        return (lo is not None and sh is not None and lo > factor and sh > factor
                and self.estimate_old_enough(pair, at, shorter_by))

    def estimate_old_enough(self, pair: BurnWindow, at: int, shorter_by: int = 0) -> bool:
        """The accuracy pairs' age condition (rules.estimate_age_s): the synthetic estimate counts
        from step 0, so it holds once half the short window has passed (one step later when
        `shorter_by`, to flag the boundary ambiguous)."""
        if self.slo.sli != "estimated_accuracy":
            return True
        return (at - shorter_by) * self.step >= estimate_age_s(pair)

    def ambiguous(self, at: int) -> bool:
        """True when some pair's verdict could flip with rounding or a one-sample-shorter range."""
        for pair in self.plan.pairs:
            states = []
            for w in (pair.long_s, pair.short_s):
                b = self.burn(w, at)
                if b is None or b < pair.factor_for(self.slo.budget) * (1 - MARGIN):
                    states.append("below")
                elif b > pair.factor_for(self.slo.budget) * (1 + MARGIN):
                    states.append("above")
                else:
                    states.append("near")
            if "below" not in states and "near" in states:
                return True
            if self.pair_fires(pair, at) != self.pair_fires(pair, at, shorter_by=1):
                return True
        # the alert's description prints the burn rate to one decimal: avoid x.x5 ties
        return any(_near_rounding(v) for v in self.firing(at).values())

    def firing(self, at: int) -> dict[str, float]:
        """severity -> long-window burn rate of the first firing pair (the alert's $value)."""
        out: dict[str, float] = {}
        for sev in ("page", "ticket"):
            for pair in self.plan.by_severity(sev):
                if self.pair_fires(pair, at):
                    value = self.burn(pair.long_s, at)
                    assert value is not None
                    out[sev] = value
                    break
        return out


def _render(template: str, model: str, value: float | None = None) -> str:
    text = template.replace("{{ $labels.model }}", model)
    if value is not None:
        text = text.replace('{{ $value | printf "%.1f" }}', f"{value:.1f}")
    return text


class _Builder:
    def __init__(self, spec: SloFile, files: tuple[RuleFile, ...]):
        self.spec = spec
        self.files = files
        self.step = test_step_s(spec)
        self.plan = plan_windows(spec.period_seconds, spec.scrape_interval_seconds)
        self.alerts = alert_names(files)
        self.burn_rules = {(dict(r.labels)["slo"], dict(r.labels)["model"], dict(r.labels)["severity"]): r
                           for f in files for g in f.groups for r in g.rules if r.alert == BURN_ALERT}
        pages = self.plan.by_severity("page")
        self.fast = pages[0]
        self.slow = pages[-1]
        # the estimated-accuracy SLOs of a model read one samples gauge: rest every estimate on the
        # largest of their min_samples, so each of them counts it
        self.samples: dict[str, int] = {}
        for s in spec.slos:
            if s.sli == "estimated_accuracy":
                self.samples[s.model] = max(self.samples.get(s.model, 0), s.sample_floor)

    def dur(self, steps: int) -> str:
        return format_duration(steps * self.step)

    def up(self, steps: int) -> list[dict[str, str]]:
        return [{"series": f'up{{job="{self.spec.job}",instance="{i}"}}', "values": f"1x{steps}"}
                for i in series.INSTANCES]

    def inputs(self, scens: list[_Scenario], steps: int) -> list[dict[str, str]]:
        out = self.up(steps)
        for scen in scens:
            out += series.input_series(scen.slo, scen.profile, self.samples.get(scen.slo.model))
        return _dedupe(out)

    def burn_check(self, scens: list[_Scenario], at: int) -> dict[str, Any]:
        exp = []
        for scen in scens:
            for sev, value in scen.firing(at).items():
                if _near_rounding(value):
                    raise GenerationError(f"{scen.slo.name}: burn rate at step {at} sits on a rounding boundary")
                rule = self.burn_rules[(scen.slo.name, scen.slo.model, sev)]
                ann = dict(rule.annotations)
                exp.append({
                    "exp_labels": {"severity": sev, "slo": scen.slo.name, "model": scen.slo.model,
                                   "sli": scen.slo.sli},
                    "exp_annotations": {
                        "summary": _render(ann["summary"], scen.slo.model),
                        "description": _render(ann["description"], scen.slo.model, value),
                        "runbook_url": ann["runbook_url"],
                    },
                })
        return {"eval_time": self.dur(at), "alertname": BURN_ALERT, "exp_alerts": exp}

    def quiet(self, at: int, except_: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return [{"eval_time": self.dur(at), "alertname": n, "exp_alerts": []}
                for n in self.alerts if n not in except_]

    @staticmethod
    def _check_clear(scens: list[_Scenario], ats: list[int], what: str) -> None:
        for at in ats:
            for scen in scens:
                if scen.ambiguous(at):
                    raise GenerationError(f"{scen.slo.name}: {what}: step {at} is too close to a threshold")

    @staticmethod
    def _outage(start: int, length: int | None) -> Callable[[int], float]:
        def bad(s: int) -> float:
            return 1.0 if s > start and (length is None or s <= start + length) else 0.0
        return bad

    def _first_page(self, slo: SloSpec, pair: BurnWindow, warm: int) -> int:
        """Steps of full outage (after `warm` healthy ones) until `pair` first fires, unambiguously."""
        limit = _steps(pair.detection_s(1.0, slo.budget), self.step) + MAX_STAGGER
        scen = _Scenario(slo, series.Profile(warm + limit + 1, self._outage(warm, None)), self.plan, self.step)
        for n in range(1, limit + 1):
            if scen.pair_fires(pair, warm + n) and not scen.ambiguous(warm + n):
                return n
        raise GenerationError(f"{slo.name}: a full outage never pages through {pair.long}/{pair.short}")

    def _companions(self, active: list[_Scenario], others: tuple[SloSpec, ...], steps: int) -> list[_Scenario]:
        """Scenarios for the SLOs of other rounds (see `_rounds`): an SLO reading the same series as
        an active one reads its profile (its alerts are expected as they come), the rest healthy traffic."""
        profiles = {series.input_key(x.slo): x.profile.bad for x in active}
        healthy = _constant(0.0)
        return [_Scenario(o, series.Profile(steps, profiles.get(series.input_key(o), healthy)), self.plan, self.step)
                for o in others]

    # --- scenarios, each run for every SLO of a round at once ---------------------------
    def recovery(self, pair: BurnWindow, label: str, active: tuple[SloSpec, ...], others: tuple[SloSpec, ...] = (),
                 ) -> tuple[dict[str, Any], dict[tuple[str, str], tuple[int, int]]]:
        """`_recovery` after the shortest steady state that leaves clear check instants.

        Staggering the outages is not always enough: where the history is shorter than the
        slowest ticket window, an SLO's burn rate there is its bad steps over the whole history,
        the same for every stagger, and may sit on a rounding tie of the alert's description
        (9 bad steps of 400 at a 1% budget: 2.25x). A longer steady state moves it off.
        """
        base = _steps(self.slow.long_s, self.step)
        for extra in range(MAX_STAGGER + 1):
            try:
                return self._recovery(pair, label, active, others, base + extra)
            except GenerationError:
                if extra == MAX_STAGGER:
                    raise
        raise AssertionError("unreachable")

    def _recovery(self, pair: BurnWindow, label: str, active: tuple[SloSpec, ...], others: tuple[SloSpec, ...],
                  warm: int) -> tuple[dict[str, Any], dict[tuple[str, str], tuple[int, int]]]:
        """A steady state as long as the slow page pair's long window, then a full outage
        just long enough to page through `pair`, then healthy traffic again.

        Checks: quiet before, paging at the end of the outage (the detection pin), page
        resolved within the pair's short window plus one step after it. SLOs share one
        test, so their outages are staggered until no SLO sits near a threshold at any
        other SLO's check instant.
        """
        lengths = {(s.model, s.name): self._first_page(s, pair, warm) for s in active}
        # Where windows are short (short periods), an outage that trips `pair` may trip a
        # slower page pair too; the page then lasts until that pair's short window clears.
        longest_reset = _steps(max(p.short_s for p in self.plan.by_severity("page")), self.step) + 1
        horizon = warm + max(lengths.values()) + longest_reset + MAX_STAGGER + 2
        resets: dict[tuple[str, str], int] = {}
        scens: list[_Scenario] = []
        ats: set[int] = set()
        for slo in active:
            n = lengths[(slo.model, slo.name)]
            for offset in range(MAX_STAGGER + 1):
                start = warm + offset
                scen = _Scenario(slo, series.Profile(horizon, self._outage(start, n)), self.plan, self.step)
                tripped = [p for p in self.plan.by_severity("page") if scen.pair_fires(p, start + n)]
                reset = _steps(max((p.short_s for p in tripped), default=pair.short_s), self.step) + 1
                mine = {start, start + n, start + n + reset}
                if n > 1 and not scen.ambiguous(start + n - 1):
                    mine.add(start + n - 1)  # pins the page to this very step: not a step earlier
                # SLOs of other rounds reading this SLO's series see its outage too
                mates = [x for x in self._companions([scen], others, horizon)
                         if series.input_key(x.slo) == series.input_key(slo)]
                if all(not x.ambiguous(a) for x in scens + [scen, *mates] for a in ats | mine):
                    break
            else:
                raise GenerationError(f"{slo.name}: {label}: no clear check instants")
            if pair not in tripped:
                raise GenerationError(f"{slo.name}: {label}: an outage of {n} steps does not page "
                                      f"through {pair.long}/{pair.short}")
            if "page" in scen.firing(start + n + reset):
                raise GenerationError(f"{slo.name}: {label}: the page outlives the short windows plus a step")
            resets[(slo.model, slo.name)] = reset
            scens.append(scen)
            ats |= mine
        total = max(ats) + 1
        scens = [_Scenario(x.slo, series.Profile(total, x.profile.bad), self.plan, self.step) for x in scens]
        scens += self._companions(scens, others, total)
        self._check_clear(scens[len(active):], sorted(ats), label)
        pins = {key: (lengths[key] * self.step, resets[key] * self.step) for key in lengths}
        test = {"name": (f"{label}: full outages page through the {pair.long}/{pair.short} pair at the first "
                         f"step the Workbook's detection time allows, not a step earlier, and the page resolves "
                         f"within the short window of the page pairs they tripped plus a step"),
                "interval": format_duration(self.step), "input_series": self.inputs(scens, total),
                "alert_rule_test": [self.burn_check(scens, a) for a in sorted(ats)]}
        return test, pins

    def constant(self, burn: float, name: str, active: tuple[SloSpec, ...],
                 others: tuple[SloSpec, ...] = ()) -> dict[str, Any]:
        """Every SLO of the round burning at a constant `burn` x its budget from the start (1 = exactly
        the budget)."""
        total = _steps(self.fast.long_s, self.step) + 2
        scens = []
        for s in active:
            frac = _exact_budget(s) if burn == 1.0 else burn * s.budget
            scens.append(_Scenario(s, series.Profile(total, _constant(frac)), self.plan, self.step))
        companions = self._companions(scens, others, total)
        ats = sorted({2, total // 2, total - 1})
        if burn == 1.0:
            # nothing of the round fires; an SLO of another round reading the same series may
            self._check_clear(companions, ats, name)
            checks = [c if c["alertname"] != BURN_ALERT else self.burn_check(scens + companions, a)
                      for a in ats for c in self.quiet(a)]
        else:
            self._check_clear(scens + companions, ats, name)
            for a in ats:
                for scen in scens:
                    fired = scen.firing(a)
                    # an accuracy estimate younger than half the short window of every ticket pair
                    # this burn trips cannot tick yet
                    young = not any(scen.estimate_old_enough(p, a) for p in self.plan.by_severity("ticket")
                                    if p.factor_for(scen.slo.budget) < burn)
                    if "page" in fired or ("ticket" not in fired and not young):
                        raise GenerationError(f"{scen.slo.name}: {name}: expected a ticket and no page at {a}")
            checks = [self.burn_check(scens + companions, a) for a in ats]
        return {"name": name, "interval": format_duration(self.step),
                "input_series": self.inputs(scens + companions, total), "alert_rule_test": checks}

    def idle(self) -> dict[str, Any]:
        steps = _steps(self.fast.long_s, self.step) + 2
        inputs = self.up(steps)
        for slo in self.spec.slos:
            inputs += series.input_series(slo, series.healthy(steps, traffic=0), self.samples.get(slo.model))
        at = steps - 1
        exprs = []
        for span in (self.plan.ranges_s[0], self.plan.period_s):
            name = recorded.error_ratio_name(span)
            exprs.append({"expr": name, "eval_time": self.dur(at), "exp_samples": [
                {"labels": f'{name}{{model="{s.model}",sli="{s.sli}",slo="{s.name}"}}', "value": 0}
                for s in self.spec.slos]})
        exprs.append({"expr": recorded.BUDGET_REMAINING, "eval_time": self.dur(at), "exp_samples": [
            {"labels": f'{recorded.BUDGET_REMAINING}{{model="{s.model}",sli="{s.sli}",slo="{s.name}"}}',
             "value": 1} for s in self.spec.slos]})
        return {"name": "idle: counters present but flat; ratios are 0 (not NaN) and nothing fires",
                "interval": format_duration(self.step), "input_series": _dedupe(inputs),
                "alert_rule_test": self.quiet(at), "promql_expr_test": exprs}

    def absent(self) -> dict[str, Any]:
        absent_for = _steps(parse_duration(_absent_for(self.files)), self.step)
        steps = absent_for + 3
        exp = []
        seen: set[str] = set()
        for slo in self.spec.slos:
            for sel in required_selectors(slo):
                if sel in seen:
                    continue
                seen.add(sel)
                rule = next(r for f in self.files for g in f.groups for r in g.rules
                            if r.alert == ABSENT_ALERT and r.expr == f"absent({sel})")
                labels = dict(re.findall(r'(\w+)="([^"]*)"', sel))
                labels.update(dict(rule.labels))
                ann = dict(rule.annotations)
                exp.append({"exp_labels": labels, "exp_annotations": {
                    "summary": _render(ann["summary"], slo.model),
                    "description": ann["description"], "runbook_url": ann["runbook_url"]}})
        checks = self.quiet(1) + self.quiet(steps - 1, except_=(ABSENT_ALERT,))
        checks.append({"eval_time": self.dur(steps - 1), "alertname": ABSENT_ALERT, "exp_alerts": exp})
        return {"name": "no sentinel series at all: only SentinelMetricsAbsent fires, after its `for`",
                "interval": format_duration(self.step), "input_series": self.up(steps), "alert_rule_test": checks}


def _rounds(slos: tuple[SloSpec, ...]) -> list[tuple[SloSpec, ...]]:
    """The SLOs split so that no two SLOs of a round read the same input series (`series.input_key`).

    Each round gets its own scenario tests, in which its SLOs burn as the test says and the
    others run alongside (`_Builder._companions`); a file whose SLOs all read their own series
    (the usual case) is one round.
    """
    rounds: list[list[SloSpec]] = []
    for slo in slos:
        key = series.input_key(slo)
        for r in rounds:
            if all(series.input_key(x) != key for x in r):
                r.append(slo)
                break
        else:
            rounds.append([slo])
    return [tuple(r) for r in rounds]


def _absent_for(files: tuple[RuleFile, ...]) -> str:
    for f in files:
        for g in f.groups:
            for r in g.rules:
                if r.alert == ABSENT_ALERT and r.for_:
                    return r.for_
    return "0s"


def _constant(fraction: float) -> Callable[[int], float]:
    """A bad-fraction profile that is `fraction` at every step."""
    return lambda _step: fraction


def _exact_budget(slo: SloSpec) -> float:
    """The bad fraction closest to the budget that does not exceed it in floating point."""
    count = round(slo.budget * series.TRAFFIC_PER_STEP)
    while count / series.TRAFFIC_PER_STEP > slo.budget:
        count -= 1
    return count / series.TRAFFIC_PER_STEP


def _near_rounding(value: float) -> bool:
    scaled = value * 10
    return abs(scaled - math.floor(scaled) - 0.5) < 1e-6


def _dedupe(items: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    for item in items:
        seen.setdefault(item["series"], item)
    return list(seen.values())


def generate_tests(spec: SloFile, files: tuple[RuleFile, ...], rules_dir_from_test: str = "..") -> GeneratedTests:
    """The promtool test file for `files` (which live at `rules_dir_from_test` relative to it)."""
    b = _Builder(spec, files)
    rounds = _rounds(spec.slos)
    scenario_tests: list[dict[str, Any]] = []
    fast_pins: dict[tuple[str, str], tuple[int, int]] = {}
    slow_pins: dict[tuple[str, str], tuple[int, int]] = {}
    for i, active in enumerate(rounds):
        others = tuple(s for s in spec.slos if s not in active)
        # one round in the usual case; more only where SLOs share their input series
        tag = "" if len(rounds) == 1 else (f" [round {i + 1} of {len(rounds)}: "
                                           + ", ".join(f"{s.model}/{s.name}" for s in active) + "]")
        fast_test, fast = b.recovery(b.fast, "recovery", active, others)
        slow_test, slow = b.recovery(b.slow, "long recovery", active, others)
        fast_pins.update(fast)
        slow_pins.update(slow)
        round_tests = [
            fast_test,
            slow_test,
            b.constant(SLOW_BURN, f"slow burn at {SLOW_BURN}x the budget rate: a ticket, never a page",
                       active, others),
            b.constant(1.0, "errors at exactly the budget rate (the budget spent exactly over the period): "
                            "nothing fires", active, others),
        ]
        for t in round_tests:
            t["name"] += tag
        scenario_tests += round_tests
    tests = [*scenario_tests, b.idle(), b.absent()]
    pins = tuple(
        Pins(s.name, s.model, s.objective, b.fast.detection_s(1.0, s.budget),
             fast_pins[(s.model, s.name)][0], fast_pins[(s.model, s.name)][1], slow_pins[(s.model, s.name)][1])
        for s in spec.slos)
    # promtool evaluates groups in map order unless told; recording groups go first so
    # alerts see this step's ratios, as a fresh evaluation in Prometheus would.
    groups = [g.name for f in files for g in f.groups]
    order = [g for g in groups if g.endswith(":recording")] + [g for g in groups if not g.endswith(":recording")]
    doc = {
        "rule_files": [f"{rules_dir_from_test}/{f.filename}" for f in files],
        "evaluation_interval": format_duration(b.step),
        "group_eval_order": order,
        "tests": tests,
    }
    header = ("# Generated by `sentinel rules generate`; run with `sentinel rules test` or\n"
              f"# `promtool test rules {TEST_FILE}`. Do not edit by hand.\n")
    return GeneratedTests(TEST_FILE, header + dump_yaml(doc), pins)
