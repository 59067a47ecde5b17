"""Grafana dashboards (overview, on-call, debug) generated from the SLO file and metric names.

Each dashboard is first described as plain values (`DashboardSpec`, `PanelSpec`,
`Query`) so tests can walk every query (the real-Prometheus test runs each one), then
rendered to Grafana JSON with grafana-foundation-sdk. Every panel has a unit and a
description; every query selects on the template variables `$model`, `$version` (via
`$instance`) and `$instance` where its metric carries those labels.

The `version` variable lists the versions `sentinel_model_info` reports for `$model`;
`instance` lists the replicas serving the chosen model versions, so picking a version
narrows every panel to the replicas that serve it.

Every query that reads a metric carrying `model` keeps `model` in its result and names it
in its legend, so two models (or one replica serving two) never share a line. Panels get
ids and grid positions that never overlap or leave the 24 columns (`layout`), explicit
colour thresholds, and a `noValue` text where an empty result has a known meaning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import table as gtable
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as mdash

from sentinel import metricnames as mn
from sentinel.slo import recorded
from sentinel.slo.rules import BURN_ALERT
from sentinel.slo.sli import BAD_CODE_REGEX
from sentinel.slo.spec import SloFile
from sentinel.slo.windows import WindowPlan, plan_windows

PanelKind = Literal["timeseries", "stat", "table"]

DATASOURCE = mdash.DataSourceRef(type_val="prometheus", uid="${datasource}")
M = 'model=~"$model"'
I = 'instance=~"$instance"'
MI = f"{M},{I}"
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    """One PromQL target. `expect_data` is False where an empty result is the healthy case."""

    expr: str
    legend: str = ""
    expect_data: bool = True
    instant: bool = False


@dataclass(frozen=True)
class PanelSpec:
    title: str
    kind: PanelKind
    unit: str
    description: str
    queries: tuple[Query, ...]
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    # What the panel says when its queries return nothing (Grafana's "No data" otherwise).
    no_value: str = ""
    # Colour steps (value, colour), lowest first; the first value is None (-Infinity).
    # Without them Grafana colours by its default (green, red from 80), wrong for every unit here.
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "blue"),)
    decimals: int | None = None


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    filename: str
    title: str
    description: str
    panels: tuple[PanelSpec, ...]


def _burn(window: str, slo_filter: str = M) -> str:
    return (f"{recorded.ERROR_RATIO_PREFIX}{window}{{{slo_filter}}}\n/ on (slo, model)\n"
            f"(1 - {recorded.OBJECTIVE}{{{slo_filter}}})")


def cost_query(spec: SloFile) -> str:
    """Cost per 1,000 inferences over the dashboard's range, from `cost:` in the SLO file.

    Serving cost per hour is the replicas serving the model (sidecars reporting
    `sentinel_model_info`) times `cost.replica_hour`, plus the GPUs those replicas report
    times `cost.gpu_hour`; divided by the thousands of requests per hour over `$__range`.
    """
    info = f"{mn.MODEL_INFO.sample_name}{{{M}}}"
    gpus = f"count({mn.GPU_MEMORY_TOTAL.name} and on (instance) {info})"
    # a sidecar reports one sentinel_model_info per model it serves: count each replica once
    per_hour = (f"count(count by (instance) ({info})) * {_num(spec.cost.replica_hour)}\n"
                f"+ ({gpus} or vector(0)) * {_num(spec.cost.gpu_hour)}")
    rate = f"sum(rate({mn.REQUESTS.sample_name}{{{M}}}[$__range]))"
    return f"(\n{per_hour}\n)\n/\nclamp_min({rate} * 3600 / 1000, 1e-9)"


def _num(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def overview(spec: SloFile) -> DashboardSpec:
    plan = plan_windows(spec.period_seconds, spec.scrape_interval_seconds)
    period_ratio = recorded.error_ratio_name(plan.period_s)
    burn_queries = tuple(Query(_burn(p.long), legend=f"{{{{model}}}} {{{{slo}}}} {p.long}")
                         for p in plan.by_severity("page"))
    req = mn.REQUESTS.sample_name
    return DashboardSpec(
        uid="sentinel-overview", filename="sentinel-overview.json", title="sentinel / overview",
        description=f"Executive view: SLO status of the models sentinel watches over the {spec.period} period, "
                    f"versions in service, volume and cost.",
        panels=(
            PanelSpec("SLI over the period", "stat", "percentunit",
                      f"Fraction of good events over the whole {spec.period} period, per SLO "
                      f"(1 - recorded error ratio).",
                      (Query(f"1 - {period_ratio}{{{M}}}", "{{model}} {{slo}}", instant=True),), width=8, decimals=3),
            PanelSpec("Error budget remaining", "stat", "percentunit",
                      f"Share of the {spec.period} error budget left: 100% untouched, 0 spent, negative "
                      f"overspent.",
                      (Query(f"{recorded.BUDGET_REMAINING}{{{M}}}", "{{model}} {{slo}}", instant=True),), width=8,
                      decimals=1, thresholds=((None, "red"), (0, "orange"), (0.25, "green"))),
            PanelSpec("SLO alerts firing", "table", "none",
                      f"{BURN_ALERT} alerts firing now, by SLO and severity. Empty is good.",
                      (Query(f'ALERTS{{alertname="{BURN_ALERT}",alertstate="firing",{M}}}', "",
                             expect_data=False, instant=True),), width=8, no_value="none firing"),
            PanelSpec("Burn rate (page windows)", "timeseries", "suffix:x",
                      "Error-budget burn rate over the long window of each page pair: 1 spends the budget "
                      "exactly over the period; the page pairs fire above "
                      + ", ".join(f"{p.factor:g}x ({p.long})" for p in plan.by_severity("page")) + "."
                      + _lowered_factors(spec, plan),
                      burn_queries, width=12),
            PanelSpec("Estimated accuracy", "timeseries", "percentunit",
                      "Label-free accuracy estimate (ATC) and its lower bound (samples outside the golden "
                      "set's support counted as wrong; the SLO uses it), averaged over the selected "
                      "replicas, with the objective of each estimated-accuracy SLO.",
                      (Query(f'avg by (model, method) ({mn.ESTIMATED_ACCURACY.name}{{{MI},method=~"atc|atc_lower"}})',
                             "{{model}} {{method}}"),
                       Query(f'{recorded.OBJECTIVE}{{{M},sli="estimated_accuracy"}}', "{{model}} objective")),
                      width=12, min=0, max=1),
            PanelSpec("Request rate", "timeseries", "reqps",
                      "Inference requests per second through the selected sidecars.",
                      (Query(f"sum by (model) (rate({req}{{{MI}}}[{RATE}]))", "{{model}}"),), width=12),
            PanelSpec("Models and versions in service", "table", "none",
                      "Replicas reporting each model version (sentinel_model_info).",
                      (Query(f'count by (model, version) ({mn.MODEL_INFO.sample_name}{{{M},version=~"$version"}})',
                             "", instant=True),), width=12),
            PanelSpec("Inferences in the range", "stat", "short",
                      "Inference requests answered over the dashboard's time range, per model.",
                      (Query(f"sum by (model) (increase({req}{{{M}}}[$__range]))", "{{model}}", instant=True),),
                      width=8),
            PanelSpec("Cost per 1,000 inferences", "stat", f"currency{spec.cost.currency}",
                      f"Serving cost of 1,000 inferences of the selected models over the time range: replicas (each "
                      f"sidecar once, however many models it serves) x "
                      f"{spec.cost.replica_hour:g} {spec.cost.currency}/replica-hour + GPUs x "
                      f"{spec.cost.gpu_hour:g} {spec.cost.currency}/GPU-hour (`cost:` in the SLO file), "
                      f"divided by thousands of requests per hour.",
                      (Query(cost_query(spec), "selected models", instant=True),), width=8, decimals=4),
            PanelSpec("Model size", "stat", "bytes",
                      "Size of the weights of the model version each sidecar watches (registry entry).",
                      (Query(f"max by (model) ({mn.MODEL_SIZE.name}{{{M}}})", "{{model}}", instant=True),),
                      width=8),
        ),
    )


def oncall(spec: SloFile) -> DashboardSpec:
    hist = mn.REQUEST_DURATION.sample_name
    req = mn.REQUESTS.sample_name
    replay = mn.REPLAY_REQUESTS.sample_name
    quantiles = tuple(
        Query(f"histogram_quantile({q}, sum by (model, le) (rate({hist}{{{MI}}}[{RATE}])))",
              f"{{{{model}}}} p{int(q * 100)}")
        for q in (0.5, 0.95, 0.99))
    thresholds = sorted({s.threshold for s in spec.slos if s.sli == "latency" and s.threshold})
    slo_note = (" Latency SLO thresholds: " + ", ".join(f"{t:g}s" for t in thresholds) + ".") if thresholds else ""
    return DashboardSpec(
        uid="sentinel-oncall", filename="sentinel-oncall.json", title="sentinel / on-call",
        description="What on-call looks at first: latency, errors, drift, GPU memory, canary.",
        panels=(
            PanelSpec("Latency P50 / P95 / P99", "timeseries", "s",
                      "Request latency quantiles per model from the sidecars' histograms, all codes, selected replicas."
                      + slo_note, quantiles),
            PanelSpec("Error ratio by code", "timeseries", "percentunit",
                      "Share of each model's requests by non-2xx status code. Codes matching "
                      f"\"{BAD_CODE_REGEX}\" spend the availability budget; 499: the client left first; "
                      "incomplete: the body was cut.",
                      (Query(f'sum by (model, code) (rate({req}{{{MI},code!~"2.."}}[{RATE}]))\n/ ignoring (code) '
                             f"group_left\nsum by (model) (rate({req}{{{MI}}}[{RATE}]))", "{{model}} {{code}}",
                             expect_data=False),)),
            PanelSpec("Drift alarms", "timeseries", "bool",
                      "1 while a detector's corrected p-value is below alpha, per detector and replica. "
                      "SentinelDriftAlarm fires when one stays up for 30 minutes.",
                      (Query(f"max by (model, detector, instance) ({mn.DRIFT_ALARM.name}{{{MI}}})",
                             "{{model}} {{detector}} {{instance}}"),), min=0, max=1),
            PanelSpec("Estimated accuracy by replica", "timeseries", "percentunit",
                      "Label-free (ATC) accuracy estimate and its lower bound per replica over its last window.",
                      (Query(f'{mn.ESTIMATED_ACCURACY.name}{{{MI},method=~"atc|atc_lower"}}',
                             "{{model}} {{instance}} {{method}}"),),
                      min=0, max=1),
            PanelSpec("Accuracy estimate usable", "timeseries", "percentunit",
                      "Share of replicas whose accuracy estimate the estimated-accuracy SLO counts now (at least "
                      "its min_samples samples behind it, not flagged unreliable), and per replica the "
                      "estimator's reliable flag. At 0 the SLO and its alerts are silent: "
                      "SentinelAccuracyEstimateUnreliable says why.",
                      (Query(f"{recorded.ESTIMATE_USABLE}{{{M}}}", "{{model}} {{slo}} usable share"),
                       Query(f"{mn.ACCURACY_ESTIMATE_RELIABLE.name}{{{MI}}}", "{{model}} {{instance}} reliable")),
                      min=0, max=1),
            PanelSpec("GPU memory used", "timeseries", "percentunit",
                      "Device memory in use over device total, per GPU. SentinelGpuMemoryHigh fires above 90% "
                      "for 5 minutes.",
                      (Query(f"{mn.GPU_MEMORY_USED.name}{{{I}}}\n/ clamp_min({mn.GPU_MEMORY_TOTAL.name}{{{I}}}, 1)",
                             "{{instance}} gpu {{gpu}}"),), min=0, max=1, no_value=_NO_GPU),
            PanelSpec("GPU headroom at max batch", "timeseries", "bytes",
                      "Free device memory minus the predicted extra need at the configured max batch; "
                      "below zero a full batch would run out of memory.",
                      (Query(f"{mn.GPU_MEMORY_HEADROOM.name}{{{MI}}}", "{{model}} {{instance}} gpu {{gpu}}"),),
                      no_value=_NO_GPU),
            PanelSpec("Canary replay results", "timeseries", "reqps",
                      "Golden-set canary requests per second by result (ok, error).",
                      (Query(f"sum by (model, result) (rate({replay}{{{MI}}}[{RATE}]))", "{{model}} {{result}}"),),
                      no_value="no canary replays (replay.canary_interval_s 0, or no golden set)"),
            PanelSpec("Alerts firing", "table", "none",
                      "Every sentinel alert firing now for the selected models. Empty is good.",
                      # alerts without a model label (SentinelDown, GPU, collectors) show whatever is picked
                      (Query(f'ALERTS{{alertname=~"Sentinel.*",alertstate="firing",{M}}}\n'
                             'or ALERTS{alertname=~"Sentinel.*",alertstate="firing",model=""}', "",
                             expect_data=False, instant=True),), no_value="none firing"),
            *version_comparison(),
            PanelSpec("Input contract violations", "timeseries", "ops",
                      "Sampled inputs per second failing an input-contract check, by check and version. "
                      "A new version that receives inputs it was not built for shows here first.",
                      (Query(f"sum by (model, check, version) (rate({mn.INPUT_CONTRACT_VIOLATIONS.sample_name}"
                             f"{{{MI}}}[{RATE}]))", "{{model}} {{check}} {{version}}", expect_data=False),),
                      no_value="0 (no sampled input checked yet)"),
            PanelSpec("Drift diagnosis", "table", "none",
                      "What the drift most likely is, in words: the kind of shift and the input transform that "
                      "best explains it, per model, version and replica. Empty while nothing drifts.",
                      (Query(f"max by (model, version, instance, kind) ({mn.DRIFT_DIAGNOSIS.name}{{{MI}}}) == 1",
                             "", expect_data=False, instant=True),
                       Query(f"max by (model, version, instance, transform) "
                             f"({mn.DRIFT_DIAGNOSIS_TRANSFORM.name}{{{MI}}}) == 1",
                             "", expect_data=False, instant=True)), width=24, no_value="no diagnosis yet"),
        ),
    )


_NO_GPU = "no GPU metrics: NVML unavailable or gpu.enabled off (sentinel_gpu_available 0)"


def version_comparison() -> tuple[PanelSpec, ...]:
    """Per-version panels (the `version` target label): one line per version serving, side by side."""
    req = mn.REQUESTS.sample_name
    hist = mn.REQUEST_DURATION.sample_name
    agr = mn.REFERENCE_AGREEMENT.sample_name
    verd = mn.ACCURACY_VERDICTS.sample_name
    pred = mn.PREDICTIONS.sample_name
    total = f"sum by (model, version) (rate({req}{{{MI}}}[{RATE}]))"
    compared = f'sum by (model, version) (rate({agr}{{{MI},source=~"shadow|replay"}}[{RATE}]))'
    verdicts = f"sum by (model, version) (rate({verd}{{{MI}}}[{RATE}]))"
    note = " Compare a canary with its baseline here; `sentinel gate` judges the same series with statistical tests."
    return (
        PanelSpec("Versions: error ratio", "timeseries", "percentunit",
                  f"Share of requests whose code spends the availability budget (code=~\"{BAD_CODE_REGEX}\"), "
                  f"per version." + note,
                  (Query(f'(sum by (model, version) (rate({req}{{{MI},code=~"{BAD_CODE_REGEX}"}}[{RATE}])) '
                         f"or 0 * {total})\n/ clamp_min({total}, 1e-12)", "{{model}} {{version}}"),), width=12),
        PanelSpec("Versions: P95 latency", "timeseries", "s",
                  "95th percentile of request latency per version, from the sidecars' histograms." + note,
                  (Query(f"histogram_quantile(0.95, sum by (model, version, le) (rate({hist}{{{MI}}}[{RATE}])))",
                         "{{model}} {{version}}"),), width=8),
        PanelSpec("Versions: agreement with the reference", "timeseries", "percentunit",
                  "Share of shadow and replay comparisons in which the version's answer matches the reference "
                  "model's, per version." + note,
                  (Query(f'sum by (model, version) (rate({agr}{{{MI},source=~"shadow|replay",result="agree"}}[{RATE}]))'
                         f"\n/ clamp_min({compared}, 1e-12)", "{{model}} {{version}}"),), width=8, min=0, max=1),
        PanelSpec("Versions: accuracy lower bound", "timeseries", "percentunit",
                  "Label-free accuracy lower bound per version: likely-correct verdicts over all verdicts." + note,
                  (Query(f'(sum by (model, version) (rate({verd}{{{MI},verdict="likely_correct"}}[{RATE}])) '
                         f"or 0 * {verdicts})\n/ clamp_min({verdicts}, 1e-12)", "{{model}} {{version}}",
                         expect_data=False),),
                  width=8, min=0, max=1),
        PanelSpec("Versions: predicted classes", "timeseries", "percentunit",
                  "Share of each predicted class per version: on the same traffic, a version that predicts "
                  "differently shows here even when nothing errors." + note,
                  (Query(f"sum by (model, version, class) (rate({pred}{{{MI}}}[{RATE}]))\n/ ignoring (class) group_left\n"
                         f"clamp_min(sum by (model, version) (rate({pred}{{{MI}}}[{RATE}])), 1e-12)",
                         "{{model}} {{version}} class {{class}}"),), width=12, min=0, max=1),
    )


def debug(spec: SloFile) -> DashboardSpec:
    samples = mn.SAMPLES.sample_name
    offered = f'sum by (model) (rate({samples}{{{MI},outcome=~"queued|dropped"}}[{RATE}]))'
    return DashboardSpec(
        uid="sentinel-debug", filename="sentinel-debug.json", title="sentinel / debug",
        description="Internals of the sidecars: detectors, sampling, queue, GPU processes, collectors.",
        panels=(
            PanelSpec("Drift p-values", "timeseries", "none",
                      "Corrected p-value of each drift detector on its last window, per replica. Below "
                      "alpha (0.05 by default) the detector alarms.",
                      (Query(f"{mn.DRIFT_P_VALUE.name}{{{MI}}}", "{{model}} {{detector}} {{instance}}"),), min=0, max=1),
            PanelSpec("Drift statistics", "timeseries", "none",
                      "Test statistic of each detector on its last window (KS distance, MMD, ...).",
                      (Query(f"{mn.DRIFT_STATISTIC.name}{{{MI}}}", "{{model}} {{detector}} {{instance}}"),)),
            PanelSpec("Sampling by outcome", "timeseries", "ops",
                      "Sampled request/response pairs per second by outcome (queued, dropped, decoded, rejected).",
                      (Query(f"sum by (model, outcome) (rate({samples}{{{MI}}}[{RATE}]))", "{{model}} {{outcome}}"),)),
            PanelSpec("Sample drop ratio", "timeseries", "percentunit",
                      "Dropped over offered (queued + dropped) samples. SentinelSampleDropRatioHigh fires "
                      "above 10% for 15 minutes.",
                      (Query(f'(sum by (model) (rate({samples}{{{MI},outcome="dropped"}}[{RATE}]))\n'
                             f'or 0 * {offered})\n/ clamp_min({offered}, 1e-12)', "{{model}}"),), min=0, max=1),
            PanelSpec("Analysis queue depth", "timeseries", "short",
                      "Samples waiting for the analysis worker, and the queue's capacity.",
                      (Query(f"{mn.SAMPLE_QUEUE_DEPTH.name}{{{I}}}", "depth {{instance}}"),
                       Query(f"{mn.SAMPLE_QUEUE_CAPACITY.name}{{{I}}}", "capacity {{instance}}"))),
            PanelSpec("GPU memory per process", "timeseries", "bytes",
                      "Device memory used by each model-server process NVML reports.",
                      (Query(f"{mn.GPU_PROCESS_MEMORY.name}{{{I}}}", "{{instance}} gpu {{gpu}} pid {{pid}}"),),
                      no_value=_NO_GPU),
            PanelSpec("Collector health", "timeseries", "bool",
                      "1 when a collector's last scrape succeeded. SentinelCollectorFailing fires after "
                      "15 minutes at 0.",
                      (Query(f"{mn.COLLECTOR_SUCCESS.name}{{{I}}}", "{{collector}} {{instance}}"),), min=0, max=1),
            PanelSpec("Collector duration", "timeseries", "s",
                      "Duration of each collector's last scrape.",
                      (Query(f"{mn.COLLECTOR_DURATION.name}{{{I}}}", "{{collector}} {{instance}}"),)),
            PanelSpec("nginx engine: captures paused, lines lost, restarts", "timeseries", "short",
                      "proxy.engine nginx only. Captures paused: 1 while nginx captures nothing for sampling "
                      "(reason stalled or disk; SentinelCapturesPaused fires after 10 minutes). Access-log "
                      "lines the kernel dropped per second (requests missing from the SLO ratios; "
                      "SentinelAccessLogLinesLost), and nginx restarts per second.",
                      (Query(f"{mn.CAPTURES_PAUSED.name}{{{I}}}", "paused {{reason}} {{instance}}", expect_data=False),
                       Query(f"sum by (instance) (rate({mn.ACCESS_LOG_LOST.sample_name}{{{I}}}[{RATE}]))",
                             "lines lost {{instance}}", expect_data=False),
                       Query(f"sum by (instance) (rate({mn.DATAPLANE_RESTARTS.sample_name}{{{I}}}[{RATE}]))",
                             "restarts {{instance}}", expect_data=False)),
                      no_value="proxy.engine is sentinel (no nginx), or nothing to show"),
            PanelSpec("Analysis and proxy errors", "timeseries", "ops",
                      "Analysis failures by kind and requests the proxy answered itself, per second. Analysis "
                      "failures never fail a request.",
                      (Query(f"sum by (kind) (rate({mn.ANALYSIS_ERRORS.sample_name}{{{I}}}[{RATE}]))",
                             "analysis {{kind}}", expect_data=False),
                       Query(f"sum by (reason) (rate({mn.PROXY_ERRORS.sample_name}{{{I}}}[{RATE}]))",
                             "proxy {{reason}}", expect_data=False)),
                      no_value="0: no analysis or proxy error counted"),
            PanelSpec("In-flight requests", "timeseries", "short",
                      "Requests being proxied right now, per replica.",
                      (Query(f"{mn.INFLIGHT.name}{{{I}}}", "{{instance}}"),)),
            PanelSpec("Input statistics: live traffic vs golden set", "timeseries", "short",
                      "Mean of each input statistic the input_stats detector tests (per-channel mean and std, "
                      "brightness, contrast, sharpness) over the last window of live traffic, beside the same "
                      "statistic over the golden set, per model, averaged over the selected replicas. A live line leaving its golden line is the feature that "
                      "drifted.",
                      (Query(f'avg by (model, feature, source) ({mn.INPUT_FEATURE_MEAN.name}{{{MI}}})',
                             "{{model}} {{feature}} {{source}}"),), width=24),
            PanelSpec("Drift p-value per detector and version", "timeseries", "none",
                      "Corrected p-value of each detector (bbsd, label, confidence, input_stats, embedding, "
                      "consistency, "
                      "combined), lowest replica per version.",
                      (Query(f"min by (model, detector, version) ({mn.DRIFT_P_VALUE.name}{{{MI}}})",
                             "{{model}} {{detector}} {{version}}"),), min=0, max=1),
            PanelSpec("Samples behind the accuracy estimate", "timeseries", "short",
                      "Verdicts in each replica's window behind its latest accuracy estimate. Below the "
                      "estimated-accuracy SLO's min_samples (" + _min_samples_note(spec) + ") the SLO does "
                      "not count that replica's estimate.",
                      (Query(f"{mn.ACCURACY_ESTIMATE_SAMPLES.name}{{{MI}}}", "{{model}} {{instance}}"),)),
        ),
    )


def _min_samples_note(spec: SloFile) -> str:
    floors = sorted({s.sample_floor for s in spec.slos if s.sli == "estimated_accuracy"})
    return ", ".join(str(f) for f in floors) if floors else "no such SLO"


def dashboard_specs(spec: SloFile) -> tuple[DashboardSpec, ...]:
    return (overview(spec), oncall(spec), debug(spec))


def _variables() -> list[gdash.QueryVariable | gdash.DatasourceVariable]:
    info = mn.MODEL_INFO.sample_name
    return [
        gdash.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        gdash.QueryVariable("model").label("Model").datasource(DATASOURCE)
        .query(f"label_values({mn.REQUESTS.sample_name}, model)")
        .refresh(mdash.VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
        .sort(mdash.VariableSort.ALPHABETICAL_ASC),
        gdash.QueryVariable("version").label("Version").datasource(DATASOURCE)
        .query(f'label_values({info}{{model=~"$model"}}, version)')
        .refresh(mdash.VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
        .sort(mdash.VariableSort.ALPHABETICAL_ASC),
        gdash.QueryVariable("instance").label("Instance").datasource(DATASOURCE)
        .query(f'label_values({info}{{model=~"$model",version=~"$version"}}, instance)')
        .refresh(mdash.VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
        .sort(mdash.VariableSort.ALPHABETICAL_ASC),
    ]


def layout(panels: tuple[PanelSpec, ...], columns: int = 24) -> list[mdash.GridPos]:
    """Left to right, a new row when a panel would cross the grid's right edge: no overlap, none outside."""
    out: list[mdash.GridPos] = []
    x = y = row_h = 0
    for p in panels:
        w = min(p.width, columns)
        if x + w > columns:
            x, y, row_h = 0, y + row_h, 0
        out.append(mdash.GridPos(h=p.height, w=w, x=x, y=y))
        x, row_h = x + w, max(row_h, p.height)
    return out


def _panel(p: PanelSpec, panel_id: int, pos: mdash.GridPos) -> Any:
    # The three panel builders share these methods but no base type declares them.
    kinds: dict[str, Any] = {"timeseries": gts.Panel, "stat": gstat.Panel, "table": gtable.Panel}
    builder: Any = kinds[p.kind]()
    builder = builder.id(panel_id).title(p.title).description(p.description).unit(p.unit).datasource(DATASOURCE)
    builder = builder.grid_pos(pos)
    if p.min is not None:
        builder = builder.min(p.min)
    if p.max is not None:
        builder = builder.max(p.max)
    if p.no_value:
        builder = builder.no_value(p.no_value)
    if p.decimals is not None:
        builder = builder.decimals(p.decimals)
    steps = [mdash.Threshold(value=v, color=c) for v, c in p.thresholds]
    builder = builder.thresholds(gdash.ThresholdsConfig().mode(mdash.ThresholdsMode.ABSOLUTE).steps(steps))
    for i, q in enumerate(p.queries):
        target = gprom.Dataquery().expr(q.expr).ref_id("ABCDEFGH"[i]).datasource(DATASOURCE)
        if q.legend:
            target = target.legend_format(q.legend)
        if q.instant:
            target = target.instant().format(_table_format() if p.kind == "table" else _ts_format())
        builder = builder.with_target(target)
    return builder


def _table_format() -> Any:
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat
    return PromQueryFormat.TABLE


def _ts_format() -> Any:
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat
    return PromQueryFormat.TIME_SERIES


def render(spec: DashboardSpec) -> str:
    """Grafana dashboard JSON (stable key order, two-space indent, trailing newline)."""
    board = (gdash.Dashboard(spec.title).uid(spec.uid).description(spec.description)
             .tags(["sentinel", "slo"]).refresh("30s").time("now-6h", "now").timezone("browser")
             .editable())
    for v in _variables():
        board = board.with_variable(v)
    for i, (p, pos) in enumerate(zip(spec.panels, layout(spec.panels), strict=True), start=1):
        board = board.with_panel(_panel(p, i, pos))
    data = _drop_nulls(json.loads(JSONEncoder().encode(board.build())))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _drop_nulls(value: object) -> object:
    """Remove null members: Grafana treats `"options": null` worse than a missing key."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def generate_dashboards(spec: SloFile) -> dict[str, str]:
    """filename -> dashboard JSON, for every dashboard."""
    return {d.filename: render(d) for d in dashboard_specs(spec)}


def _lowered_factors(spec: SloFile, plan: WindowPlan) -> str:
    """The page factors of SLOs whose budget is too large for the Workbook's (windows.BurnWindow.factor_for)."""
    lowered = [f"{slo.name} ({slo.model}) at " + ", ".join(f"{p.factor_for(slo.budget):g}x" for p in plan.by_severity("page"))
               for slo in spec.slos
               if any(p.factor_for(slo.budget) != p.factor for p in plan.by_severity("page"))]
    return f" Lower objectives page lower: {'; '.join(lowered)}." if lowered else ""
