"""docker-compose.yml against the configs it runs with: healthchecks probe the ports the
services listen on, the sidecar waits for a healthy model server, images run as non-root."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sentinel.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SVC = COMPOSE["services"]
CFG = load_config(REPO / "deploy/sentinel/sentinel.yaml")


def _probe_url(service: str) -> str:
    test = " ".join(SVC[service]["healthcheck"]["test"])
    (url,) = re.findall(r"http://[^'\"\s]+", test)
    return url


def test_healthchecks_probe_the_configured_ports():
    admin_port = CFG.admin.rpartition(":")[2]
    assert _probe_url("sentinel") == f"http://127.0.0.1:{admin_port}/healthz"
    cmd = SVC["model-server"]["command"]
    port = cmd[cmd.index("--port") + 1]
    assert CFG.upstream.endswith(f":{port}") and port in SVC["model-server"]["expose"]
    assert _probe_url("model-server").startswith(f"http://127.0.0.1:{port}/v2/")
    _prometheus_scrapes_the_sidecar_admin_port()


def test_sidecar_starts_after_a_healthy_model_server():
    assert SVC["sentinel"]["depends_on"]["model-server"]["condition"] == "service_healthy"


def _prometheus_scrapes_the_sidecar_admin_port():
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "sentinel"]
    admin_port = CFG.admin.rpartition(":")[2]
    assert job["static_configs"][0]["targets"] == [f"sentinel:{admin_port}"]
    assert admin_port in SVC["sentinel"]["expose"]


def test_dockerfile_images_run_as_non_root_and_expose_the_listeners():
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    for stage in stages:
        name = stage.split()[2] if " AS " in stage.split("\n")[0] else stage.split()[0]
        if name in ("sidecar", "full"):
            users = re.findall(r"^USER (\S+)", stage, re.M)
            assert users and users[-1] not in ("root", "0"), name
    sidecar = next(s for s in stages if s.split("\n")[0].endswith("AS sidecar"))
    exposed = set(re.findall(r"^EXPOSE (.+)$", sidecar, re.M)[0].split())
    ports = {a.rpartition(":")[2] for a in (CFG.listen, CFG.admin)} | {"8001"}   # grpc_listen of deploy/k8s
    assert ports <= exposed
