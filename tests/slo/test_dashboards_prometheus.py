"""Every panel query of the three dashboards, run on a real Prometheus against series whose truth is known.

    replica a (version v3): digits            ─┐  scraped every 1s   prometheus (rules generated from
    replica b (version v4): digits, digits2   ─┘ ───────────────────► a 4h period, 1s scrape interval)

The two "replicas" are tiny exporters serving sentinel's metric names (sentinel/metricnames.py)
with counters that grow at fixed rates, so every ratio, rate and quantile a panel shows has an
exact expected value. Two replicas and two models, one replica serving both, is where a panel
that aggregates away `model` (or counts a replica once per model) tells on-call something false.
The Grafana template variables are replaced as Grafana would: `$model`, `$version`, `$instance`
by the "All" value `.*` (or one model), `$__rate_interval` and `$__range` by durations.
The real sidecar's own series are exercised by test_prometheus_e2e.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import free_port, serve_in_thread, stop_process, stop_server, wait_for

from sentinel import metricnames as mn
from sentinel.slo.dashboards import cost_query, dashboard_specs, generate_dashboards
from sentinel.slo.rules import generate_rule_files
from sentinel.slo.spec import SloFile, load_slo_file

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")]

# requests per second by (replica, model, code); 499 (client left) and 503 on replica a, none on b's
# digits, half of digits2 failing
RATES = {("a", "digits", "200"): 8.0, ("a", "digits", "503"): 2.0, ("a", "digits", "499"): 1.0,
         ("b", "digits", "200"): 10.0, ("b", "digits", "503"): 0.0,
         ("b", "digits2", "200"): 5.0, ("b", "digits2", "503"): 5.0}
MODELS = {"a": ("digits",), "b": ("digits", "digits2")}
VERSIONS = {"a": "v3", "b": "v4"}   # the `version` target label, as deploy/ sets it
# every request of a model falls in one latency bucket: digits (0.025, 0.05], digits2 (0.75, 1.0]
LATENCY_BUCKET = {"digits": 0.05, "digits2": 1.0}
# sampled pairs per second by (replica, model, outcome)
SAMPLES = {("a", "digits", "queued"): 3.0, ("a", "digits", "dropped"): 1.0, ("b", "digits", "queued"): 1.0,
           ("b", "digits", "dropped"): 0.0, ("b", "digits2", "queued"): 1.0, ("b", "digits2", "dropped"): 1.0}
REPLAYS = {("a", "digits", "ok"): 1.0, ("b", "digits", "ok"): 1.0, ("b", "digits", "error"): 1.0,
           ("b", "digits2", "ok"): 2.0}
DRIFT_ALARM = {("b", "digits"): 1, ("b", "digits2"): 0, ("a", "digits"): 0}


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in kv.items()) + "}"


def exposition(replica: str, elapsed: float) -> str:
    """The /metrics text of one replica `elapsed` seconds after start (counters = rate x elapsed)."""
    lines = []
    buckets = (*mn.DEFAULT_LATENCY_BUCKETS, "+Inf")
    for (rep, model, code), rate in RATES.items():
        if rep != replica:
            continue
        n = rate * elapsed
        lines.append(f"{mn.REQUESTS.sample_name}{_labels(model=model, protocol='v2', code=code)} {n}")
        for le in buckets:
            inside = le == "+Inf" or float(le) >= LATENCY_BUCKET[model]
            lines.append(f"{mn.REQUEST_DURATION.sample_name}"
                         f"{_labels(model=model, protocol='v2', code=code, le=str(le))} {n if inside else 0}")
        lines.append(f"{mn.REQUEST_DURATION.name}_count{_labels(model=model, protocol='v2', code=code)} {n}")
    for (rep, model, outcome), rate in SAMPLES.items():
        if rep == replica:
            lines.append(f"{mn.SAMPLES.sample_name}{_labels(model=model, outcome=outcome)} {rate * elapsed}")
    for (rep, model, result), rate in REPLAYS.items():
        if rep == replica:
            lines.append(f"{mn.REPLAY_REQUESTS.sample_name}{_labels(model=model, result=result)} {rate * elapsed}")
    for model in MODELS[replica]:
        lines += [
            f"{mn.MODEL_INFO.sample_name}{_labels(model=model, version=VERSIONS[replica])} 1",
            f"{mn.MODEL_SIZE.name}{_labels(model=model)} 439632",
            f"{mn.DRIFT_ALARM.name}{_labels(model=model, detector='combined')} {DRIFT_ALARM[(replica, model)]}",
            f"{mn.DRIFT_P_VALUE.name}{_labels(model=model, detector='combined')} 0.5",
            f"{mn.DRIFT_STATISTIC.name}{_labels(model=model, detector='combined')} 0.1",
            f"{mn.ESTIMATED_ACCURACY.name}{_labels(model=model, method='atc')} 0.9",
            f"{mn.ESTIMATED_ACCURACY.name}{_labels(model=model, method='atc_lower')} 0.8",
            f"{mn.ACCURACY_ESTIMATE_RELIABLE.name}{_labels(model=model)} 1",
            f"{mn.ACCURACY_ESTIMATE_SAMPLES.name}{_labels(model=model)} 40",
            f"{mn.INPUT_FEATURE_MEAN.name}{_labels(model=model, feature='mean_c0', source='live')} 0.1",
            f"{mn.INPUT_FEATURE_MEAN.name}{_labels(model=model, feature='mean_c0', source='golden')} 0.1",
            f"{mn.PREDICTIONS.sample_name}{_labels(model=model, **{'class': '3'})} {elapsed}",
            f"{mn.REFERENCE_AGREEMENT.sample_name}{_labels(model=model, source='shadow', result='agree')} {elapsed}",
            f"{mn.ACCURACY_VERDICTS.sample_name}{_labels(model=model, verdict='likely_correct')} {elapsed}",
            f"{mn.INPUT_CONTRACT_VIOLATIONS.sample_name}{_labels(model=model, check='shape')} 0",
            f"{mn.DRIFT_DIAGNOSIS.name}{_labels(model=model, kind='none')} 1",
        ]
    lines += [f"{mn.INFLIGHT.name} 0", f"{mn.SAMPLE_QUEUE_DEPTH.name} 0", f"{mn.SAMPLE_QUEUE_CAPACITY.name} 256",
              f"{mn.GPU_AVAILABLE.name} 0", f"{mn.COLLECTOR_SUCCESS.name}{_labels(collector='gpu')} 1",
              f"{mn.COLLECTOR_DURATION.name}{_labels(collector='gpu')} 0.001"]
    return "\n".join(lines) + "\n"


def _exporter(replica: str, t0: float) -> Any:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = exposition(replica, time.time() - t0).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return serve_in_thread(Handler)


def _spec(tmp: Path) -> SloFile:
    slo = tmp / "slo.yaml"
    slo.write_text((REPO / "slo.yaml").read_text()
                   .replace("period: 30d", "period: 4h").replace("scrape_interval: 30s", "scrape_interval: 1s")
                   .replace("slos:\n", "slos:\n  - {name: availability2, model: digits2, objective: 0.99, "
                                       "sli: availability}\n"))
    return load_slo_file(slo)


@pytest.fixture(scope="module")
def prom(tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dashprom")
    spec = _spec(tmp)
    (tmp / "rules").mkdir()
    for f in generate_rule_files(spec):
        (tmp / "rules" / f.filename).write_text(f.render())
    t0 = time.time() - 1.0
    servers = {r: _exporter(r, t0) for r in MODELS}
    targets = {r: f"127.0.0.1:{s.server_address[1]}" for r, s in servers.items()}
    port = free_port()
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: ['rules/*.yml']\n"
        "scrape_configs:\n  - job_name: sentinel\n    static_configs:\n"
        + "".join(f"      - targets: ['{targets[r]}']\n        labels: {{version: {VERSIONS[r]}}}\n" for r in MODELS))
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=(tmp / "prometheus.log").open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0)
    try:
        wait_for("prometheus ready", lambda: client.get("/-/ready").status_code == 200, 30, every=0.2)
        # five scrapes of both replicas behind every rate, the burn alert of digits firing
        wait_for("five scrapes", lambda: len(_query(client, f"{mn.INFLIGHT.name}[10s]")) == 2
                 and all(len(s["values"]) >= 5 for s in _query(client, f"{mn.INFLIGHT.name}[10s]")), 30, every=0.2)
        wait_for("digits pages", lambda: _query(
            client, 'ALERTS{alertname="SentinelErrorBudgetBurn",alertstate="firing",model="digits"}'), 20, every=0.2)
        yield {"client": client, "spec": spec, "targets": targets}
    finally:
        stop_process(proc)
        for s in servers.values():
            stop_server(s)


def _query(client: httpx.Client, expr: str) -> list[dict]:
    r = client.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body.get('error')}"
    return body["data"]["result"]


def _grafana(expr: str, model: str = ".*") -> str:
    """Substitute the template variables as Grafana does (multi-value "All" is the custom all value `.*`)."""
    for var, value in {"$model": model, "$version": ".*", "$instance": ".*", "$__rate_interval": "5s",
                       "$__range": "5s", "${datasource}": ""}.items():
        expr = expr.replace(var, value)
    return expr


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def _panels(spec: SloFile) -> Iterator[tuple[str, dict]]:
    for name, text in generate_dashboards(spec).items():
        for panel in json.loads(text)["panels"]:
            yield name, panel


def test_every_panel_query_parses_names_each_series_and_is_never_silently_empty(prom):
    """All models and replicas picked: every series a panel draws has its own legend naming it (no two
    models or replicas behind one line), every label a legend names is on the series, and a panel whose
    queries return nothing says what that means instead of Grafana's bare "No data"."""
    client, problems = prom["client"], []
    for board, panel in _panels(prom["spec"]):
        where = f"{board}: {panel['title']}"
        seen: dict[str, dict] = {}
        returned = 0
        for target in panel["targets"]:
            result = _query(client, _grafana(target["expr"]))
            returned += len(result)
            fmt = target.get("legendFormat", "")
            if panel["type"] == "table" or not fmt:
                continue
            for series in result:
                labels = series["metric"]
                missing = [n for n in re.findall(r"\{\{\s*(\w+)\s*\}\}", fmt) if n not in labels]
                if missing:
                    problems.append(f"{where}: legend {fmt!r} names {missing}, absent from {labels}")
                legend = _legend(fmt, labels)
                if legend in seen:
                    problems.append(f"{where}: two series share legend {legend!r}: {seen[legend]} and {labels}")
                seen[legend] = labels
                # the series a legend stands for must not hide a model the selection spans
                if "model" not in labels and "model" in target["expr"] and board != "sentinel-overview.json":
                    problems.append(f"{where}: {fmt!r} aggregates the selected models into one line")
        if not returned and not panel["fieldConfig"]["defaults"].get("noValue"):
            problems.append(f"{where}: empty here and no noValue says why")
    assert not problems, "\n".join(problems)


def _values(client: httpx.Client, expr: str, model: str = ".*") -> dict[tuple[str, ...], float]:
    out = {}
    for s in _query(client, _grafana(expr, model)):
        m = s["metric"]
        out[tuple(m.get(k, "") for k in ("model", "code", "version", "slo"))] = float(s["value"][1])
    return out


def _target(spec: SloFile, title: str, i: int = 0) -> str:
    for board in dashboard_specs(spec):
        for panel in board.panels:
            if panel.title == title:
                return panel.queries[i].expr
    raise AssertionError(title)


def test_panel_values_equal_the_truth_the_replicas_serve(prom):
    client, spec = prom["client"], prom["spec"]
    approx = pytest.approx

    # the template variables list both models, both replicas, both versions
    def label_values(match: str, label: str) -> set[str]:
        r = client.get("/api/v1/series", params={"match[]": _grafana(match)}).json()["data"]
        return {s[label] for s in r}
    assert label_values(mn.REQUESTS.sample_name, "model") == {"digits", "digits2"}
    assert label_values(f'{mn.MODEL_INFO.sample_name}{{model=~"$model"}}', "version") == {"v3", "v4"}
    assert label_values(f'{mn.MODEL_INFO.sample_name}{{model=~"$model",version=~"$version"}}', "instance") \
        == set(prom["targets"].values())

    # error ratio by code, per model: digits 2 of 21 req/s are 503 and 1 of 21 left (499); digits2 5 of 10
    errors = _values(client, _target(spec, "Error ratio by code"))
    assert errors[("digits", "503", "", "")] == approx(2 / 21, rel=0.02)
    assert errors[("digits", "499", "", "")] == approx(1 / 21, rel=0.02)
    assert errors[("digits2", "503", "", "")] == approx(0.5, rel=0.02)
    # the same panel with one model picked shows that model's ratio alone
    assert _values(client, _target(spec, "Error ratio by code"), "digits2")[("digits2", "503", "", "")] \
        == approx(0.5, rel=0.02)

    # per-version error ratio: v3 (replica a) 2/11, v4 digits 0/10, v4 digits2 5/10
    versions = _values(client, _target(spec, "Versions: error ratio"))
    assert versions == {("digits", "", "v3", ""): approx(2 / 11, rel=0.02), ("digits", "", "v4", ""): 0.0,
                        ("digits2", "", "v4", ""): approx(0.5, rel=0.02)}

    # latency quantiles per model, interpolated in the one bucket each model's requests fall in
    p50 = _values(client, _target(spec, "Latency P50 / P95 / P99", 0))
    assert p50 == {("digits", "", "", ""): approx(0.0375), ("digits2", "", "", ""): approx(0.875)}

    # cost per 1,000: two replicas (b serves two models but is one replica), no GPU, 31 req/s
    (cost,) = _query(client, _grafana(cost_query(spec)))
    expected = 2 * spec.cost.replica_hour / (31 * 3600 / 1000)
    assert float(cost["value"][1]) == approx(expected, rel=0.03)

    # request rate and sample drop ratio per model
    assert _values(client, _target(spec, "Request rate")) == {("digits", "", "", ""): approx(21, rel=0.02),
                                                              ("digits2", "", "", ""): approx(10, rel=0.02)}
    assert _values(client, _target(spec, "Sample drop ratio")) == {("digits", "", "", ""): approx(0.2, rel=0.02),
                                                                   ("digits2", "", "", ""): approx(0.5, rel=0.02)}
    # canary replays: digits 2 ok + 1 error per second, digits2 2 ok, never summed across models
    replays = {(s["metric"]["model"], s["metric"]["result"]): float(s["value"][1])
               for s in _query(client, _grafana(_target(spec, "Canary replay results")))}
    assert replays == {("digits", "ok"): approx(2, rel=0.02), ("digits", "error"): approx(1, rel=0.02),
                       ("digits2", "ok"): approx(2, rel=0.02)}

    # burn rate over the long page window: digits 2/21 over a 0.1% budget, digits2 0.5 over 1% (the window
    # is longer than the seconds of data here, and the replicas' series are extrapolated apart: 15%)
    burn = _values(client, _target(spec, "Burn rate (page windows)", 1))
    assert burn[("digits", "", "", "availability")] == approx((2 / 21) / 0.001, rel=0.15)
    assert burn[("digits2", "", "", "availability2")] == approx(0.5 / 0.01, rel=0.15)

    # the drift alarm of digits on replica b, not of "replica b"
    alarms = {(s["metric"]["model"], s["metric"]["instance"]): float(s["value"][1])
              for s in _query(client, _grafana(_target(spec, "Drift alarms")))}
    assert alarms[("digits", prom["targets"]["b"])] == 1 and alarms[("digits2", prom["targets"]["b"])] == 0

    # on-call's alert table with digits2 picked lists no alert of digits (SLO burn of digits pages now)
    firing = _query(client, _grafana(_target(spec, "Alerts firing"), "digits2"))
    assert not [a["metric"] for a in firing if a["metric"].get("model") == "digits"]
    assert [a for a in _query(client, _grafana(_target(spec, "Alerts firing"), "digits"))
            if a["metric"].get("model") == "digits"]
