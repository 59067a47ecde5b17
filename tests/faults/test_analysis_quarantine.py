"""A sample that ends the worker (os._exit, a segfault in a C extension) sent again and again:
after the second worker it ends, identical samples are quarantined, not handed to worker after
worker, and the sidecar says so."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))   # proxy_helpers
from proxy_helpers import RunningSidecar, Upstream, make_config  # noqa: E402
from worker_monitors import EXIT_MARKER  # noqa: E402

from sentinel import metricnames as mn  # noqa: E402

pytestmark = pytest.mark.slow

SAMPLES = mn.SAMPLES.sample_name
REJECTIONS = mn.SAMPLE_REJECTIONS.sample_name
RESTARTS = mn.ANALYSIS_RESTARTS.sample_name
INFER = "/v2/models/digits/infer"
NORMAL = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
POISON = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[%d,0]}]}' % int(EXIT_MARKER)


def test_a_sample_that_ends_the_worker_twice_is_quarantined():
    with Upstream() as up:
        cfg = make_config(up.url, rate=1.0)
        cfg = dataclasses.replace(cfg, analysis=dataclasses.replace(
            cfg.analysis, heartbeat_s=0.2, worker_start_timeout_s=60.0, worker_nice=0))
        with RunningSidecar(cfg, "worker_monitors:hanging") as sc, httpx.Client(base_url=sc.url, timeout=10) as c:
            def accounted() -> float:
                return sum(sc.value(SAMPLES, {"model": "digits", "outcome": o}) for o in ("decoded", "rejected"))

            def serve(body: bytes) -> bool:
                """Send it; wait until its sample is accounted for (False: dropped, no worker up)."""
                before, dropped = accounted(), sc.value(SAMPLES, {"model": "digits", "outcome": "dropped"})
                t0 = time.monotonic()
                assert c.post(INFER, content=body).status_code == 200   # the proxy serves throughout
                while accounted() < before + 1:
                    if sc.value(SAMPLES, {"model": "digits", "outcome": "dropped"}) > dropped:
                        return False
                    assert time.monotonic() - t0 < 60, "a sample was never accounted for"
                    time.sleep(0.05)
                return True

            for _ in range(4):
                t0 = time.monotonic()
                while not serve(NORMAL):   # a worker is up
                    assert time.monotonic() - t0 < 60, "no worker came back"
                    time.sleep(0.1)
                assert serve(POISON)
            restarts = sum(sc.value(RESTARTS, {"reason": r}) for r in ("exit", "killed", "hung"))
            assert restarts == 2   # not one per poison sample
            assert sc.value(REJECTIONS, {"model": "digits", "reason": "worker_lost"}) == 2
            assert sc.value(REJECTIONS, {"model": "digits", "reason": "quarantined"}) == 2
            state = httpx.get(sc.admin_url + "/status").json()["analysis"]
            assert state["quarantined"] == 1 and "quarantined" in state["errors"]["worker_exit"]
            d0 = sc.value(SAMPLES, {"model": "digits", "outcome": "decoded"})
            assert serve(NORMAL)   # anything else is still analysed
            assert sc.value(SAMPLES, {"model": "digits", "outcome": "decoded"}) == d0 + 1
