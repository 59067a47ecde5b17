"""Alertmanager (deploy/alertmanager/alertmanager.yml) against every alert the generated rules define.

* Routing, with `amtool config routes test`: each alert of rules/*.yml, with the labels its
  rule gives it, reaches the receiver its severity names (page → pager, ticket → ticket
  queue, info → the low-priority receiver, never a ticket).
* Inhibition, with a real Alertmanager (inhibition is computed at query time, so the alerts'
  `status.inhibitedBy` says it at once): an SLO's page silences that model's and SLO's
  tickets, whatever the ticket's alert name, and nothing else; SentinelDown silences the other
  alerts of the same sidecar (`instance`) and no other sidecar's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from servers import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
AM_CONFIG = REPO / "deploy/alertmanager/alertmanager.yml"
RECEIVER_FOR_SEVERITY = {"page": "page", "ticket": "ticket", "info": "info"}


def _generated_alerts() -> list[tuple[str, dict]]:
    """(alertname, labels) of every alerting rule in rules/*.yml, one per distinct label set."""
    out: dict[tuple, tuple[str, dict]] = {}
    for path in sorted((REPO / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    labels = {"alertname": rule["alert"], **{k: str(v) for k, v in rule.get("labels", {}).items()}}
                    out[tuple(sorted(labels.items()))] = (rule["alert"], labels)
    return list(out.values())


ALERTS = _generated_alerts()


def _rules_define_alerts_of_every_severity():
    assert {labels.get("severity") for _, labels in ALERTS} == {"page", "ticket", "info"}


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed")
@pytest.mark.parametrize("name,labels", ALERTS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={v}" for k, v in v.items() if k not in ("alertname",)))
def test_every_generated_alert_routes_by_its_severity(name, labels):
    proc = subprocess.run(["amtool", "config", "routes", "test", "--config.file", str(AM_CONFIG),
                           *(f"{k}={v}" for k, v in labels.items())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == RECEIVER_FOR_SEVERITY[labels["severity"]], (
        f"{name} severity={labels['severity']} routes to {proc.stdout.strip()!r}")


def test_the_info_receiver_is_low_priority_and_not_a_pager_or_ticket():
    _rules_define_alerts_of_every_severity()   # the rules do raise info alerts
    am = yaml.safe_load(AM_CONFIG.read_text())
    receivers = {r["name"]: r for r in am["receivers"]}
    info_urls = {c["url"] for c in receivers["info"].get("webhook_configs", [])}
    other_urls = {c["url"] for n in ("page", "ticket") for c in receivers[n]["webhook_configs"]}
    assert not info_urls & other_urls


def _binary() -> str | None:
    return shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def _alert(**labels: str) -> dict:
    return {"labels": labels, "annotations": {}, "startsAt": "2020-01-01T00:00:00Z"}


@pytest.mark.skipif(_binary() is None, reason="Alertmanager not installed (Debian: prometheus-alertmanager)")
def test_inhibitions_with_a_real_alertmanager(tmp_path):
    port = free_port()
    proc = subprocess.Popen([_binary(), f"--config.file={AM_CONFIG}", f"--storage.path={tmp_path}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/api/v2"
    try:
        deadline = time.monotonic() + 8
        while True:
            try:
                urllib.request.urlopen(f"{base}/status", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "Alertmanager did not start"
                time.sleep(0.1)
        sidecar_a, sidecar_b = "10.0.0.1:9464", "10.0.0.2:9464"
        alerts = {
            "page-accuracy": _alert(alertname="SentinelErrorBudgetBurn", severity="page", slo="accuracy",
                                    sli="estimated_accuracy", model="digits"),
            "ticket-accuracy": _alert(alertname="SentinelErrorBudgetBurn", severity="ticket", slo="accuracy",
                                      sli="estimated_accuracy", model="digits"),
            "below-objective": _alert(alertname="SentinelEstimatedAccuracyBelowObjective", severity="ticket",
                                      slo="accuracy", model="digits"),
            "ticket-latency": _alert(alertname="SentinelErrorBudgetBurn", severity="ticket", slo="latency",
                                     sli="latency", model="digits"),
            "ticket-accuracy-other-model": _alert(alertname="SentinelErrorBudgetBurn", severity="ticket",
                                                  slo="accuracy", sli="estimated_accuracy", model="letters"),
            "metrics-absent": _alert(alertname="SentinelMetricsAbsent", severity="ticket", model="digits",
                                     metric="sentinel_requests_total"),
            "down-a": _alert(alertname="SentinelDown", severity="page", job="sentinel", instance=sidecar_a),
            "drift-a": _alert(alertname="SentinelDriftAlarm", severity="ticket", job="sentinel", instance=sidecar_a,
                              model="digits", detector="bbsd"),
            "collector-a": _alert(alertname="SentinelCollectorFailing", severity="ticket", job="sentinel",
                                  instance=sidecar_a, collector="gpu"),
            "drift-b": _alert(alertname="SentinelDriftAlarm", severity="ticket", job="sentinel", instance=sidecar_b,
                              model="digits", detector="bbsd"),
        }
        req = urllib.request.Request(f"{base}/alerts", data=json.dumps(list(alerts.values())).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=5).read()
        expected_inhibited = {"ticket-accuracy", "below-objective", "drift-a", "collector-a"}
        key_of = {tuple(sorted(a["labels"].items())): k for k, a in alerts.items()}
        deadline = time.monotonic() + 5
        while True:   # the inhibitor learns of the source alerts asynchronously
            got = json.loads(urllib.request.urlopen(f"{base}/alerts", timeout=5).read())
            inhibited = {key_of[tuple(sorted((k, v) for k, v in a["labels"].items()))]
                         for a in got if a["status"]["inhibitedBy"]}
            if (inhibited == expected_inhibited and len(got) == len(alerts)) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(got) == len(alerts)
        assert inhibited == expected_inhibited
    finally:
        stop_process(proc, grace=5)
