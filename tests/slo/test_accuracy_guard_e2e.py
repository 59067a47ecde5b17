"""The accuracy SLO's guard on a real Prometheus, scraping two replicas' accuracy gauges in real time.

Two small exporters on loopback stand in for two sidecars' accuracy series (the sidecar
itself needs minutes of traffic to fill a window; `test_prometheus_e2e.py` runs the real
one). Prometheus scrapes them every second with the rules generated from `slo.yaml` under a
4h period, where the fast page pair is 20s/4s:

1. startup: the lower bound reads 0.5 on 40 samples: no accuracy burn alert, the SLO's
   usable share is 0 and `SentinelAccuracyEstimateUnreliable{reason="insufficient_samples"}`
   is pending;
2. healthy on enough samples: usable share 1, nothing pending;
3. the bound drops to 0.2 on enough samples: the page fires within the Workbook detection
   time of the fast pair (plus scrape and evaluation lag);
4. the estimator flags the estimate unreliable: the page resolves at once and the
   `flagged_unreliable` reason is pending.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import free_port, serve_in_thread, stop_process, stop_server, wait_for

from sentinel import metricnames as mn
from sentinel.slo import recorded
from sentinel.slo.rules import BURN_ALERT, UNRELIABLE_ALERT, generate_rule_files
from sentinel.slo.spec import load_slo_file
from sentinel.slo.windows import plan_windows

REPO = Path(__file__).resolve().parents[2]
LAG_S = 10.0    # scrape, rule and alert evaluation, each every second, on a loaded machine

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")]


class Replica:
    """A loopback exporter of one replica's accuracy estimate, samples and reliable flag."""

    def __init__(self) -> None:
        self.values = {"bound": 0.5, "samples": 40.0, "reliable": 1.0}
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                v = replica.values
                body = (f'{mn.ESTIMATED_ACCURACY.name}{{model="digits",method="atc_lower"}} {v["bound"]}\n'
                        f'{mn.ACCURACY_ESTIMATE_SAMPLES.name}{{model="digits"}} {v["samples"]}\n'
                        f'{mn.ACCURACY_ESTIMATE_RELIABLE.name}{{model="digits"}} {v["reliable"]}\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = serve_in_thread(Handler)
        self.target = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        stop_server(self.server)


def _wait_quarter(what: str, check: Callable[[], Any], timeout: float) -> Any:
    return wait_for(what, check, timeout, every=0.25)


@pytest.fixture()
def prom(tmp_path):
    slo = tmp_path / "slo.yaml"
    slo.write_text((REPO / "slo.yaml").read_text()
                   .replace("period: 30d", "period: 4h").replace("scrape_interval: 30s", "scrape_interval: 1s"))
    spec = load_slo_file(slo)
    (tmp_path / "rules").mkdir()
    for f in generate_rule_files(spec):
        (tmp_path / "rules" / f.filename).write_text(f.render())
    replicas = [Replica(), Replica()]
    port = free_port()
    targets = ", ".join(f"'{r.target}'" for r in replicas)
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: ['rules/*.yml']\n"
        f"scrape_configs:\n  - job_name: sentinel\n    static_configs: [{{targets: [{targets}]}}]\n")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0)
    try:
        _wait_quarter("prometheus ready", lambda: client.get("/-/ready").status_code == 200, 30)
        yield {"client": client, "replicas": replicas, "spec": spec}
    finally:
        client.close()
        stop_process(proc)
        log.close()
        for r in replicas:
            r.close()


def _query(client: httpx.Client, expr: str) -> list[dict]:
    body = client.get("/api/v1/query", params={"query": expr}).json()
    assert body["status"] == "success", f"{expr!r}: {body.get('error')}"
    return body["data"]["result"]


def _alerts(client: httpx.Client, name: str, state: str, **labels: str) -> list[dict]:
    alerts = client.get("/api/v1/alerts").json()["data"]["alerts"]
    return [a for a in alerts if a["labels"].get("alertname") == name and a["state"] == state
            and a["labels"].get("slo") == "accuracy" and all(a["labels"].get(k) == v for k, v in labels.items())]


def _usable(client: httpx.Client) -> float | None:
    got = _query(client, f'{recorded.ESTIMATE_USABLE}{{slo="accuracy"}}')
    return float(got[0]["value"][1]) if got else None


def _set(replicas: list[Replica], **values: float) -> None:
    for r in replicas:
        r.values.update(values)


def test_startup_is_silent_a_real_drop_pages_and_a_disowned_estimate_stops_it(prom):
    client, replicas = prom["client"], prom["replicas"]
    spec = prom["spec"]
    slo = next(s for s in spec.slos if s.sli == "estimated_accuracy")
    fast = plan_windows(spec.period_seconds, spec.scrape_interval_seconds).by_severity("page")[0]

    # 1. startup: a bound of 0.5 on 40 samples
    _wait_quarter("the usable share at 0", lambda: _usable(client) == 0.0, 30)
    _wait_quarter("insufficient_samples pending",
          lambda: _alerts(client, UNRELIABLE_ALERT, "pending", reason="insufficient_samples"), 30)
    time.sleep(fast.long_s / 2)
    assert not _query(client, f'ALERTS{{alertname="{BURN_ALERT}",slo="accuracy"}}')
    assert not _query(client, f'{recorded.ESTIMATED_ACCURACY}{{slo="accuracy"}}')

    # 2. healthy on enough samples, for longer than the fast pair's long window
    _set(replicas, bound=0.99, samples=2.0 * slo.sample_floor)
    _wait_quarter("the usable share at 1", lambda: _usable(client) == 1.0, 15)
    _wait_quarter("the unreliable alert reset", lambda: not _alerts(client, UNRELIABLE_ALERT, "pending"), 15)
    time.sleep(fast.long_s + 3)
    never = f'count_over_time(ALERTS{{alertname="{BURN_ALERT}",slo="accuracy"}}[5m])'
    assert not _query(client, never), "an accuracy burn alert fired during startup or healthy traffic"

    # 3. a real drop on enough samples
    _set(replicas, bound=0.2)
    t0 = time.monotonic()
    _wait_quarter("the accuracy page", lambda: _alerts(client, BURN_ALERT, "firing", severity="page"),
          fast.detection_s(0.8, slo.budget) + LAG_S)
    detect = time.monotonic() - t0

    # 4. the estimator disowns the estimate: the page stops though the windows still hold 0.2
    _set(replicas, reliable=0.0)
    t1 = time.monotonic()
    _wait_quarter("the page resolved", lambda: not _alerts(client, BURN_ALERT, "firing"), LAG_S)
    stop = time.monotonic() - t1
    _wait_quarter("flagged_unreliable pending",
          lambda: _alerts(client, UNRELIABLE_ALERT, "pending", reason="flagged_unreliable"), 15)
    print(f"\naccuracy guard e2e: page {detect:.1f}s after the drop (Workbook fast pair "
          f"{fast.detection_s(0.8, slo.budget):.1f}s), stopped {stop:.1f}s after the estimate was disowned")
