"""Poison samples against a running sidecar: the analysis worker rejects them and keeps going.

Each case goes through the real proxy over loopback HTTP into the spawned worker; after each,
the proxy serves a normal request and a normal sample is decoded again.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))   # proxy_helpers
from proxy_helpers import RunningSidecar, Upstream, make_config  # noqa: E402
from worker_monitors import BLOCK_MARKER, EXIT_MARKER, SLEEP_MARKER  # noqa: E402

from sentinel import metricnames as mn  # noqa: E402
from sentinel.protocols import oip_v2  # noqa: E402

pytestmark = pytest.mark.slow

SAMPLES = mn.SAMPLES.sample_name
REJECTIONS = mn.SAMPLE_REJECTIONS.sample_name
RESTARTS = mn.ANALYSIS_RESTARTS.sample_name
INFER = "/v2/models/digits/infer"
NORMAL = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
POISON = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[%d,0]}]}' % int(EXIT_MARKER)
# Short budgets so the test runs in seconds; the defaults are in sentinel/config.py.
SAMPLE_TIMEOUT_S = 1.0
HANG_TIMEOUT_S = 3.0
RESTART_WITHIN_S = HANG_TIMEOUT_S + 0.25 + 5.0 + 30.0   # silence + supervisor tick + backoff + spawn on a busy host


def png(width: int, height: int, *, palette: bool) -> bytes:
    """A 1-bit PNG of zeros: a few KB on the wire, width×height pixels once decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    color_type = 3 if palette else 0
    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, color_type, 0, 0, 0))
    plte = chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") if palette else b""
    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + head + plte + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def sidecar():
    with Upstream() as up:
        cfg = make_config(up.url, rate=1.0)
        cfg = dataclasses.replace(cfg, analysis=dataclasses.replace(
            cfg.analysis, sample_timeout_s=SAMPLE_TIMEOUT_S, heartbeat_s=0.2, hang_timeout_s=HANG_TIMEOUT_S,
            worker_start_timeout_s=60.0, worker_memory_limit_bytes=768 << 20,
            # a 3 s hang timeout on a busy test machine must not hinge on the scheduler's priorities
            worker_nice=0))
        with RunningSidecar(cfg, "worker_monitors:hanging") as sc:
            yield sc


def decoded_again(sc: RunningSidecar, timeout: float) -> float:
    """Send normal requests until one more sample is decoded; the seconds it took."""
    t0 = time.monotonic()
    before = sc.value(SAMPLES, {"model": "digits", "outcome": "decoded"})
    with httpx.Client(base_url=sc.url, timeout=10) as c:
        while time.monotonic() - t0 < timeout:
            assert c.post(INFER, content=NORMAL).status_code == 200   # the proxy never stops serving
            if sc.wait_for(SAMPLES, {"model": "digits", "outcome": "decoded"}, before + 1, timeout=1.0) > before:
                return time.monotonic() - t0
    raise AssertionError(f"no sample decoded within {timeout} s")


def restarts(sc: RunningSidecar) -> float:
    return sum(sc.value(RESTARTS, {"reason": r}) for r in ("exit", "killed", "hung"))


def rejected(sc: RunningSidecar) -> float:
    return sc.value(SAMPLES, {"model": "digits", "outcome": "rejected"})


def poison(sc: RunningSidecar, body: bytes, headers: dict | None = None, *, must_reject: bool = True) -> None:
    """Send one poison request; it is proxied normally, its sample is rejected, the worker lives."""
    decoded_again(sc, 60)   # the worker is up and has built its monitor
    pid, r0, n0 = sc.sc.analysis.proc.pid, restarts(sc), rejected(sc)
    d0 = sc.value(SAMPLES, {"model": "digits", "outcome": "decoded"})
    assert httpx.post(sc.url + INFER, content=body, headers=headers or {}, timeout=10).status_code == 200
    deadline = time.monotonic() + 30
    while rejected(sc) == n0 and (must_reject or sc.value(SAMPLES, {"model": "digits", "outcome": "decoded"}) == d0):
        assert time.monotonic() < deadline, "the poison sample was never accounted for"
        time.sleep(0.05)
    assert rejected(sc) <= n0 + 1
    decoded_again(sc, 10)
    assert restarts(sc) == r0 and sc.sc.analysis.proc.pid == pid   # rejected inside the same worker


def test_worker_runs_at_lower_cpu_priority_than_the_proxy():
    """analysis.worker_nice (off by default): on a contended core the kernel runs the proxy first;
    analysis.worker_scheduling: batch gives the worker SCHED_BATCH (its wake-ups do not preempt)."""
    with Upstream() as up:
        cfg = make_config(up.url, rate=1.0)
        assert cfg.analysis.worker_nice == 0
        cfg = dataclasses.replace(cfg, analysis=dataclasses.replace(cfg.analysis, worker_nice=10,
                                                                    worker_scheduling="batch"))
        with RunningSidecar(cfg) as sc:
            decoded_again(sc, 60)
            proxy_nice = os.getpriority(os.PRIO_PROCESS, os.getpid())
            worker_nice = os.getpriority(os.PRIO_PROCESS, sc.sc.analysis.proc.pid)
            assert worker_nice == min(19, proxy_nice + 10) > proxy_nice
            assert os.sched_getscheduler(sc.sc.analysis.proc.pid) == os.SCHED_BATCH
            assert os.sched_getscheduler(0) == os.SCHED_OTHER   # the proxy keeps normal scheduling


def test_json_nested_deeper_than_the_stack(sidecar):
    deep = b"[" * 5000 + b"]" * 5000
    poison(sidecar, b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":' + deep + b"}]}")


@pytest.mark.parametrize("shape", ["[0,1000000000000,1000000000000]", "[0,10000000000000000000000]"])
def test_shape_with_a_zero_and_a_huge_dimension(sidecar, shape):
    poison(sidecar, b'{"inputs":[{"name":"x","shape":%s,"datatype":"FP32","data":[]}]}' % shape.encode())


def test_empty_batch_with_a_huge_dimension(sidecar):
    # [0, 10**12] is a valid empty array in numpy; decoders may accept or refuse it, never die on it
    poison(sidecar, b'{"inputs":[{"name":"x","shape":[0,1000000000000],"datatype":"FP32","data":[]}]}',
           must_reject=False)


def test_huge_bitmap_in_a_small_png(sidecar):
    image = png(13000, 13000, palette=True)
    assert len(image) < 64 * 1024
    body, headers = oip_v2.encode([("image", np.array([image], dtype=object))])
    poison(sidecar, body, headers)


def test_every_rejection_has_a_reason(sidecar):
    by_reason = sum(s.value for m in sidecar.sc.metrics.registry.collect() if m.name == mn.SAMPLE_REJECTIONS.name
                    for s in m.samples if s.name == REJECTIONS)
    assert by_reason == rejected(sidecar) >= 4


def test_analysis_that_sleeps_hits_the_per_sample_budget(sidecar):
    decoded_again(sidecar, 60)
    pid, r0 = sidecar.sc.analysis.proc.pid, restarts(sidecar)
    body = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[%d,0]}]}' % int(SLEEP_MARKER)
    t0 = time.monotonic()
    assert httpx.post(sidecar.url + INFER, content=body, timeout=10).status_code == 200
    assert sidecar.wait_for(mn.ANALYSIS_ERRORS.sample_name, {"kind": "timeout"}, 1, timeout=30) == 1
    assert time.monotonic() - t0 >= SAMPLE_TIMEOUT_S * 0.9
    decoded_again(sidecar, 10)
    assert restarts(sidecar) == r0 and sidecar.sc.analysis.proc.pid == pid   # the alarm sufficed


def test_analysis_stuck_past_the_alarm_is_killed_and_restarted(sidecar):
    decoded_again(sidecar, 60)
    old = sidecar.sc.analysis.proc.pid
    lost0 = sidecar.value(REJECTIONS, {"model": "digits", "reason": "worker_lost"})
    body = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[%d,0]}]}' % int(BLOCK_MARKER)
    assert httpx.post(sidecar.url + INFER, content=body, timeout=10).status_code == 200
    assert sidecar.wait_for(RESTARTS, {"reason": "hung"}, 1, timeout=RESTART_WITHIN_S) == 1
    assert sidecar.value(REJECTIONS, {"model": "digits", "reason": "worker_lost"}) == lost0 + 1   # the stuck one
    decoded_again(sidecar, RESTART_WITHIN_S)
    assert sidecar.sc.analysis.proc.pid != old


def test_sigstopped_worker_is_killed_and_restarted(sidecar):
    decoded_again(sidecar, 60)
    old = sidecar.sc.analysis.proc.pid
    hung0 = sidecar.value(RESTARTS, {"reason": "hung"})
    os.kill(old, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with httpx.Client(base_url=sidecar.url, timeout=10) as c:
            for _ in range(3):   # queued to the stopped worker; the proxy does not wait for it
                assert c.post(INFER, content=NORMAL).status_code == 200
        assert sidecar.wait_for(RESTARTS, {"reason": "hung"}, hung0 + 1, timeout=RESTART_WITHIN_S) == hung0 + 1
        assert time.monotonic() - t0 >= HANG_TIMEOUT_S * 0.9
        decoded_again(sidecar, RESTART_WITHIN_S)
        assert sidecar.sc.analysis.proc.pid != old
        state = httpx.get(sidecar.admin_url + "/status").json()["analysis"]
        assert state["worker_alive"] and state["last_message_age_s"] < HANG_TIMEOUT_S
        assert state["errors"]["worker_hung"].endswith("killed")
    finally:
        try:
            os.kill(old, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_sample_that_ends_the_worker_twice_is_quarantined():
    """A sample that ends the worker (os._exit, a segfault in a C extension) sent again and again:
    after the second worker it ends, identical samples are quarantined, not handed to worker after
    worker, and the sidecar says so."""
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
            assert restarts(sc) == 2   # not one per poison sample
            assert sc.value(REJECTIONS, {"model": "digits", "reason": "worker_lost"}) == 2
            assert sc.value(REJECTIONS, {"model": "digits", "reason": "quarantined"}) == 2
            state = httpx.get(sc.admin_url + "/status").json()["analysis"]
            assert state["quarantined"] == 1 and "quarantined" in state["errors"]["worker_exit"]
            d0 = sc.value(SAMPLES, {"model": "digits", "outcome": "decoded"})
            assert serve(NORMAL)   # anything else is still analysed
            assert sc.value(SAMPLES, {"model": "digits", "outcome": "decoded"}) == d0 + 1
