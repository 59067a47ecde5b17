"""Fetch both versions' counts from Prometheus, judge every criterion, and decide.

Exit codes: 0 every judged criterion passed; 1 at least one failed (a failure outranks
an inconclusive one: a canary already shown to be worse needs no more traffic);
3 none failed but at least one was inconclusive (too few samples); 2 usage or
infrastructure errors, among them a version without series and a run that did not get its
answers from Prometheus within `--timeout` (raised, not returned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sentinel.errors import InfrastructureError, UsageError
from sentinel.gate import criteria, queries
from sentinel.gate.criteria import Criterion, Verdict, VersionData
from sentinel.gate.prom import BudgetSpent, Prometheus
from sentinel.gate.settings import GateSettings
from sentinel.slo.durations import format_duration, parse_duration
from sentinel.slo.sli import BAD_CODE_REGEX
from sentinel.slo.spec import SloFile

# Criteria holding a significance test; alpha is split over them (Bonferroni), so the
# chance that a canary as good as its baseline fails any of them is at most `alpha`.
TESTED_CRITERIA = 6
DEFAULT_BUDGET = 0.001    # when the SLO file has no availability SLO for the model
# Seconds one whole gate run may spend querying Prometheus (`--timeout`). A run makes ~35
# queries; a healthy Prometheus answers them in a few seconds all told, while each alone may
# take up to prom.TIMEOUT_S, so without this bound a slow one could hold a rollout step for
# over a quarter of an hour. Running out is exit 2, an infrastructure error like a Prometheus
# that does not answer (not 3: more traffic would not help).
DEFAULT_RUN_TIMEOUT_S = 120.0

# Scrapes of one version in the window that show the window spans several scrape intervals.
SCRAPES_FOR_A_LONG_WINDOW = 4

EXIT = {Verdict.PASS: 0, Verdict.FAIL: 1, Verdict.INCONCLUSIVE: 3}


@dataclass(frozen=True)
class GateReport:
    """Everything the gate decided and why."""

    prometheus: str
    model: str
    baseline: str
    canary: str
    window: str
    evaluated_at: float
    alpha: float
    criteria: tuple[Criterion, ...]
    # Warnings Prometheus (or a Thanos/Mimir query frontend) sent with its answers, e.g. a partial
    # response with a store down: the counts may be missing replicas, so no pass rests on them.
    warnings: tuple[str, ...] = ()

    @property
    def verdict(self) -> Verdict:
        verdicts = {c.verdict for c in self.criteria}
        if Verdict.FAIL in verdicts:
            return Verdict.FAIL
        if Verdict.INCONCLUSIVE in verdicts or Verdict.PASS not in verdicts or self.warnings:
            return Verdict.INCONCLUSIVE
        return Verdict.PASS

    @property
    def exit_code(self) -> int:
        return EXIT[self.verdict]


def check_window(window: str) -> str:
    try:
        seconds = parse_duration(window)
    except ValueError as exc:
        raise UsageError(f"--window: {exc}") from None
    if seconds < 10:
        raise UsageError(f"--window: {window} is too short to hold two scrapes; use at least 10s")
    # Prometheus' own spelling: it refuses units out of order or repeated (`30m1h`, `5m5m`),
    # which would reach it as a rejected query, an infrastructure error, instead of this one.
    return format_duration(seconds)


def check_versions(prom: Prometheus, model: str, baseline: str, canary: str, window: str) -> None:
    """InfrastructureError naming what is missing when either version has no series.

    A version whose sidecar is up but has served no request yet passes: its criteria come
    out inconclusive (too few requests), as for any canary with too little traffic.
    """
    if baseline == canary:
        raise UsageError(f"--baseline and --canary are both {baseline!r}: compare two different versions")
    alternatives = "|".join(_re_escape(v) for v in (baseline, canary))
    q = queries.presence(model, alternatives, window)
    info = prom.vector(q["model_info"], queries.VERSION_LABEL)
    reqs = prom.vector(q["requests"], queries.VERSION_LABEL)
    missing, idle = [], []
    for role, version in (("baseline", baseline), ("canary", canary)):
        lacks = [name for name, got in (("sentinel_model_info", info), ("sentinel_requests_total", reqs))
                 if version not in got]
        if not lacks:
            continue
        text = (f"{role} {model}:{version} has no {' or '.join(lacks)} series "
                f"with {queries.VERSION_LABEL}={version!r} in the last {window}")
        # A sidecar that is up (model info) but has served nothing yet has no request series
        # (they appear with the first request): that is too little traffic, not a fault.
        (idle if lacks == ["sentinel_requests_total"] else missing).append((version, text))
    unlabelled = bool(prom.scalar(q["unlabelled_requests"])) if missing or idle else False
    if missing or (idle and unlabelled):
        hint = ""
        if unlabelled:
            hint = (f"; some sentinel_requests_total{{model={model!r}}} series carry no {queries.VERSION_LABEL} "
                    f"label: scrape each sidecar with a `{queries.VERSION_LABEL}` target label "
                    f"(deploy/README.md, 'Per-version series')")
        raise InfrastructureError("; ".join(text for _, text in missing + idle) + hint)
    scrapes = prom.vector(q["scrapes"], queries.VERSION_LABEL)
    served = {version for version, _ in idle} ^ {baseline, canary}
    thin = [f"{role} {model}:{version} ({_n_scrapes(scrapes.get(version, 0))})"
            for role, version in (("baseline", baseline), ("canary", canary))
            if version in served and scrapes.get(version, 0) < 2]
    # A window holding several scrapes of the other version is long enough: the thin version has
    # just begun serving (its request series appear with its first request). That is too little
    # traffic, inconclusive like an idle one, and a wider --window would not help.
    if thin and max(scrapes.values(), default=0) < SCRAPES_FOR_A_LONG_WINDOW:
        raise UsageError(
            f"--window {window}: {' and '.join(thin)} in the window, but counting what happened in it "
            f"takes two scrapes of sentinel_requests_total: use a --window of at least twice the scrape "
            f"interval (or, for a version just deployed, wait one scrape interval)")


def _n_scrapes(n: float) -> str:
    return "1 scrape" if n == 1 else f"{int(n)} scrapes"


def _re_escape(value: str) -> str:
    return "".join("\\" + ch if ch in ".+*?()[]{}|^$\\" else ch for ch in value)


def fetch(prom: Prometheus, model: str, version: str, window: str) -> VersionData:
    """Every count and gauge the criteria need, for one version."""
    # Replicas with different bucket layouts (each sidecar adds its SLO thresholds as bounds):
    # summed by `le`, a bound only some replicas have holds only their counts, and the sum
    # is no histogram. Keep the bounds every series of the version has.
    carriers = prom.vector(queries.latency_bucket_series(model, version, window), "le")
    every = max(carriers.values(), default=0.0)
    buckets = {}
    for le, count in prom.vector(queries.latency_buckets(model, version, window, counted=True), "le").items():
        if carriers.get(le, every) < every:
            continue
        try:
            buckets[float(le)] = count
        except ValueError:
            continue
    diag = queries.diagnosis(model, version)
    checked = prom.scalar(queries.contract_checked(model, version, window, counted=True))
    return VersionData(
        codes=prom.vector(queries.requests_by_code(model, version, window), "code"),
        buckets=buckets,
        classes=prom.vector(queries.predictions_by_class(model, version, window), "class"),
        agreement=prom.vector(queries.agreement_by_result(model, version, window), "result"),
        verdicts=prom.vector(queries.verdicts(model, version, window), "verdict"),
        reliable=prom.scalar(queries.estimate_reliable(model, version, window)),
        atc=prom.scalar(queries.atc_estimate(model, version, window)),
        drift=prom.vector(queries.drift_alarm_share(model, version, window), "detector"),
        contract_checked=checked,
        contract_violating=(prom.scalar(queries.contract_violating(model, version, window, counted=True))
                            if checked else None),
        contract_by_check=prom.vector(queries.contract_by_check(model, version, window), "check") if checked else {},
        diagnosis_kind=tuple(sorted(prom.vector(diag["kind"], "kind"))),
        diagnosis_transform=tuple(sorted(prom.vector(diag["transform"], "transform"))),
    )


def budget_for(slo: SloFile | None, model: str) -> float:
    """The availability SLO's error budget for the model (DEFAULT_BUDGET without one)."""
    if slo is not None:
        for s in slo.slos:
            if s.model == model and s.sli == "availability":
                return s.budget
    return DEFAULT_BUDGET


def judge(b: VersionData, c: VersionData, settings: GateSettings, budget: float) -> tuple[Criterion, ...]:
    """Every criterion, in report order."""
    alpha = settings.alpha / TESTED_CRITERIA
    n_b_pred = int(round(sum(b.classes.values())))
    n_c_pred = int(round(sum(c.classes.values())))
    return (
        criteria.error_ratio(b, c, settings, alpha, budget, BAD_CODE_REGEX),
        criteria.latency(b, c, settings, alpha),
        criteria.prediction_distribution(b, c, settings, alpha),
        criteria.accuracy(b, c, settings, alpha, n_b_pred, n_c_pred),
        criteria.reference_agreement(b, c, settings, alpha),
        criteria.drift(c, settings, b),
        criteria.input_contract(c, settings, alpha, b),
    )


def run_gate(prometheus: str, model: str, baseline: str, canary: str, window: str = "10m",
             slo: SloFile | None = None, at: float | None = None,
             timeout: float = DEFAULT_RUN_TIMEOUT_S) -> GateReport:
    """Query Prometheus and judge `canary` against `baseline` over the last `window`, within `timeout` seconds."""
    window = check_window(window)
    if baseline == canary:
        raise UsageError(f"--baseline and --canary are both {baseline!r}: compare two different versions")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise UsageError(f"--timeout: must be a positive number of seconds, got {timeout:g}")
    settings = slo.gate if slo is not None else GateSettings()
    step = "asking Prometheus for its time"
    try:
        with Prometheus(prometheus, time=at, budget=timeout) as prom:
            # "Now" is Prometheus' now, fixed for every query: a gate host whose clock runs ahead
            # would otherwise judge a window partly in Prometheus' future (a shorter one, or none).
            evaluated_at = at if at is not None else prom.server_time()
            prom.time = evaluated_at
            step = "checking that both versions have series"
            check_versions(prom, model, baseline, canary, window)
            step = f"fetching the baseline's ({baseline}) series"
            b = fetch(prom, model, baseline, window)
            step = f"fetching the canary's ({canary}) series"
            c = fetch(prom, model, canary, window)
    except BudgetSpent as exc:
        raise BudgetSpent(f"{exc} (while {step}); no criterion was judged: raise --timeout "
                          f"or look at Prometheus' query latency") from None
    results = judge(b, c, settings, budget_for(slo, model))
    return GateReport(prometheus, model, baseline, canary, window, evaluated_at, settings.alpha, results,
                      tuple(prom.warnings))


def finite(x: float | None) -> float | None:
    """None for NaN and infinities (JSON has neither)."""
    if x is None or math.isnan(x) or math.isinf(x):
        return None
    return x
