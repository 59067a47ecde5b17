"""docker-compose, Prometheus, Alertmanager, Grafana provisioning and Kubernetes manifests.

Docker cannot run here, so the compose file is checked by what can be checked: every file
it mounts exists, the Prometheus config passes `promtool check config` laid out as the
container sees it (with the rules), and the Alertmanager config passes `amtool check-config`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sentinel.config import load_config
from sentinel.slo.generate import prometheus_rule
from sentinel.slo.rules import generate_rule_files
from sentinel.slo.spec import load_slo_file

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SPEC = load_slo_file(REPO / "slo.yaml")


def _mounts():
    for name, svc in COMPOSE["services"].items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if src.startswith((".", "/")):
                yield name, REPO / src, dst


def test_compose_has_the_stack():
    assert set(COMPOSE["services"]) == {"model-server", "sentinel", "prometheus", "alertmanager", "grafana",
                                        "alert-sink"}
    assert "digits:v3" in COMPOSE["services"]["model-server"]["command"]
    assert COMPOSE["services"]["sentinel"]["command"][:2] == ["sentinel", "run"]
    assert (REPO / "Dockerfile").exists()
    assert "pip install" in (REPO / "Dockerfile").read_text()


@pytest.mark.parametrize("service,src,dst", list(_mounts()), ids=lambda v: str(v))
def test_every_mounted_file_exists(service, src, dst):
    assert src.exists(), f"{service} mounts {src} at {dst}, which does not exist"


def _container_fs(tmp_path: Path, service: str) -> Path:
    """Copy what `service` mounts to tmp_path/<container path>, as the container would see it."""
    for name, src, dst in _mounts():
        if name != service:
            continue
        target = tmp_path / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy(src, target)
    return tmp_path


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_check_config_with_the_mounted_rules(tmp_path):
    root = _container_fs(tmp_path, "prometheus")
    proc = subprocess.run(["promtool", "check", "config", str(root / "etc/prometheus/prometheus.yml")],
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sentinel-slo.rules.yml" in out and "sentinel-ops.rules.yml" in out  # rules found and checked


def test_prometheus_scrape_interval_and_job_match_the_slo_file():
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    assert prom["global"]["scrape_interval"] == SPEC.scrape_interval
    assert SPEC.job in {j["job_name"] for j in prom["scrape_configs"]}
    monitor = yaml.safe_load((REPO / "deploy/k8s/servicemonitor.yaml").read_text())
    assert monitor["spec"]["endpoints"][0]["interval"] == SPEC.scrape_interval


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed")
def test_amtool_check_config():
    proc = subprocess.run(["amtool", "check-config", str(REPO / "deploy/alertmanager/alertmanager.yml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alertmanager_groups_by_model_and_slo_and_inhibits_tickets_under_pages():
    am = yaml.safe_load((REPO / "deploy/alertmanager/alertmanager.yml").read_text())
    assert {"model", "slo"} <= set(am["route"]["group_by"])
    assert {r["name"] for r in am["receivers"]} == {"page", "ticket", "info"}
    assert all(r["webhook_configs"] for r in am["receivers"])
    slo_rule, down_rule = am["inhibit_rules"]
    assert 'severity="page"' in slo_rule["source_matchers"] and 'severity="ticket"' in slo_rule["target_matchers"]
    assert {"model", "slo"} <= set(slo_rule["equal"])
    assert down_rule["source_matchers"] == ['alertname="SentinelDown"'] and down_rule["equal"] == ["instance"]


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed")
@pytest.mark.parametrize("labels,receiver", [
    (["alertname=SentinelErrorBudgetBurn", "severity=page", "slo=availability", "model=digits"], "page"),
    (["alertname=SentinelErrorBudgetBurn", "severity=ticket", "slo=latency", "model=digits"], "ticket"),
    (["alertname=SentinelDown", "severity=page"], "page"),
    (["alertname=SentinelAccuracyEstimateUnreliable", "severity=info", "slo=accuracy", "model=digits"], "info"),
])
def test_alertmanager_routes(labels, receiver):
    proc = subprocess.run(["amtool", "config", "routes", "test", "--config.file",
                           str(REPO / "deploy/alertmanager/alertmanager.yml"), *labels],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == receiver, proc.stdout + proc.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/sentinel.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    assert any(dst == path and src == REPO / "dashboards" for _, src, dst in _mounts())


def test_sidecar_config_is_valid():
    cfg = load_config(REPO / "deploy/sentinel/sentinel.yaml")
    assert cfg.model("digits").version == "v3"


def _k8s() -> list[dict]:
    docs = []
    for path in sorted((REPO / "deploy/k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests(tmp_path):
    docs = {d["kind"]: d for d in _k8s()}
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "NetworkPolicy"}
    admin_rules = [r for r in docs["NetworkPolicy"]["spec"]["ingress"]
                   if any(p["port"] == 9464 for p in r.get("ports", []))]
    assert admin_rules and all(r.get("from") for r in admin_rules)   # the admin port is not open to all
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"model-server", "sentinel"}
    assert containers["sentinel"]["args"][:2] == ["sentinel", "run"]
    ports = {p["name"]: p["containerPort"] for p in containers["sentinel"]["ports"]}
    assert ports == {"http": 8080, "grpc": 8001, "metrics": 9464}
    # The ConfigMap's sentinel.yaml loads, and its listeners are the ports the pod exposes.
    cfg_path = tmp_path / "sentinel.yaml"
    cfg_path.write_text(docs["ConfigMap"]["data"]["sentinel.yaml"])
    cfg = load_config(cfg_path)
    assert cfg.listen.endswith(":8080") and cfg.grpc_listen.endswith(":8001") and cfg.admin.endswith(":9464")
    model_args = containers["model-server"]["args"]
    assert cfg.grpc_upstream.endswith(":" + model_args[model_args.index("--grpc-port") + 1])
    assert cfg.upstream.endswith(":" + model_args[model_args.index("--port") + 1])
    svc_ports = {p["name"] for p in docs["Service"]["spec"]["ports"]}
    assert svc_ports == {"http", "grpc", "metrics"}
    open_ports = {p["port"] for r in docs["NetworkPolicy"]["spec"]["ingress"] if not r.get("from")
                  for p in r["ports"]}
    assert open_ports == {8080, 8001}
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] in svc_ports
    selector = docs["Service"]["spec"]["selector"].items()
    assert selector <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    # the ConfigMap's slo.yaml is the committed one's SLOs
    cm_slos = yaml.safe_load(docs["ConfigMap"]["data"]["slo.yaml"])
    assert cm_slos["slos"] == yaml.safe_load((REPO / "slo.yaml").read_text())["slos"]


def test_prometheusrule_holds_the_generated_groups():
    (doc,) = [d for d in _k8s() if d["kind"] == "PrometheusRule"]
    files = generate_rule_files(SPEC)
    assert doc["spec"]["groups"] == [g for f in files for g in yaml.safe_load(f.render())["groups"]]
    assert yaml.safe_load(prometheus_rule(files, SPEC)) == doc


def test_every_alert_has_a_runbook_section():
    from sentinel.slo.rules import alert_names

    text = (REPO / "deploy/RUNBOOK.md").read_text()
    sections = {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}
    assert set(alert_names(generate_rule_files(SPEC))) <= sections
