"""The controller templates count the events of series born within the window, as the gate does.

A sidecar creates a labelled series at its first event (the first 507, the first `disagree`,
every series of a canary pod that started a few minutes ago), and `increase()` counts from a
series' first sample: what that sample already holds was lost. The templates' window is a
placeholder (`{{args.window}}`, `{{ interval }}`), so they cannot compare `_created` with
`time() - <seconds>` as the gate does; they read the window's start from a subquery over the
window instead. Checked with `promtool test rules` (Argo, literal series with stale markers,
resets and restarts) and with a real Prometheus on a backfilled TSDB (Flagger's pod selectors
and `{{ interval }}`, Argo's version selectors, every query executed).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from rulefiles import argo_queries, promql_expr_test
from servers import free_port, stop_process, wait_for

from sentinel import metricnames as mn
from sentinel.gate import criteria, queries
from sentinel.gate.criteria import Verdict, VersionData
from sentinel.gate.judge import TESTED_CRITERIA, budget_for
from sentinel.gate.templates import flagger_canary, flagger_metric_templates
from sentinel.slo.spec import load_slo_file

REPO = Path(__file__).resolve().parents[2]
SPEC = load_slo_file(REPO / "slo.yaml")
S = SPEC.gate
BUDGET = budget_for(SPEC, "digits")

REQ = mn.REQUESTS.sample_name
REQ_CREATED = REQ.removesuffix("_total") + "_created"
AGREE = mn.REFERENCE_AGREEMENT.sample_name
AGREE_CREATED = AGREE.removesuffix("_total") + "_created"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def _argo(baseline: str, canary: str, window: str = "10m") -> dict[str, str]:
    return argo_queries(SPEC, baseline, canary, window)


def _flagger(target: str, interval: str) -> dict[str, str]:
    return {d["metadata"]["name"].removeprefix("sentinel-"):
            d["spec"]["query"].replace("{{ target }}", target).replace("{{ interval }}", interval)
            for d in flagger_metric_templates(SPEC, "http://prometheus:9090")}


def _series(version: str, pod: str, code: str) -> str:
    return f'model="digits",version="{version}",pod="{pod}",code="{code}"'


# Scraped every 15 s for 20 minutes; the templates judge the last 10 (window start: minute 10).
# Baseline v3, every series zero-initialised at its sidecar's start and alive all along:
#   s1: 10 requests a scrape (400 in the window), its 503 series at 0;
#   s2: the same, but its scrape failed right at the window's start (a stale marker there): a
#       sample missing at the start does not make a series new (400, not its whole 800);
#   s3: its container restarted at minute 15 (counter reset, `_created` moves): 200 before the
#       restart and 195 after, 395.
# Canary v4:
#   c1: alive all along, 400 answered 200; at minute 15, 20 requests answered 507 between two
#       scrapes: a series born holding 20 that never moves;
#   c2: a pod that started at minute 14: every series born, its first sample already holding
#       30 answered 200 and 5 answered 503 (then 10 answered 200 a scrape, 270 in all).
#   Shadow comparisons: 9 agreements a scrape all along (360); the first 10 disagreements came
#   between the scrapes before minute 18: a `disagree` series born holding 10.
# Truth: baseline 1195 requests, no errors; canary 695, 25 errors: error ratio +0.0360 (the
# budget is 0.001); agreement 1 against 360/370, a drop of 0.027 (allowed 0.02).
SERIES = [
    (f"{REQ}{{{_series('v3', 's1', '200')}}}", "0+10x80"),
    (f"{REQ_CREATED}{{{_series('v3', 's1', '200')}}}", "0x80"),
    (f"{REQ}{{{_series('v3', 's1', '503')}}}", "0x80"),
    (f"{REQ_CREATED}{{{_series('v3', 's1', '503')}}}", "0x80"),
    (f"{REQ}{{{_series('v3', 's2', '200')}}}", "0+10x39 stale 410+10x39"),
    (f"{REQ_CREATED}{{{_series('v3', 's2', '200')}}}", "0x39 stale 0x39"),
    (f"{REQ}{{{_series('v3', 's3', '200')}}}", "0+10x60 5+10x19"),
    (f"{REQ_CREATED}{{{_series('v3', 's3', '200')}}}", "0x60 899x19"),
    (f"{REQ}{{{_series('v4', 'c1', '200')}}}", "0+10x80"),
    (f"{REQ_CREATED}{{{_series('v4', 'c1', '200')}}}", "0x80"),
    (f"{REQ}{{{_series('v4', 'c1', '507')}}}", "_x60 20x20"),
    (f"{REQ_CREATED}{{{_series('v4', 'c1', '507')}}}", "_x60 899x20"),
    (f"{REQ}{{{_series('v4', 'c2', '200')}}}", "_x56 30+10x24"),
    (f"{REQ_CREATED}{{{_series('v4', 'c2', '200')}}}", "_x56 835x24"),
    (f"{REQ}{{{_series('v4', 'c2', '503')}}}", "_x56 5x24"),
    (f"{REQ_CREATED}{{{_series('v4', 'c2', '503')}}}", "_x56 835x24"),
    *[(f'{metric}{{model="digits",version="{v}",source="shadow",result="agree"}}', values)
      for v in ("v3", "v4") for metric, values in ((AGREE, "0+9x80"), (AGREE_CREATED, "0x80"))],
    (f'{AGREE}{{model="digits",version="v4",source="shadow",result="disagree"}}', "_x71 10x9"),
    (f'{AGREE_CREATED}{{model="digits",version="v4",source="shadow",result="disagree"}}', "_x71 1064x9"),
]
BASE_CODES = {"200": 1195.0, "503": 0.0}
CANARY_CODES = {"200": 670.0, "503": 5.0, "507": 20.0}
ERROR_RATIO_INCREASE = 25 / 695
AGREEMENT_DROP = 1 - 360 / 370


def _close(expr: str, value: float) -> dict:
    return {"expr": f"abs(({expr}) - {value!r}) < bool 1e-9", "eval_time": "20m",
            "exp_samples": [{"labels": "{}", "value": 1.0}]}


@needs_promtool
def test_argo_templates_count_series_born_in_the_window_as_the_gate(tmp_path):
    # the gate, on its own counts of these series, fails the canary on errors and agreement
    alpha = S.alpha / TESTED_CRITERIA
    base, canary = VersionData(codes=BASE_CODES), VersionData(codes=CANARY_CODES)
    assert criteria.error_ratio(base, canary, S, alpha, BUDGET, queries.BAD_CODE_REGEX).verdict == Verdict.FAIL
    assert ERROR_RATIO_INCREASE > BUDGET and AGREEMENT_DROP > S.max_agreement_drop
    gate_counts = [
        {"expr": queries.requests_by_code("digits", v, "10m"), "eval_time": "20m",
         "exp_samples": [{"labels": f'{{code="{c}"}}', "value": n} for c, n in codes.items()]}
        for v, codes in (("v3", BASE_CODES), ("v4", CANARY_CODES))]
    q = _argo("v3", "v4")
    promql_expr_test(tmp_path, SERIES, [
        *gate_counts,
        # increase() alone read 0 errors in 645 requests (+0.0000: a pass) and no disagreement (0.000)
        _close(q["error-ratio-increase"], ERROR_RATIO_INCREASE),
        _close(q["agreement-drop"], AGREEMENT_DROP),
        _close(q["client-error-increase"], 0.0),
        # and the failureConditions hold: the rollout aborts
        {"expr": f"({q['error-ratio-increase']}) > bool {BUDGET!r}", "eval_time": "20m",
         "exp_samples": [{"labels": "{}", "value": 1.0}]},
        {"expr": f"({q['agreement-drop']}) > bool {S.max_agreement_drop!r}", "eval_time": "20m",
         "exp_samples": [{"labels": "{}", "value": 1.0}]},
    ], interval="15s")


@needs_promtool
def test_templates_do_not_count_a_long_lived_series_whole_nor_twice(tmp_path):
    """Counts of series that began before the window: a stale marker at the window's start (which
    `x unless x offset w` would take for a new series, counting its whole 800), a reset of a
    series `_created` says began in the window, a reset without `_created` series, a pod
    replaced by one under a new name. As before the change, and none counted whole or twice."""
    series = [
        *SERIES[:8],
        # no `_created` series at all (an exporter without them): increase() as before, resets included
        (f"{REQ}{{{_series('v5', 'n1', '200')}}}", "0+10x60 5+10x19"),
        # a pod replaced at minute 12 by one under a new name (the old one's series go stale)
        (f"{REQ}{{{_series('v5', 'old', '200')}}}", "0+10x48 stale"),
        (f"{REQ_CREATED}{{{_series('v5', 'old', '200')}}}", "0x48 stale"),
        (f"{REQ}{{{_series('v5', 'new', '200')}}}", "_x49 3+10x31"),
        (f"{REQ_CREATED}{{{_series('v5', 'new', '200')}}}", "_x49 730x31"),
    ]
    guard = "and on () (sum ("   # the guard's count of a version's requests, as the query has it
    v3 = _argo("v3", "v4")["error-ratio-increase"]
    v5 = _argo("v5", "v4")["error-ratio-increase"]
    base_count = v3[v3.index(guard) + len("and on () ("):v3.index(">= 200")]
    v5_count = v5[v5.index(guard) + len("and on () ("):v5.index(">= 200")]
    promql_expr_test(tmp_path, series, [
        # s1 400 + s2 400 (not its whole 800) + s3 395 (not 195, not 590)
        {"expr": base_count, "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 1195.0}]},
        # n1 395; old: 480 by minute 12, 80 of them in the window (85: increase() extrapolates past its
        # last sample, as it always did), not its whole 480; new: from 0 to 313 since minute 12
        {"expr": v5_count, "eval_time": "20m", "exp_samples": [{"labels": "{}", "value": 395.0 + 85.0 + 313.0}]},
    ], interval="15s")


@needs_promtool
def test_the_window_start_is_read_from_the_window_placeholder(tmp_path):
    # what Flagger puts for `{{ interval }}` (the Canary's metric interval) and Argo for {{args.window}}
    promql_expr_test(tmp_path, SERIES[:1], [
        {"expr": f"vector({_start(w)})", "eval_time": at,
         "exp_samples": [{"labels": "{}", "value": float(start)}]}
        # a query at a fraction of a second: the start rounds up to the next whole second
        for w, at, start in (("10m", "20m", 600), ("1m30s", "20m", 1110), ("90s", "20m", 1110), ("1h", "20m", -2400),
                             ("10m", "1200500ms", 601))],
        interval="15s")


def _start(window: str) -> str:
    """The window start the Flagger query uses for `{{ interval }}` = window."""
    query = _flagger("digits", window)["error-ratio-increase"]
    marker = "scalar(min_over_time(timestamp(vector(0))["
    at = query.index(marker)
    return query[at:query.index("]))", at) + 3]


# --- a real Prometheus on a backfilled TSDB: Flagger's pods, Argo's versions ------------

PRIMARY_POD, CANARY_POD = "digits-primary-5d8f7c9b4-x2x7q", "digits-7c9b4f5d8-k8s9z"


def _openmetrics(end: int) -> str:
    """20 minutes of 15 s scrapes up to `end`: the primary (v3) alive all along; the canary (v4) a
    pod started 4 minutes into the last 10, its first sample holding 30 answered 200, 5 answered
    503 and 12 answered 507, then 10 answered 200 a scrape."""
    start, born = end - 1200, end - 600 + 240
    rows: dict[str, list[tuple[int, float]]] = {}
    primary = f'model="digits",version="v3",pod="{PRIMARY_POD}"'
    canary = f'model="digits",version="v4",pod="{CANARY_POD}"'
    for t in range(start, end + 1, 15):
        rows.setdefault(f'{REQ}{{{primary},code="200"}}', []).append((t, 10.0 * (t - start) / 15))
        rows.setdefault(f'{REQ}{{{primary},code="503"}}', []).append((t, 0.0))
        for code in ("200", "503"):
            rows.setdefault(f'{REQ_CREATED}{{{primary},code="{code}"}}', []).append((t, float(start - 3600)))
        if t >= born:
            rows.setdefault(f'{REQ}{{{canary},code="200"}}', []).append((t, 30.0 + 10.0 * (t - born) / 15))
            for code, n in (("503", 5.0), ("507", 12.0)):
                rows.setdefault(f'{REQ}{{{canary},code="{code}"}}', []).append((t, n))
            for code in ("200", "503", "507"):
                rows.setdefault(f'{REQ_CREATED}{{{canary},code="{code}"}}', []).append((t, float(born - 10)))
    lines = []
    for name in (REQ, REQ_CREATED):   # a metric family's samples together
        for series, samples in rows.items():
            if series.startswith(name + "{"):
                lines += [f"{series} {v!r} {t}" for t, v in samples]
    return "\n".join(lines) + "\n# EOF\n"


@pytest.fixture()
def backfilled_prometheus(tmp_path):
    end = (int(time.time()) // 60) * 60 - 300
    (tmp_path / "series.om").write_text(_openmetrics(end))
    proc = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "series.om", "data"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "prometheus.yml").write_text("global: {scrape_interval: 15s}\nscrape_configs: []\n")
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)
    try:
        wait_for("prometheus ready", lambda: client.get("/-/ready").status_code == 200, 60, every=0.2)
        yield client, end
    finally:
        client.close()
        stop_process(prom)
        log.close()


def _value(client: httpx.Client, expr: str, at: int) -> list[float]:
    r = client.post("/api/v1/query", data={"query": expr, "time": str(at)})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n{body.get('error')}"
    return [float(s["value"][1]) for s in body["data"]["result"]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("promtool") is None or shutil.which("prometheus") is None,
                    reason="promtool and prometheus not installed")
def test_a_new_canary_pods_early_errors_fail_flagger_and_argo_on_a_real_prometheus(backfilled_prometheus):
    client, end = backfilled_prometheus
    # canary 287 requests (its first sample held 47 of them), 17 errors; primary 400, none.
    # increase() alone read 245 canary requests and no error: +0.0000, a pass.
    truth = 17 / 287
    assert truth > BUDGET
    interval = next(m["interval"] for m in flagger_canary(SPEC)["spec"]["analysis"]["metrics"]
                    if m["name"] == "error-ratio-increase")
    assert interval == "10m"
    flagger, argo = _flagger("digits", interval), _argo("v3", "v4", interval)
    for name, queries_ in (("flagger", flagger), ("argo", argo)):
        got = _value(client, queries_["error-ratio-increase"], end)
        assert len(got) == 1 and math.isclose(got[0], truth, rel_tol=1e-9), (name, got, truth)
        assert _value(client, queries_["client-error-increase"], end) == [0.0], name
        for expr in queries_.values():   # every query runs (most have no series here: no result)
            _value(client, expr, end)
