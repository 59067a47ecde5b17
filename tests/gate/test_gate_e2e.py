"""End to end: four model servers, four sidecars, one Prometheus, `sentinel gate` between versions.

    digits:v3            ──► sentinel run ─┐  version="v3"        (stable, the baseline)
    digits:v2            ──► sentinel run ─┤  version="v2"        (the weaker version, 78.9%)
    digits:v3            ──► sentinel run ─┤  version="v3-replica"
    digits:v3 +100 ms    ──► sentinel run ─┤  version="v3-slow"
                                           └─► prometheus (scrape 1s, `version` as target label)

Every sidecar is configured with `version: v3`: that names the registry entry whose
reference model, golden set and drift baseline it uses, so the canary's shadow agreement
is agreement with the *stable* reference. The served version reaches the series only
through the scrape target label, as in Kubernetes (PodMonitor relabelling).

The same held-out digits, in the same order, go through every sidecar. The test checks
the four verdicts the issue asks for, the version-presence error, the Argo Rollouts and
Flagger template queries, and the executive dashboard's cost query.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")]

DELAY_MS = 100
N_MAIN = 450          # held-out digits sent through each sidecar (the slow one gets fewer)
N_SLOW = 260
N_FEW = 30            # the first phase: too little traffic to judge
# Pod names as Kubernetes would give them, for the Flagger queries (primary vs canary).
PODS = {"v3": "digits-primary-5d9f7c-a1b2c", "v2": "digits-7c9d8f-x1y2z",
        "v3-replica": "replica-6f8d9-q1w2e", "v3-slow": "slow-6f8d9-r4t5y"}
COST = {"replica_hour": 0.5, "gpu_hour": 2.5}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _payload(raw: np.ndarray) -> bytes:
    body = {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                        "data": [round(float(v), 4) for v in raw.reshape(-1)]}]}
    return json.dumps(body).encode()


def _wait(what: str, check, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p, log in procs:
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gate(prom_url: str, baseline: str, canary: str, window: str, slo: Path, tmp: Path) -> tuple[int, str, dict]:
    out = tmp / f"gate-{baseline}-{canary}.json"
    proc = subprocess.run([sys.executable, "-m", "sentinel", "gate", "--prometheus", prom_url, "--model", "digits",
                           "--baseline", baseline, "--canary", canary, "--window", window, "--slo", str(slo),
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    report = json.loads(out.read_text()) if out.is_file() else {}
    return proc.returncode, proc.stdout + proc.stderr, report


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    slo = tmp / "slo.yaml"
    text = (REPO / "slo.yaml").read_text().replace("period: 30d", "period: 4h").replace(
        "scrape_interval: 30s", "scrape_interval: 1s")
    # Latency tolerance wider than the default: two identical servers on a loaded 2-core machine
    # can differ by a quarter at the tail; the slow canary is slower by far more than 1.5x + 50 ms.
    slo.write_text(text + "gate: {min_requests: 200, min_predictions: 200, min_compared: 100, "
                          "latency_tolerance: 1.5, latency_min_diff_s: 0.05}\n"
                          f"cost: {{replica_hour: {COST['replica_hour']}, gpu_hour: {COST['gpu_hour']}}}\n")
    servers = {"v3": ("digits:v3", 0), "v2": ("digits:v2", 0), "v3-replica": ("digits:v3", 0),
               "v3-slow": ("digits:v3", DELAY_MS)}
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    ports: dict[str, dict[str, int]] = {}
    t0 = time.monotonic()

    def launch(name: str, cmd: list[str]) -> tuple[str, subprocess.Popen, Path]:
        log = tmp / f"{name.replace(' ', '-')}.log"
        entry = (name, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT), log)
        procs.append(entry)
        return entry

    def serve(version: str) -> tuple[str, subprocess.Popen, Path]:
        model, delay = servers[version]
        ports[version] = {"server": _free_port()}
        cmd = [sys.executable, "-m", "sentinel", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(ports[version]["server"]), "--registry", str(REPO / "models")]
        return launch(f"serve {version}", cmd + (["--delay-ms", str(delay)] if delay else []))

    try:
        # 1. model servers; a port taken between probe and bind (other tests run too) is retried
        pending = {v: serve(v) for v in servers}
        deadline = time.monotonic() + 180
        while pending and time.monotonic() < deadline:
            for version, (name, proc, log) in list(pending.items()):
                if proc.poll() is not None:
                    if "address already in use" in log.read_text().lower():
                        procs.remove((name, proc, log))
                        pending[version] = serve(version)
                        continue
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    url = f"http://127.0.0.1:{ports[version]['server']}/v2/health/ready"
                    if httpx.get(url, timeout=2).status_code == 200:
                        del pending[version]
                except httpx.TransportError:
                    pass
            time.sleep(0.3)
        assert not pending, f"model servers not ready: {sorted(pending)}"

        # 2. sidecars on port 0; their log says where they listen
        sidecars = {}
        for version in servers:
            upstream = f"http://127.0.0.1:{ports[version]['server']}"
            cfg = {
                "listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "upstream": upstream,
                # version v3 for every sidecar: the stable reference and golden set (see the docstring)
                "models": [{"name": "digits", "version": "v3", "endpoint": upstream, "protocol": "v2"}],
                "registry": str(REPO / "models"), "golden_sets": str(REPO / "golden_sets"),
                "sampling": {"rate": 1.0, "max_per_second": 500},
                "replay": {"canary_interval_s": 0}, "gpu": {"enabled": "off"},
                "drift": {"window_size": 100, "evaluate_every": 50, "alpha": 0.01, "persistence": 2,
                          "shadow": True, "shadow_max_per_second": 200},
            }
            conf = tmp / f"sentinel-{version}.yaml"
            conf.write_text(yaml.safe_dump(cfg))
            sidecars[version] = launch(f"sidecar {version}",
                                       [sys.executable, "-m", "sentinel", "run", "--config", str(conf)])
        listening = re.compile(r"proxy on 127\.0\.0\.1:(\d+) .*admin on 127\.0\.0\.1:(\d+)")

        def bound(version: str) -> bool:
            m = listening.search(sidecars[version][2].read_text(errors="replace"))
            if m:
                ports[version].update(proxy=int(m.group(1)), admin=int(m.group(2)))
            return bool(m)

        for version in servers:
            _wait(f"sidecar {version} listening", lambda v=version: bound(v), 120, procs)

        # 3. Prometheus, the served version as a target label
        targets = [{"targets": [f"127.0.0.1:{ports[v]['admin']}"], "labels": {"version": v, "pod": PODS[v]}}
                   for v in servers]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "sentinel", "static_configs": targets}]}))
        for attempt in range(3):
            prom_port = _free_port()
            entry = launch("prometheus", ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                                          f"--storage.tsdb.path={tmp / 'data'}",
                                          f"--web.listen-address=127.0.0.1:{prom_port}"])
            prom_url = f"http://127.0.0.1:{prom_port}"
            try:
                _wait("prometheus ready", lambda u=prom_url: httpx.get(f"{u}/-/ready", timeout=2).status_code == 200,
                      30, [entry])
                break
            except AssertionError:
                if attempt == 2 or "address already in use" not in entry[2].read_text().lower():
                    raise
                procs.remove(entry)

        from sentinel.training.digits import load_split

        images, labels, split = load_split()
        holdout = np.asarray(split["holdout"])
        bodies = [_payload(images[i]) for i in holdout]
        headers = {"Content-Type": "application/json"}
        # one request each, then wait for the analysis worker to decode it (reference loaded)
        for version in servers:
            httpx.post(f"http://127.0.0.1:{ports[version]['proxy']}/v2/models/digits/infer", content=bodies[0],
                       headers=headers, timeout=30)

        def decoded(version: str) -> bool:
            text = httpx.get(f"http://127.0.0.1:{ports[version]['admin']}/metrics", timeout=5).text
            m = re.search(r'sentinel_samples_total\{[^}]*outcome="decoded"[^}]*\} ([0-9.e+]+)', text)
            return bool(m and float(m.group(1)) >= 1)

        for version in servers:
            _wait(f"{version} analysis", lambda v=version: decoded(v), 120, procs)
        started = time.monotonic() - t0

        def send(version: str, items: list[bytes], threads: int = 1) -> None:
            url = f"http://127.0.0.1:{ports[version]['proxy']}/v2/models/digits/infer"

            def worker(chunk: list[bytes]) -> None:
                with httpx.Client(timeout=30) as c:
                    for body in chunk:
                        r = c.post(url, content=body, headers=headers)
                        assert r.status_code == 200, (version, r.status_code, r.text[:200])

            ts = [threading.Thread(target=worker, args=(items[k::threads],)) for k in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        yield {"prom": prom_url, "tmp": tmp, "slo": slo, "send": send, "bodies": bodies, "started_s": started,
               "t0": t0}
    finally:
        for _, p, _ in reversed(procs):
            _stop(p)


def _scrape_settle() -> None:
    time.sleep(3.0)   # two scrapes after the last request


@pytest.mark.timeout(900)   # eight Python processes start on two shared cores
def test_gate_verdicts_templates_and_cost(fleet):
    prom, tmp, slo, send, bodies = fleet["prom"], fleet["tmp"], fleet["slo"], fleet["send"], fleet["bodies"]
    window = "5m"
    timings = {"start-up": fleet["started_s"]}

    # 1. too little traffic: inconclusive (exit 3), not pass
    t = time.monotonic()
    threads = [threading.Thread(target=send, args=(v, bodies[:N_FEW])) for v in ("v3", "v2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    _scrape_settle()
    rc, out, report = gate(prom, "v3", "v2", window, slo, tmp)
    print("\n$ sentinel gate --baseline v3 --canary v2   # 30 requests each\n" + out)
    assert rc == 3, out
    assert report["verdict"] == "inconclusive" and not report["failed"]

    # 2. a version without series: exit 2, naming it
    rc, out, _ = gate(prom, "v3", "v9", window, slo, tmp)
    assert rc == 2 and "canary digits:v9 has no sentinel_model_info" in out, out

    # 3. the main traffic: the same held-out digits, in the same order, through every sidecar
    main = [bodies[i % len(bodies)] for i in range(N_FEW, N_FEW + N_MAIN)]
    threads = [threading.Thread(target=send, args=(v, main)) for v in ("v3", "v2", "v3-replica")]
    threads.append(threading.Thread(target=send, args=("v3-slow", bodies[:N_FEW] + main[:N_SLOW], 4)))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    timings["traffic"] = time.monotonic() - t
    _scrape_settle()

    rc, out, report = gate(prom, "v3", "v2", window, slo, tmp)
    print("$ sentinel gate --baseline v3 --canary v2\n" + out)
    assert rc == 1, out
    assert {"reference_agreement", "prediction_distribution"} <= set(report["failed"]), out
    # the accuracy criterion fails v2, or says Inconclusive when either estimate is flagged
    # unreliable in the window (it then compares no estimate that is not to be believed)
    acc = next(c for c in report["criteria"] if c["name"] == "accuracy")
    assert acc["verdict"] == "fail" or (acc["verdict"] == "inconclusive" and "unreliable" in acc["summary"]), out
    assert "error_ratio" not in report["failed"] and "latency" not in report["failed"], out

    rc, out, report = gate(prom, "v3", "v3-replica", window, slo, tmp)
    print("$ sentinel gate --baseline v3 --canary v3-replica\n" + out)
    assert rc == 0, out

    rc, out, report = gate(prom, "v3", "v3-slow", window, slo, tmp)
    print("$ sentinel gate --baseline v3 --canary v3-slow   # sentinel serve --delay-ms 100\n" + out)
    assert rc == 1, out
    assert report["failed"] == ["latency"], out

    # 4. the controller templates: every query parses; those over exported metrics return data
    _check_templates(prom, slo)
    # 5. the executive dashboard's cost per 1,000 inferences, from the configured cost
    _check_cost(prom, slo)
    timings["total"] = time.monotonic() - fleet["t0"]
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


_CLIENT = httpx.Client(timeout=30)   # one client: building a TLS context per call costs seconds under load


def _query(prom: str, expr: str) -> list[dict]:
    r = _CLIENT.post(f"{prom}/api/v1/query", data={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n{body.get('error')}"
    return body["data"]["result"]


def _check_templates(prom: str, slo: Path) -> None:
    from sentinel.gate.templates import render
    from sentinel.slo.spec import load_slo_file

    docs = render(load_slo_file(slo), prom, "sentinel:test")
    argo = yaml.safe_load(docs["argo/analysistemplate.yaml"])
    subst = {"{{args.model}}": "digits", "{{args.baseline-version}}": "v3", "{{args.canary-version}}": "v2",
             "{{args.window}}": "5m"}
    # the accuracy drop is empty (Inconclusive by design) while either version's estimate is flagged
    # unreliable, as the gate's accuracy criterion is
    no_data_ok: set[str] = {"accuracy-drop"}
    values = {}
    for m in argo["spec"]["metrics"]:
        expr = m["provider"]["prometheus"]["query"]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "{{" not in expr
        got = _query(prom, expr)
        if m["name"] not in no_data_ok:
            assert len(got) == 1, (m["name"], expr, got)
            values[m["name"]] = float(got[0]["value"][1])
    # v2 against v3: the model-quality checks fail their conditions, errors do not
    assert values["agreement-drop"] > 0.1 and values["prediction-shift"] > 0.1, values
    assert values["error-ratio-increase"] <= 0.001, values
    flagger = [d for d in yaml.safe_load_all(docs["flagger/metrictemplates.yaml"]) if d]
    for d in flagger:
        expr = d["spec"]["query"].replace("{{ target }}", "digits").replace("{{ interval }}", "5m")
        got = _query(prom, expr)
        if d["metadata"]["name"].removeprefix("sentinel-") not in no_data_ok:
            assert len(got) == 1, (d["metadata"]["name"], expr, got)


def _check_cost(prom: str, slo: Path) -> None:
    from sentinel.slo.dashboards import cost_query
    from sentinel.slo.spec import load_slo_file

    spec = load_slo_file(slo)
    expr = cost_query(spec).replace('$model', "digits").replace("$__range", "5m")
    got = _query(prom, expr)
    assert len(got) == 1, (expr, got)
    cost = float(got[0]["value"][1])
    replicas = float(_query(prom, 'count(sentinel_model_info{model="digits"})')[0]["value"][1])
    rate = float(_query(prom, 'sum(rate(sentinel_requests_total{model="digits"}[5m]))')[0]["value"][1])
    expected = replicas * COST["replica_hour"] / (rate * 3600 / 1000)   # no GPU here
    assert replicas == 4 and math.isclose(cost, expected, rel_tol=0.02), (cost, expected, replicas, rate)
    print(f"cost per 1,000 inferences: {cost:.4f} USD ({replicas:.0f} replicas at "
          f"{COST['replica_hour']}/h, {rate:.1f} req/s over 5m)")
