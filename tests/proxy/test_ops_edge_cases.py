"""The daemon's operational surface at its edges: config values, drain, a shared port, multi-process labels."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time

import httpx
import pytest
from proxy_helpers import RunningSidecar, Upstream, make_config

from sentinel.config import load_config
from sentinel.errors import ConfigError, InfrastructureError
from sentinel.proxy.sidecar import Sidecar

BASE = "models:\n  - name: digits\n    version: v3\n"


def _problems(tmp_path, text: str) -> list[str]:
    path = tmp_path / "s.yaml"
    path.write_text(BASE + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


@pytest.mark.unit
@pytest.mark.parametrize("text,field", [
    # urlsplit accepts these; the daemon's first `.port` raised ValueError: a traceback, exit 1
    ("upstream: http://127.0.0.1:notaport\n", "upstream"),
    ("upstream: http://127.0.0.1:70000\n", "upstream"),
    # `x <= 0` is False for NaN: a NaN drain timeout dropped every in-flight request on SIGTERM
    ("proxy: {drain_timeout_s: .nan}\n", "proxy.drain_timeout_s"),
    ("proxy: {upstream_timeout_s: .nan}\n", "proxy.upstream_timeout_s"),
    ("proxy: {drain_timeout_s: .inf}\n", "proxy.drain_timeout_s"),   # crashed the stop of proxy.workers
    ("sampling: {max_per_second: .nan}\n", "sampling.max_per_second"),
    ("replay: {canary_rate: .nan}\n", "replay.canary_rate"),
    ("gpu: {scrape_budget_s: 0}\n", "gpu.scrape_budget_s"),   # every scrape failed with budget_exceeded
    ("gpu: {pids: [-5]}\n", "gpu.pids[0]"),
    ("tracing: {otlp_endpoint: collector}\n", "tracing.otlp_endpoint"),
    ("analysis: {ingest_ttl_s: -1}\n", "analysis.ingest_ttl_s"),
    ("proxy: {max_model_labels: -1}\n", "proxy.max_model_labels"),
])
def test_bad_values_are_config_errors_naming_file_and_field(tmp_path, text, field):
    problems = "\n".join(_problems(tmp_path, text))
    assert f"s.yaml: {field}:" in problems, problems


@pytest.mark.unit
def test_a_nan_already_named_by_its_own_check_is_reported_once(tmp_path):
    problems = _problems(tmp_path, "sampling: {rate: .nan}\n")
    assert len([p for p in problems if "sampling.rate" in p]) == 1, problems


def test_readyz_says_not_ready_and_status_answers_while_draining():
    with Upstream() as up:
        sc = RunningSidecar(make_config(up.url, drain_timeout_s=5.0))
        with sc:
            result: dict = {}

            def slow() -> None:
                result["r"] = httpx.get(sc.url + "/slow?s=1.5", timeout=10)

            t = threading.Thread(target=slow)
            t.start()
            time.sleep(0.3)
            assert httpx.get(sc.admin_url + "/readyz").status_code == 200
            sc.loop.call_soon_threadsafe(sc.sc.request_stop)  # type: ignore[union-attr]
            deadline = time.monotonic() + 5
            while not sc.sc.ctx.draining and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.02)
            ready = httpx.get(sc.admin_url + "/readyz")
            status = httpx.get(sc.admin_url + "/status")
            t.join(10)
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert status.status_code == 200, status.text   # was 500: the closed listener has no sockets
        assert status.json()["draining"] is True and status.json()["listen"].endswith(f":{sc.port}")
        assert result["r"].status_code == 200   # the in-flight request still finished


def test_a_reuseport_listener_already_on_the_port_is_address_in_use():
    """With proxy.workers > 1 the listen socket uses SO_REUSEPORT; another daemon there must not be joined."""
    with socket.socket() as other:   # e.g. a second sentinel with proxy.workers: 2 on the same port
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cfg = dataclasses.replace(make_config("http://127.0.0.1:1", workers=2), listen=f"127.0.0.1:{port}")
        sc = Sidecar(cfg)

        async def start() -> None:
            try:
                await sc.start()
            finally:
                if sc.workers is not None:
                    await sc.stop()
                elif getattr(sc, "analysis", None) is not None:
                    await sc.analysis.stop()

        with pytest.raises(InfrastructureError, match=f"cannot listen on 127.0.0.1:{port}.*listen"):
            asyncio.run(start())


@pytest.mark.slow   # spawns an interpreter process
def test_two_workers_keep_one_model_label_cap():
    cap, n = 2, 24
    with Upstream() as up, RunningSidecar(make_config(up.url, workers=2, max_model_labels=cap)) as sc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ws = httpx.get(sc.admin_url + "/status").json()["proxy_workers"]
            if ws and all(w["ready"] for w in ws):
                break
            time.sleep(0.1)
        served = 0
        for i in range(n):   # a new connection each: both processes see hostile names
            with httpx.Client() as c:
                served += c.post(f"{sc.url}/v2/models/evil{i}/infer", content=b"{}").status_code == 200
        assert served == n
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            fams = list(sc.sc.metrics.registry.collect())  # type: ignore[union-attr]
            rows = [s for f in fams if f.name == "sentinel_requests" for s in f.samples
                    if s.name == "sentinel_requests_total" and s.labels["model"] not in ("digits",)]
            if sum(s.value for s in rows) >= n:
                break
            time.sleep(0.1)
        labels = {s.labels["model"] for s in rows}
        assert len(labels - {"other"}) <= cap, labels   # was up to 2 × cap
        assert sum(s.value for s in rows) == n   # every request counted once, under a name or `other`
        other = sum(s.value for s in rows if s.labels["model"] == "other")
        assert sc.value("sentinel_unmatched_path_overflow_total") == other
