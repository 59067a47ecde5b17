"""The gate's Prometheus client on answers a real Prometheus never gives but a proxy in front might."""

from __future__ import annotations

import json
import math
import time
from http.server import BaseHTTPRequestHandler

import pytest

from sentinel.errors import InfrastructureError
from sentinel.gate.criteria import VersionData
from sentinel.gate.prom import Prometheus
from tests.servers import send_json, serve_in_thread, stop_server

QUERY = 'sum by (code) (increase(sentinel_requests_total{model="digits",version="v3"}[10m]))'

ANSWERS = {
    "/list": (200, "application/json", "[]"),
    "/string": (200, "application/json", '"ok"'),
    "/html": (502, "text/html", "<html><body>Bad Gateway</body></html>"),
    "/login": (200, "text/html", "<html>sign in</html>"),
    "/no-data": (200, "application/json", '{"status": "success", "data": null}'),
    "/data-list": (200, "application/json", '{"status": "success", "data": []}'),
    "/sample-not-object": (200, "application/json",
                           '{"status": "success", "data": {"resultType": "vector", "result": ["x"]}}'),
    "/no-value": (200, "application/json",
                  '{"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}}]}}'),
    "/value-null": (200, "application/json",
                    '{"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": null}]}}'),
    "/scalar-short": (200, "application/json", '{"status": "success", "data": {"resultType": "scalar", "result": 3}}'),
    "/partial": (200, "application/json",
                 '{"status": "success", "warnings": ["No StoreAPIs matched for this query", "No StoreAPIs matched '
                 'for this query"], "data": {"resultType": "vector", "result": []}}'),
    "/metric-list": (200, "application/json",
                     '{"status": "success", "data": {"resultType": "vector", "result": [{"metric": [1], "value": [0, "1"]}]}}'),
}


CLOCK: list[dict[str, list[str]]] = []   # the form of every query to /clock


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        form = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        prefix = self.path.removesuffix("/api/v1/query")
        if prefix == "/clock":   # Prometheus' clock reads 1000.5 (the gate host's is decades ahead)
            from urllib.parse import parse_qs

            params = parse_qs(form.decode())
            CLOCK.append(params)
            result: object = []
            kind = "vector"
            if params["query"] == ["time()"] and "time" not in params:
                kind, result = "scalar", [1000.5, "1000.5"]
            send_json(self, 200, {"status": "success", "data": {"resultType": kind, "result": result}})
            return
        if prefix == "/slow":
            time.sleep(3)
            return
        if prefix == "/drip":   # a valid answer, one byte every 100 ms (~7 s in all) (each read well within any timeout)
            data = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            return
        if prefix == "/ok":
            status, ctype, body = 200, "application/json", json.dumps({"status": "success", "data": {
                "resultType": "vector", "result": [{"metric": {"code": "200"}, "value": [0, "5"]},
                                                   {"metric": {"code": "500"}, "value": [0, "NaN"]}]}})
        else:
            status, ctype, body = ANSWERS[prefix]
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url():
    server = serve_in_thread(_Handler)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    stop_server(server)


@pytest.mark.parametrize("path", sorted(set(ANSWERS) - {"/partial"}))
def test_malformed_answers_are_one_infrastructure_error_naming_url_and_query(base_url, path):
    with Prometheus(base_url + path) as prom, pytest.raises(InfrastructureError) as err:
        prom.vector(QUERY, "code")
    message = str(err.value)
    assert base_url + path in message and "\n" not in message
    assert "sentinel_requests_total" in message   # which query it was


def test_slow_prometheus_is_one_line_naming_the_query_and_the_timeout(base_url):
    with Prometheus(base_url + "/slow", timeout=0.3) as prom, pytest.raises(InfrastructureError) as err:
        prom.vector(QUERY, "code")
    message = str(err.value)
    assert "did not answer the query" in message and "sentinel_requests_total" in message
    assert "within 0.3 s" in message and base_url + "/slow" in message


def test_an_answer_trickled_a_byte_at_a_time_is_cut_at_the_query_timeout(base_url):
    # every read returns within httpx's (per-read) timeout, so before the body was read in
    # timed chunks the whole ~7 s answer was waited for, however small the timeout
    started = time.monotonic()
    with Prometheus(base_url + "/drip", timeout=0.4) as prom, pytest.raises(InfrastructureError) as err:
        prom.vector(QUERY, "code")
    assert time.monotonic() - started < 4.0   # loose for a loaded machine; the answer takes ~7 s
    assert "did not answer the query" in str(err.value) and "within 0.4 s" in str(err.value)


def test_the_run_budget_bounds_all_queries_together_and_names_the_one_unanswered(base_url):
    from sentinel.gate.prom import BudgetSpent

    started = time.monotonic()
    with Prometheus(base_url + "/drip", timeout=30, budget=0.5) as prom:
        with pytest.raises(BudgetSpent) as err:
            prom.vector(QUERY, "code")
        assert time.monotonic() - started < 4.0   # the budget, not the 30 s per query
        assert "time budget of 0.5 s ran out after 0 answered queries" in str(err.value)
        assert "sentinel_requests_total" in str(err.value)
        with pytest.raises(BudgetSpent):          # nothing is sent once the budget is spent
            prom.vector("up", "job")
    with Prometheus(base_url + "/ok", budget=30) as prom:
        assert prom.vector(QUERY, "code") == {"200": 5.0} and prom.answered == 1


def test_an_oversized_answer_is_not_read_into_memory(base_url, monkeypatch):
    from sentinel.gate import prom as prom_module

    monkeypatch.setattr(prom_module, "MAX_BODY_BYTES", 64)
    with Prometheus(base_url + "/ok") as prom, pytest.raises(InfrastructureError) as err:
        prom.vector(QUERY, "code")
    assert "more than" in str(err.value) and "not read further" in str(err.value)


def test_gate_run_past_its_timeout_is_exit_2_naming_the_step(base_url):
    from sentinel.errors import UsageError
    from sentinel.gate.judge import DEFAULT_RUN_TIMEOUT_S, run_gate
    from sentinel.gate.prom import BudgetSpent

    with pytest.raises(BudgetSpent) as err:
        run_gate(base_url + "/drip", "digits", "v3", "v4", "10m", timeout=0.3)
    assert err.value.exit_code == 2
    message = str(err.value)
    assert "time budget of 0.3 s" in message and "while asking Prometheus for its time" in message
    assert "no criterion was judged" in message and "--timeout" in message
    with pytest.raises(UsageError):
        run_gate(base_url + "/ok", "digits", "v3", "v4", "10m", timeout=0)
    import inspect

    from sentinel.commands.gate_cmd import gate
    assert inspect.signature(gate).parameters["timeout"].default.default == DEFAULT_RUN_TIMEOUT_S


def test_the_gate_judges_at_prometheus_now_not_the_hosts_and_in_prometheus_duration_spelling(base_url):
    from sentinel.gate.judge import run_gate

    CLOCK.clear()
    # no series at all: exit 2, but only after every query was asked at Prometheus' time
    with pytest.raises(InfrastructureError) as err:
        run_gate(base_url + "/clock", "digits", "v3", "v4", "30m60m")
    assert "has no sentinel_model_info" in str(err.value)
    first, *rest = CLOCK
    assert first == {"query": ["time()"]} and rest
    assert all(q["time"] == ["1000.5"] for q in rest), rest
    assert all("[1h30m]" in q["query"][0] for q in rest if "[" in q["query"][0])   # not [30m60m]: Prometheus refuses it


def test_warnings_of_a_successful_answer_are_kept_once(base_url):
    with Prometheus(base_url + "/partial") as prom:
        assert prom.vector(QUERY, "code") == {}
        prom.vector(QUERY, "code")
        assert prom.warnings == ["No StoreAPIs matched for this query"]


def test_well_formed_answer_still_parses(base_url):
    with Prometheus(base_url + "/ok") as prom:
        assert prom.vector(QUERY, "code") == {"200": 5.0}


class _Answers:
    """Stands in for Prometheus in check_versions: each query answered by the first matching key."""

    def __init__(self, scrapes: dict[str, float], requests: tuple[str, ...] = ("v3", "v4"),
                 unlabelled: float | None = None):
        self.scrapes, self.requests, self.unlabelled = scrapes, requests, unlabelled

    def vector(self, expr: str, label: str) -> dict[str, float]:
        if expr.startswith("max by (version) (count_over_time("):
            return self.scrapes
        if "sentinel_requests_total" in expr:
            return {v: 1.0 for v in self.requests}
        return {"v3": 1.0, "v4": 1.0}   # model_info present for both

    def scalar(self, expr: str) -> float | None:
        return self.unlabelled


def test_window_shorter_than_two_scrapes_is_a_usage_error_not_skipped_criteria():
    from sentinel.errors import UsageError
    from sentinel.gate.judge import check_versions

    # one sample per series in a 15s window scraped every 30s: increase() has nothing to say,
    # which used to come out as every criterion "skipped: no request series" and exit 3
    with pytest.raises(UsageError) as err:
        check_versions(_Answers({"v3": 1.0, "v4": 2.0}), "digits", "v3", "v4", "15s")  # type: ignore[arg-type]
    message = str(err.value)
    assert "--window 15s" in message and "baseline digits:v3 (1 scrape)" in message and "v4" not in message
    assert "twice the scrape interval" in message
    check_versions(_Answers({"v3": 3.0, "v4": 2.0}), "digits", "v3", "v4", "1m")  # type: ignore[arg-type]


def test_a_canary_whose_first_requests_came_in_the_last_scrape_is_too_little_traffic_not_a_short_window():
    from sentinel.gate.criteria import Verdict
    from sentinel.gate.judge import check_versions, judge
    from sentinel.gate.settings import GateSettings

    # 40 scrapes of the baseline in the 10m window: its length is fine. The canary's request
    # series has one sample (traffic reached it just now); "use a --window of at least twice the
    # scrape interval" (exit 2) sent the user after the wrong fix.
    check_versions(_Answers({"v3": 40.0, "v4": 1.0}), "digits", "v3", "v4", "10m")  # type: ignore[arg-type]
    results = judge(VersionData(codes={"200": 5000.0}), VersionData(), GateSettings(), 0.001)
    assert {r.verdict for r in results} <= {Verdict.INCONCLUSIVE, Verdict.SKIPPED}


def test_canary_up_but_without_traffic_yet_is_not_an_infrastructure_error():
    from sentinel.gate.criteria import Verdict
    from sentinel.gate.judge import check_versions, judge
    from sentinel.gate.settings import GateSettings

    # v4's sidecar is up (model info) but no request reached it: no request series yet
    check_versions(_Answers({"v3": 30.0}, requests=("v3",)), "digits", "v3", "v4", "5m")  # type: ignore[arg-type]
    results = judge(VersionData(codes={"200": 500.0}), VersionData(), GateSettings(), 0.001)
    assert {r.verdict for r in results} <= {Verdict.INCONCLUSIVE, Verdict.SKIPPED}
    # ...unless unlabelled request series suggest the version target label is missing
    with pytest.raises(InfrastructureError) as err:
        check_versions(_Answers({"v3": 30.0}, requests=("v3",), unlabelled=2.0),  # type: ignore[arg-type]
                       "digits", "v3", "v4", "5m")
    assert "canary digits:v4 has no sentinel_requests_total" in str(err.value) and "target label" in str(err.value)


class _Replicas:
    """Two replicas of one version: a {0.05, +Inf} layout and a {0.1, +Inf} one, 100 requests each at 30 ms."""

    def vector(self, expr: str, label: str) -> dict[str, float]:
        if expr.startswith("count by (le) (increase(sentinel_request_duration_seconds_bucket"):
            return {"0.05": 1.0, "0.1": 1.0, "+Inf": 2.0}
        if expr.startswith("sum by (le) (\n  (increase(sentinel_request_duration_seconds_bucket"):
            return {"0.05": 100.0, "0.1": 100.0, "+Inf": 200.0}   # 0.1 holds only one replica's 100
        return {}

    def scalar(self, expr: str) -> float | None:
        return None


def test_bounds_only_some_replicas_export_are_left_out_of_the_version_histogram():
    from sentinel.gate.judge import fetch

    data = fetch(_Replicas(), "digits", "v4", "10m")  # type: ignore[arg-type]
    assert data.buckets == {math.inf: 200.0}
