"""Bounds on the analysis worker path, against a real spawned worker over real pipes.

A monitor returning a flood of metric updates (or updates with huge labels) must not stall the
proxy's event loop nor grow its registry: the excess is dropped, counted in
sentinel_analysis_errors_total{kind} and logged once, and what is kept is applied a slice per
loop iteration. A worker writing a result frame over the proxy's cap is restarted without the
frame being read. A large sample is handed to the worker without being copied on the loop.

The monitor factory below is imported by the spawned worker (`test_analysis_bounds:bounded`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pickle
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from sentinel import metricnames as mn
from sentinel.config import AnalysisConfig, Config, ModelConfig, SamplingConfig
from sentinel.protocols import oip_v2
from sentinel.proxy import analysis, worker
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.sampling import Sample

FACTORY = "test_analysis_bounds:bounded"
ERRORS = mn.ANALYSIS_ERRORS.sample_name
SAMPLES = mn.SAMPLES.sample_name
CONFIDENCE_COUNT = mn.PREDICTION_CONFIDENCE.name + "_count"
PREDICTIONS = mn.PREDICTIONS.sample_name

# First input value of a sample → what the monitor does with it.
FLOOD = 5151.0        # 200,000 updates from one sample
HUGE_LABEL = 5252.0   # one normal update, one with an 8 MiB label value, one with 1000 labels
OVERSIZE = 5353.0     # write a result frame over the proxy's cap straight into the results pipe
FLOOD_UPDATES = 200_000
HUGE = 8 << 20

# The bounds under test, with the values this change introduces (read from the modules when there).
PER_SAMPLE = getattr(worker, "MAX_UPDATES_PER_SAMPLE", 16_384)
PER_WAKEUP = getattr(analysis, "APPLY_PER_WAKEUP", 500)
MAX_PENDING = getattr(analysis, "MAX_PENDING_UPDATES", 50_000)
MAX_RESULT = getattr(analysis, "MAX_RESULT_BYTES", 1 << 20)

RESPONSE = b'{"outputs":[{"name":"y","shape":[1,3],"datatype":"FP32","data":[0.1,2.0,-1.0]}]}'
JSON = {"content-type": "application/json"}


# --- the monitor (runs in the spawned worker) -------------------------------------------------
class _Bounded:
    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    def observe(self, batch: Any) -> list:
        from sentinel.analysis.contract import MetricUpdate

        x = np.asarray(batch.inputs)
        first = float(x.flat[0])
        model = {"model": "m"}
        if first == FLOOD:
            return [MetricUpdate(mn.PREDICTION_CONFIDENCE.name, model, "observe", 0.5)] * FLOOD_UPDATES
        if first == HUGE_LABEL:
            return [MetricUpdate(mn.PREDICTIONS.name, {"model": "m", "class": "1"}, "inc", 1.0),
                    MetricUpdate(mn.PREDICTIONS.name, {"model": "m", "class": "x" * HUGE}, "inc", 1.0),
                    MetricUpdate(mn.PREDICTIONS.name, {f"l{i}": "v" for i in range(1000)}, "inc", 1.0)]
        if first == OVERSIZE:
            import gc

            (w,) = [o for o in gc.get_objects() if type(o).__name__ == "Worker" and hasattr(o, "results")]
            w.results.send_bytes(b"\0" * (MAX_RESULT + 1))   # blocks once the proxy stops reading; killed
            return []
        if x.size > 2:   # the large sample: what arrived, for the test to compare
            self.last = {"shape": list(x.shape),
                         "sha256": hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()}
        return [MetricUpdate(mn.PREDICTION_CONFIDENCE.name, model, "observe", 0.5)]

    def status(self) -> dict:
        return dict(self.last)


def bounded(config: Any, model_config: Any) -> _Bounded:
    return _Bounded()


# --- helpers ---------------------------------------------------------------------------------
def v2_body(first: float, n: int = 2) -> tuple[bytes, dict[str, str]]:
    x = np.zeros((1, n), dtype=np.float32)
    x[0, 0] = first
    body, headers = oip_v2.encode([("x", x)], binary=False)
    return body, {**JSON, **headers}


def sample(first: float) -> Sample:
    body, headers = v2_body(first)
    return Sample("m", "v2", headers, body, JSON, RESPONSE)


def config(**analysis_fields: Any) -> Config:
    acfg = AnalysisConfig(**{"queue_max_bytes": 256 << 20, **analysis_fields})
    return Config(models=(ModelConfig(name="m", version="v1", protocol="v2"),), analysis=acfg,
                  sampling=SamplingConfig(max_bytes=128 << 20))


class Harness:
    """A manager on its own event loop, with a real worker; counts metric updates per loop iteration."""

    def __init__(self, cfg: Config | None = None):
        self.loop = asyncio.new_event_loop()
        self.mgr = analysis.AnalysisManager(cfg or config(), ProxyMetrics({"m": "m"}, 8), self.loop, FACTORY)
        self.applied = 0          # metric updates applied in the current loop iteration
        self.per_iteration: list[int] = []
        real = self.mgr.metrics.apply

        def counting(*a: Any) -> None:
            self.applied += 1
            real(*a)

        self.mgr.metrics.apply = counting   # type: ignore[method-assign]

    def value(self, name: str, labels: dict[str, str]) -> float:
        return self.mgr.metrics.registry.get_sample_value(name, labels) or 0.0

    def run_until(self, cond: Callable[[], bool], timeout: float = 60.0) -> None:
        """Run the loop (a call_soon ticker records the updates applied in each iteration) until `cond`."""
        async def go() -> None:
            stop = False

            def tick() -> None:
                self.per_iteration.append(self.applied)
                self.applied = 0
                if not stop:
                    self.loop.call_soon(tick)

            self.loop.call_soon(tick)
            deadline = time.monotonic() + timeout
            try:
                while not cond():
                    assert time.monotonic() < deadline, "timed out"
                    await asyncio.sleep(0.01)
            finally:
                stop = True
                await asyncio.sleep(0)

        self.loop.run_until_complete(go())

    def settled(self) -> bool:
        """The worker has reported everything and no update waits to be applied."""
        return self.mgr.outstanding == 0 and not getattr(self.mgr, "_pending", ())

    def close(self) -> None:
        mgr = self.mgr
        self.loop.run_until_complete(mgr.stop())
        if mgr._supervisor is not None:
            self.loop.run_until_complete(asyncio.gather(mgr._supervisor, return_exceptions=True))
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def start(h: Harness) -> None:
    """Start the worker with one normal sample and wait for its report."""
    h.mgr.submit(sample(1.0))
    h.run_until(lambda: h.value(SAMPLES, {"model": "m", "outcome": "decoded"}) == 1 and h.settled())


# --- tests ---------------------------------------------------------------------------------------
def test_a_flood_of_updates_from_one_sample_is_capped_counted_and_applied_a_slice_per_iteration(harness, caplog):
    h = harness
    start(h)
    before = h.value(CONFIDENCE_COUNT, {"model": "m"})
    h.per_iteration.clear()
    with caplog.at_level(logging.WARNING, logger="sentinel.analysis"):
        for _ in range(2):
            h.mgr.submit(sample(FLOOD))
        h.run_until(lambda: h.value(SAMPLES, {"model": "m", "outcome": "decoded"}) == 3 and h.settled())
    assert h.value(CONFIDENCE_COUNT, {"model": "m"}) - before == 2 * PER_SAMPLE
    assert h.value(ERRORS, {"kind": "too_many_updates"}) == 2 * (FLOOD_UPDATES - PER_SAMPLE)
    assert "MAX_UPDATES_PER_SAMPLE" in h.mgr.state()["errors"]["too_many_updates"]
    logged = [r for r in caplog.records if "too_many_updates" in r.getMessage()]
    assert len(logged) == 1   # once, however often
    # the loop went on between slices: never more than a slice (and a leftover one) in one iteration
    assert max(h.per_iteration) <= 2 * PER_WAKEUP, max(h.per_iteration)
    assert sum(1 for n in h.per_iteration if n) >= 2 * PER_SAMPLE // (2 * PER_WAKEUP)
    # the worker went on: a normal sample after the flood is analysed
    h.mgr.submit(sample(1.0))
    h.run_until(lambda: h.value(SAMPLES, {"model": "m", "outcome": "decoded"}) == 4 and h.settled())
    assert h.mgr.restarts == 0


def test_an_update_with_a_huge_label_is_dropped_whole_and_counted(harness):
    h = harness
    start(h)
    h.mgr.submit(sample(HUGE_LABEL))
    h.run_until(lambda: h.value(SAMPLES, {"model": "m", "outcome": "decoded"}) == 2 and h.settled())
    assert h.value(PREDICTIONS, {"model": "m", "class": "1"}) == 1
    series = [s for metric in h.mgr.metrics.registry.collect() for s in metric.samples
              if s.name == PREDICTIONS]
    assert all(len(v) <= 256 for s in series for v in s.labels.values()), "a huge label became a series"
    assert len(series) == 1
    assert h.value(ERRORS, {"kind": "update_too_large"}) == 2
    assert h.value(ERRORS, {"kind": "bad_update"}) == 0


def test_a_result_frame_over_the_cap_is_not_read_and_the_worker_is_restarted(harness):
    h = harness
    start(h)
    pid = h.mgr.proc.pid
    h.mgr.submit(sample(OVERSIZE))
    h.run_until(lambda: h.mgr.restarts == 1 or h.value(ERRORS, {"kind": "bad_result"}) > 0, timeout=60)
    assert h.value(ERRORS, {"kind": "result_too_large"}) == 1
    assert h.value(mn.ANALYSIS_RESTARTS.sample_name, {"reason": "bad_result"}) == 1
    # the sample it was handling is counted, not vanished; and not blamed (no quarantine)
    assert h.value(mn.SAMPLE_REJECTIONS.sample_name, {"model": "m", "reason": "worker_lost"}) == 1
    assert not h.mgr.suspects and not h.mgr.quarantine
    assert (h.mgr.outstanding, h.mgr.queued_bytes) == (0, 0)
    # a new worker takes the next sample
    h.run_until(lambda: h.mgr.proc is not None, timeout=30)
    assert h.mgr.proc.pid != pid
    h.mgr.submit(sample(1.0))
    h.run_until(lambda: h.value(SAMPLES, {"model": "m", "outcome": "decoded"}) == 2 and h.settled())


def test_the_proxy_bounds_and_slices_updates_even_from_a_worker_that_did_not(harness):
    """What arrives over the pipe is bounded again in the proxy: a message with more updates than the
    backlog holds keeps MAX_PENDING_UPDATES, and they are applied a slice per loop iteration."""
    h = harness
    mgr = h.mgr
    r, w = os.pipe()
    from multiprocessing.connection import Connection

    mgr.results = analysis.PipeReader(Connection(r, writable=False)) if hasattr(analysis, "PipeReader") else None
    mgr.loop.add_reader(r, mgr._on_readable)
    mgr.outstanding, mgr.queued_bytes = 1, 10
    mgr._inflight["m"] = 1
    n = MAX_PENDING + 20_000
    big = [(mn.PREDICTION_CONFIDENCE.name, {"model": "m"}, "observe", 0.5)] * n
    huge = [(mn.PREDICTIONS.name, {"model": "m", "class": "y" * 100_000}, "inc", 1.0)]
    frames = b"".join(struct.pack("!i", len(p)) + p for p in (
        pickle.dumps(("samples", "m", 1, {}, big, 10), protocol=pickle.HIGHEST_PROTOCOL),
        pickle.dumps(("sample", "m", "decoded", None, huge, 0), protocol=pickle.HIGHEST_PROTOCOL)))
    assert len(frames) < MAX_RESULT
    writer = threading.Thread(target=lambda: (os.write(w, frames), os.close(w)), daemon=True)
    writer.start()
    try:
        h.run_until(lambda: mgr.metrics.registry.get_sample_value(SAMPLES, {"model": "m", "outcome": "decoded"}) == 2
                    and not getattr(mgr, "_pending", ()), timeout=60)
    finally:
        writer.join(10)
        mgr.loop.remove_reader(r)
        if mgr.results is not None:
            mgr.results.close()
            mgr.results = None
    assert h.value(CONFIDENCE_COUNT, {"model": "m"}) == MAX_PENDING
    assert h.value(ERRORS, {"kind": "too_many_updates"}) == n - MAX_PENDING
    assert h.value(ERRORS, {"kind": "update_too_large"}) == 1
    assert h.value(PREDICTIONS, {"model": "m", "class": "y" * 100_000}) == 0
    assert (mgr.outstanding, mgr.queued_bytes) == (0, 0)   # the accounting went through at once
    assert max(h.per_iteration) <= 2 * PER_WAKEUP, max(h.per_iteration)


def test_a_large_sample_reaches_the_worker_intact_without_a_copy_on_the_event_loop(harness):
    h = harness
    start(h)
    n = 12 << 20   # 48 MiB of FP32, in the binary extension
    x = (np.arange(n, dtype=np.float32) % 997).reshape(1, n)
    x[0, 0] = 7.0
    body, headers = oip_v2.encode([("x", x)], binary=True)
    big = Sample("m", "v2", headers, body, JSON, RESPONSE)
    size = len(body) + len(RESPONSE)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        h.mgr.submit(big)
        took = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"submit() of a {len(body) >> 20} MiB sample: {took * 1e3:.2f} ms, {peak} bytes allocated at peak")
    assert peak < 1 << 20, f"submit() allocated {peak} bytes for a {len(body)}-byte sample (a copy)"
    assert h.value(SAMPLES, {"model": "m", "outcome": "queued"}) == 2
    assert (h.mgr.outstanding, h.mgr.queued_bytes) == (1, size)
    h.run_until(lambda: h.value(SAMPLES, {"model": "m", "outcome": "decoded"}) == 2 and h.settled())
    expected = hashlib.sha256(x.tobytes()).hexdigest()
    deadline = time.monotonic() + 30   # a status goes out at most once a second: small samples fetch it
    while h.mgr.statuses.get("m", {}).get("sha256") != expected:
        assert time.monotonic() < deadline, h.mgr.statuses.get("m")
        h.mgr.submit(sample(1.0))
        h.run_until(h.settled)
        pause = time.monotonic() + 0.3
        h.run_until(lambda: time.monotonic() > pause)   # noqa: B023 - used at once
    assert h.mgr.statuses["m"]["shape"] == [1, n]
    assert h.mgr.restarts == 0 and h.value(ERRORS, {"kind": "bad_result"}) == 0
