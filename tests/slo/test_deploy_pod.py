"""The pod of deploy/k8s/deployment.yaml: probes, stop sequence, security context, schema.

Each check is what the kubelet would do with the manifest: a probe reaches the pod IP (not
loopback); only liveness restarts a container; SIGTERM comes after preStop and everything
must be done within terminationGracePeriodSeconds; a read-only root leaves writable only what
is mounted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sentinel.config import ProxyConfig
from sentinel.proxy.sidecar import TRACER_SHUTDOWN_S

REPO = Path(__file__).resolve().parents[2]
DOCS = [d for d in yaml.safe_load_all((REPO / "deploy/k8s/deployment.yaml").read_text()) if d]
DEPLOYMENT = next(d for d in DOCS if d["kind"] == "Deployment")
CONFIGMAP = next(d for d in DOCS if d["kind"] == "ConfigMap")
POD = DEPLOYMENT["spec"]["template"]["spec"]
C = {c["name"]: c for c in POD["containers"]}
SIDECAR_CFG = yaml.safe_load(CONFIGMAP["data"]["sentinel.yaml"])
# What `Sidecar.stop()` waits for besides the drain: the canary thread (5 s each) and the
# analysis worker (2 s + 1 s join), then the OTLP exporter.
CANARY_STOP_S, ANALYSIS_STOP_S = 5.0, 3.0


def _port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container.get("ports", []) if p["name"] == port)


def _probes(container: dict):
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def test_model_server_probes_can_reach_it():
    """The model server binds 127.0.0.1; the kubelet probes the pod IP, so a tcpSocket or httpGet
    probe on its port fails forever and the pod never becomes ready."""
    ms = C["model-server"]
    args = ms["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    loopback = {int(args[args.index("--port") + 1]), int(args[args.index("--grpc-port") + 1])}
    for kind, probe in _probes(ms):
        for handler in ("tcpSocket", "httpGet", "grpc"):
            if handler in probe:
                port = _port_number(ms, probe[handler]["port"])
                assert port not in loopback, f"model-server {kind} probes loopback-only port {port} from the pod IP"


def test_sidecar_probes():
    sc = C["sentinel"]
    assert sc["livenessProbe"]["httpGet"]["path"] == "/healthz"   # never /readyz: a dead model server must not restart it
    assert sc["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sc.get("startupProbe", {}).get("httpGet", {}).get("path") == "/healthz"
    for kind, probe in _probes(sc):
        assert _port_number(sc, probe["httpGet"]["port"]) == 9464, kind
    live = sc["livenessProbe"]
    assert live.get("periodSeconds", 10) * live.get("failureThreshold", 3) >= 20
    # /readyz connects to the HTTP upstream and, when set, the gRPC one (connect_timeout_s each)
    connect = SIDECAR_CFG.get("proxy", {}).get("connect_timeout_s", ProxyConfig.connect_timeout_s)
    upstreams = 1 + ("grpc_upstream" in SIDECAR_CFG)
    assert sc["readinessProbe"].get("timeoutSeconds", 1) >= connect * upstreams


def _prestop_sleep(container: dict) -> float:
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return hook["sleep"]["seconds"]
    cmd = hook.get("exec", {}).get("command", [])
    return float(cmd[1]) if cmd[:1] == ["sleep"] else 0.0


def test_stop_sequence_fits_the_grace_period():
    drain = SIDECAR_CFG.get("proxy", {}).get("drain_timeout_s", ProxyConfig.drain_timeout_s)
    sidecar_wait = _prestop_sleep(C["sentinel"])
    assert sidecar_wait >= 5, "no preStop wait: SIGTERM closes the proxy listener while endpoints still route to it"
    # the model server must outlive the sidecar's drain
    assert _prestop_sleep(C["model-server"]) >= sidecar_wait + drain
    grace = POD.get("terminationGracePeriodSeconds", 30)
    assert grace >= sidecar_wait + drain + CANARY_STOP_S + ANALYSIS_STOP_S + TRACER_SHUTDOWN_S + 1


def test_containers_are_locked_down_and_have_writable_tmp():
    assert POD["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in POD.get("volumes", [])}
    for name, c in C.items():
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), name
        writable = {m["mountPath"]: m for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        assert "/tmp" in writable and "emptyDir" in volumes[writable["/tmp"]["name"]], name
    env = {e["name"]: e.get("value") for e in C["sentinel"].get("env", [])}
    # the shadow reference's ONNX cache: $XDG_CACHE_HOME/sentinel/onnx must be on a writable mount
    assert env.get("XDG_CACHE_HOME", "").startswith("/tmp/")


def test_manifests_validate_against_the_kubernetes_schemas():
    """Strict validation of the built-in kinds with the schemas kubernetes-validate bundles
    (offline; the test extra installs it): the fields are spelled as the API wants them. The
    CRDs (ServiceMonitor, PrometheusRule) have no bundled schema: test_deploy.py checks their fields."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

    for version in ("1.27.0", "1.30.0"):
        for path in sorted((REPO / "deploy/k8s").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc["apiVersion"].split("/")[0] in ("v1", "apps", "networking.k8s.io"):
                    kubernetes_validate.validate(doc, version, strict=True)
