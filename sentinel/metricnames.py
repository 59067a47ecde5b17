"""Every metric sentinel exports: name, type, labels and meaning, in one place.

Code that records metrics, the rule generator and the dashboard generator all read
names from here, so code, rules and dashboards cannot disagree. The README's metric
reference is generated from `METRICS` as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "sentinel_"

Kind = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    unit: str = ""

    @property
    def sample_name(self) -> str:
        """Name of the main sample series (`_total` for counters, `_bucket` for histograms)."""
        if self.kind == "counter":
            return self.name + "_total"
        if self.kind == "histogram":
            return self.name + "_bucket"
        if self.kind == "info":
            return self.name + "_info"
        return self.name


def _m(name: str, kind: Kind, help: str, labels: tuple[str, ...] = (), unit: str = "") -> MetricSpec:
    return MetricSpec(PREFIX + name, kind, help, labels, unit)


# --- traffic (hot path) -----------------------------------------------------------
# Counters are named without the `_total` suffix, as prometheus_client wants them;
# the exposed series carry `_total` (see MetricSpec.sample_name).
REQUEST_DURATION = _m(
    "request_duration_seconds", "histogram",
    "Time from receiving a request's headers to sending the last byte of its response.",
    ("model", "protocol", "code"), "seconds")
REQUESTS = _m("requests", "counter",
              "Proxied inference requests by what the client received: the HTTP status when the whole "
              "response reached it, 499 when the client left first, `incomplete` when the head went out "
              "and the body was cut.",
              ("model", "protocol", "code"))
PROXY_ERRORS = _m("proxy_errors", "counter",
                  "Requests and connections the proxy answered, cut or refused itself, by reason "
                  "(upstream refused or timed out, head timeout, headers too large, connection limit...).",
                  ("reason",))
UNMATCHED_PATHS = _m("unmatched_path_overflow", "counter",
                     "Requests whose model label was folded into `other` by the cardinality cap.")
INFLIGHT = _m("inflight_requests", "gauge", "Requests being proxied right now.")
# `code` values of REQUESTS/REQUEST_DURATION that are not an HTTP status the client read whole.
CODE_INCOMPLETE = "incomplete"   # response head sent, body cut (upstream reset/timeout/bad framing, slow reader)
CODE_CLIENT_CLOSED = "499"       # the client closed before its response was complete (nginx's 499)

# --- sampling and analysis ----------------------------------------------------------
SAMPLES = _m("samples", "counter", "Sampled request/response pairs by outcome.",
             ("model", "outcome"))
SAMPLE_QUEUE_DEPTH = _m("sample_queue_depth", "gauge", "Samples waiting for analysis.")
SAMPLE_QUEUE_CAPACITY = _m("sample_queue_capacity", "gauge", "Capacity of the sample queue.")
ANALYSIS_ERRORS = _m("analysis_errors", "counter",
                     "Analysis failures by kind (a monitor exception's type, timeout, bad_result, bad_update, "
                     "worker_start; too_many_updates and update_too_large count the metric updates dropped, "
                     "result_too_large the results not sent or not read, series_limit the updates dropped "
                     "because they would have made a series over the cardinality cap).", ("kind",))
ANALYSIS_RESTARTS = _m("analysis_worker_restarts", "counter",
                       "Analysis worker restarts by reason (exit, killed, hung, bad_result: it wrote a result "
                       "over the proxy's cap).", ("reason",))
ACCESS_LOG_LOST = _m("access_log_lost", "counter",
                     "proxy.engine nginx: access-log lines the kernel dropped before sentinel read them "
                     "(the log socket's receive buffer was full). Each is a request nginx served that "
                     "sentinel_requests_total does not hold.")
DATAPLANE_RESTARTS = _m("dataplane_restarts", "counter",
                        "proxy.engine nginx: times nginx exited while sentinel was running and was started "
                        "again.")
CAPTURES_PAUSED = _m("captures_paused", "gauge",
                     "proxy.engine nginx: 1 while nginx captures no request for sampling, by reason (stalled: "
                     "sentinel's event loop has not run for 2 s; disk: the capture folder's file system is "
                     "nearly full). No samples reach analysis meanwhile.", ("reason",))
SAMPLE_REJECTIONS = _m("sample_rejections", "counter",
                       "Sampled pairs the analysis worker rejected, by reason (a decode error kind, too_deep, "
                       "out_of_memory, timeout, unexpected_error, worker_lost, quarantined: identical to a "
                       "sample that was being handled when two workers died).", ("model", "reason"))
INGEST_EVENTS = _m("ingest_events", "counter",
                   "CloudEvents received on /ingest by outcome: accepted (first half, waiting for its pair), "
                   "joined (pair sent to analysis), orphaned (a half dropped unjoined: expired, over the join "
                   "table's bounds, repeated, or its other half over sampling.max_bytes), rejected "
                   "(malformed, unknown model, a structured or batch body over the admin listener's body "
                   "limit; a refused batch counts each event), oversize (over sampling.max_bytes or the "
                   "admin listener's body limit, or its other half was), canary (the sidecar's own canary request "
                   "and its answer, never analysed).",
                   ("outcome",))

# --- drift, accuracy, agreement ------------------------------------------------------
DRIFT_P_VALUE = _m("drift_p_value", "gauge", "Corrected p-value of a drift detector on the last window.",
                   ("model", "detector"))
DRIFT_STATISTIC = _m("drift_statistic", "gauge", "Test statistic of a drift detector on the last window.",
                     ("model", "detector"))
DRIFT_ALARM = _m("drift_alarm", "gauge", "1 when the detector's corrected p-value is below alpha.",
                 ("model", "detector"))
DRIFT_WINDOWS = _m("drift_windows", "counter", "Drift windows evaluated.", ("model",))
PREDICTIONS = _m("predictions", "counter", "Predicted classes of sampled traffic (cardinality capped).",
                 ("model", "class"))
MAX_CLASS_LABELS = 100  # class indices at or beyond this fold into class="other" on PREDICTIONS
PREDICTION_CONFIDENCE = _m("prediction_confidence", "histogram",
                           "Max softmax probability of sampled predictions; a bucket sits at the ATC threshold.",
                           ("model",), "ratio")
ESTIMATED_ACCURACY = _m("estimated_accuracy_ratio", "gauge",
                        "Label-free accuracy estimate over the last window.", ("model", "method"), "ratio")
REFERENCE_AGREEMENT = _m("reference_agreement", "counter",
                         "Served predictions compared with the reference DenseNet.",
                         ("model", "source", "result"))
DRIFT_REJECTED = _m("drift_rejected_samples", "counter",
                    "Sampled predictions the drift monitor rejected, by reason "
                    "(nonfinite_output, class_count_mismatch, input_shape, nonfinite_input).",
                    ("model", "reason"))
SHADOW_SAMPLES = _m("shadow_samples", "counter",
                    "Sampled inputs offered to the shadow reference, by outcome (compared, skipped, failed).",
                    ("model", "outcome"))
REFERENCE_MAX_ABS_DIFF = _m("reference_max_abs_diff", "gauge",
                            "Largest |served - reference| probability difference in the last shadow batch.",
                            ("model", "source"), "ratio")

# --- input statistics, live vs golden (debug dashboard) ---------------------------------
INPUT_FEATURE_MEAN = _m("input_feature_mean", "gauge",
                        "Mean of an input statistic (the input_stats detector's features) over the last "
                        "window of live traffic (source=live) and over the golden set (source=golden).",
                        ("model", "feature", "source"))

# --- golden replay (canary) ----------------------------------------------------------
REPLAY_DURATION = _m("replay_duration_seconds", "histogram", "Latency of canary replay requests.",
                     ("model",), "seconds")
REPLAY_REQUESTS = _m("replay_requests", "counter", "Canary replay requests by result.",
                     ("model", "result"))

# --- input contract, diagnosis, accuracy verdicts (issue 11) ----------------------------
INPUT_CONTRACT_CHECKED = _m("input_contract_checked_samples", "counter",
                            "Sampled inputs checked against the model version's input contract.", ("model",))
INPUT_CONTRACT_VIOLATIONS = _m("input_contract_violations", "counter",
                               "Sampled inputs violating one check of the input contract (a sample counts once "
                               "per check it violates: out_of_range, dtype, shape, nonfinite, saturated, "
                               "low_dynamic_range).", ("model", "check"))
INPUT_CONTRACT_VIOLATING = _m("input_contract_violating_samples", "counter",
                              "Sampled inputs violating at least one check of the input contract.", ("model",))
DRIFT_DIAGNOSIS = _m("drift_diagnosis", "gauge",
                     "1 for the diagnosed kind of the latest evaluated window (none, input_contract, "
                     "preprocessing_mismatch, covariate_shift, prior_shift, output_shift), 0 for the others.",
                     ("model", "kind"))
DRIFT_DIAGNOSIS_TRANSFORM = _m("drift_diagnosis_transform", "gauge",
                               "1 for the transform the latest window's diagnosis names, 0 for the others.",
                               ("model", "transform"))
ACCURACY_VERDICTS = _m("accuracy_verdicts", "counter",
                       "Per-sample ATC verdicts: likely_correct, likely_wrong, unknown (outside the golden "
                       "support or violating the input contract). Lower bound = likely_correct / all.",
                       ("model", "verdict"))
ACCURACY_ESTIMATE_RELIABLE = _m("accuracy_estimate_reliable", "gauge",
                                "0 when the latest window's accuracy estimate is not to be trusted: more than "
                                "10% of its samples have unknown verdicts, fewer than 10 were judged, or the "
                                "drift is diagnosed a preprocessing_mismatch or input_contract violation "
                                "(inputs the model was not validated on); else 1.", ("model",))
ACCURACY_ESTIMATE_SAMPLES = _m("accuracy_estimate_samples", "gauge",
                                "Samples (ATC verdicts) in the window behind the latest accuracy estimate; the SLO "
                                "rules ignore an estimate resting on fewer than the SLO's min_samples.", ("model",))

# --- GPU --------------------------------------------------------------------------------
GPU_AVAILABLE = _m("gpu_available", "gauge", "1 when NVML is usable, else 0.")
GPU_MEMORY_USED = _m("gpu_memory_used_bytes", "gauge", "Device memory in use.", ("gpu", "uuid"), "bytes")
GPU_MEMORY_TOTAL = _m("gpu_memory_total_bytes", "gauge", "Device memory in total.", ("gpu", "uuid"), "bytes")
GPU_MEMORY_RESERVED = _m("gpu_memory_reserved_bytes", "gauge", "Device memory reserved by the driver.",
                         ("gpu", "uuid"), "bytes")
GPU_UTILIZATION = _m("gpu_utilization_ratio", "gauge", "GPU busy ratio over the last sample period.",
                     ("gpu", "uuid"), "ratio")
GPU_PROCESS_MEMORY = _m("gpu_process_memory_bytes", "gauge", "Device memory used by a model-server process.",
                        ("gpu", "pid"), "bytes")
GPU_MEMORY_HEADROOM = _m("gpu_memory_headroom_bytes", "gauge",
                         "Free device memory minus the predicted extra need at the configured max batch.",
                         ("model", "gpu"), "bytes")
GPU_ERRORS = _m("gpu_errors", "counter", "NVML errors by kind.", ("kind",))

# --- self ---------------------------------------------------------------------------------
COLLECTOR_SUCCESS = _m("collector_success", "gauge", "1 when the collector's last scrape succeeded.",
                       ("collector",))
COLLECTOR_DURATION = _m("collector_duration_seconds", "gauge", "Duration of the collector's last scrape.",
                        ("collector",), "seconds")
BUILD_INFO = _m("build", "info", "sentinel build information.", ("version",))
MODEL_INFO = _m("model", "info", "A model this sidecar watches and the version it serves (value 1).",
                ("model", "version"))
MODEL_SIZE = _m("model_size_bytes", "gauge",
                "Size of the weights file of the registry entry the sidecar watches (executive dashboard).",
                ("model",), "bytes")

METRICS: tuple[MetricSpec, ...] = tuple(v for v in globals().values() if isinstance(v, MetricSpec))

# Latency histogram bounds (seconds). SLO thresholds are merged in at start-up
# (see `latency_buckets`), so every latency SLO has an exact bucket.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3,
    0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)

DEFAULT_CONFIDENCE_BUCKETS: tuple[float, ...] = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999,
)


def latency_buckets(thresholds: tuple[float, ...] | list[float] = ()) -> tuple[float, ...]:
    """Default latency bucket bounds with every SLO threshold added."""
    return tuple(sorted(set(DEFAULT_LATENCY_BUCKETS) | {float(t) for t in thresholds}))


def confidence_buckets(atc_thresholds: tuple[float, ...] | list[float] = ()) -> tuple[float, ...]:
    """Confidence bucket bounds with the fitted ATC threshold(s) added."""
    return tuple(sorted(set(DEFAULT_CONFIDENCE_BUCKETS) | {round(float(t), 6) for t in atc_thresholds}))
