"""Faults between the proxy and the analysis worker, in-process: the event loop never waits on the
worker, every sample is counted against its own model, no exception ends the worker, and a slow
sample does not make a working worker look hung."""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_worker_unit import GOOD, Pipe, messages, sample  # noqa: E402

from sentinel.config import AnalysisConfig, Config, ModelConfig  # noqa: E402
from sentinel.proxy import analysis, worker  # noqa: E402
from sentinel.proxy.metrics import ProxyMetrics  # noqa: E402
from sentinel.proxy.sampling import Sample  # noqa: E402

pytestmark = pytest.mark.unit

SAMPLES = "sentinel_samples_total"
REJECTIONS = "sentinel_sample_rejections_total"


@pytest.fixture
def manager():
    loop = asyncio.new_event_loop()
    cfg = Config(models=(ModelConfig(name="a", version="v1", protocol="v2"),
                         ModelConfig(name="b", version="v1", protocol="v2")))
    mgr = analysis.AnalysisManager(cfg, ProxyMetrics({"a": "a", "b": "b"}, 8), loop)
    yield mgr
    loop.close()


def value(mgr, name: str, labels: dict[str, str]) -> float:
    return mgr.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_half_written_result_does_not_hold_the_event_loop(manager):
    """A worker stopped (or not scheduled) halfway through writing a message larger than the pipe's
    buffer: the proxy's loop must not wait in recv() for the rest, or nothing (the supervisor that
    would kill that worker included) runs again."""
    import multiprocessing as mp

    mgr = manager
    r, w = mp.Pipe(duplex=False)
    mgr.results = getattr(analysis, "PipeReader", lambda c: c)(r)
    payload = pickle.dumps(("status", "a", {"big": "x" * 200_000}))
    frame = struct.pack("!i", len(payload)) + payload
    os.write(w.fileno(), frame[:1000])
    t = threading.Thread(target=mgr._on_readable, daemon=True)
    t.start()
    t.join(3.0)
    assert not t.is_alive(), "the event loop waited for the worker to finish writing"
    assert "a" not in mgr.statuses
    writer = threading.Thread(target=os.write, args=(w.fileno(), frame[1000:]), daemon=True)
    writer.start()   # the rest arrives later: the message is applied whole
    deadline = time.monotonic() + 10
    while "a" not in mgr.statuses and time.monotonic() < deadline:
        mgr._on_readable()
    writer.join(5)
    assert mgr.statuses["a"]["big"] == "x" * 200_000
    w.close()


class _Queue:
    broken = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)

    def close(self) -> None:
        pass


def test_samples_lost_with_the_worker_are_counted_against_their_own_model(manager):
    mgr = manager
    mgr.proc, mgr.samples_q = object(), _Queue()   # a worker that has started
    for model in ("a", "b", "a"):
        mgr.submit(Sample(model, "v2", {}, b"{}", {}, b"{}"))
    mgr._handle(("samples", "a", 2, {}, [], 8))    # both of a's samples reported...
    mgr._on_crash(-9)                              # ... then the worker dies holding b's
    assert value(mgr, REJECTIONS, {"model": "b", "reason": "worker_lost"}) == 1
    assert value(mgr, REJECTIONS, {"model": "a", "reason": "worker_lost"}) == 0
    assert value(mgr, SAMPLES, {"model": "a", "outcome": "decoded"}) == 2
    assert value(mgr, SAMPLES, {"model": "a", "outcome": "rejected"}) == 0
    assert value(mgr, SAMPLES, {"model": "b", "outcome": "rejected"}) == 1
    assert (mgr.outstanding, mgr.queued_bytes, mgr.depth()) == (0, 0, 0)


def config(timeout: float = 1.0, heartbeat: float = 1.0) -> Config:
    return Config(models=(ModelConfig(name="m", version="v1", protocol="v2"),),
                  analysis=AnalysisConfig(sample_timeout_s=timeout, heartbeat_s=heartbeat))


class _Raises:
    def __init__(self, where: str, exc: type[BaseException]):
        self.where, self.exc = where, exc

    def observe(self, batch):
        if self.where == "observe":
            raise self.exc("from observe")
        return []

    def status(self) -> dict:
        if self.where == "status":
            raise self.exc("from status")
        return {}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit])
@pytest.mark.parametrize("where", ["factory", "observe", "status", "decoder"])
def test_no_base_exception_of_a_sample_ends_the_worker(monkeypatch, where, exc):
    """`except Exception` lets KeyboardInterrupt, SystemExit, GeneratorExit through: one such sample
    ended the worker, and the same sample again ended the next one."""
    def factory(c, m):
        if where == "factory":
            raise exc("from the factory")
        return _Raises(where, exc)

    w = worker.Worker(config(), factory, Pipe())
    if where == "decoder":
        real = worker._imports()

        def decode_request(*a):
            raise exc("from a decoder")

        monkeypatch.setattr(worker, "_decoders", (real[0], real[1], decode_request, real[3]))
    for _ in range(2):
        try:
            w.handle(sample(GOOD))
        except BaseException as escaped:  # noqa: BLE001 - what would have ended the worker process
            pytest.fail(f"{type(escaped).__name__} escaped the worker's handling of a sample")
    w.flush()
    msgs = messages(w.results.sent)
    counted = [m for m in msgs if m[0] == "samples"]
    assert sum(m[2] for m in counted) == 2   # both answered: the worker went on
    if where == "decoder":
        assert [m[3] for m in counted] == [{worker.UNEXPECTED: 2}]
    else:
        assert exc.__name__ in {m[1] for m in msgs if m[0] == "error"}


class _Slow:
    """Takes most of the per-sample budget in observe() and again in status()."""

    def observe(self, batch):
        time.sleep(0.5)
        return []

    def status(self) -> dict:
        time.sleep(0.5)
        return {}


class _Stamped(Pipe):
    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def send(self, msg: tuple) -> None:
        super().send(msg)
        self.at.append(time.monotonic())


def test_a_slow_sample_does_not_leave_the_worker_silent_past_one_budget():
    """Each phase of a sample (decode, observe, status) has sample_timeout_s; the manager kills a
    worker silent for hang_timeout_s, which need only exceed sample_timeout_s + heartbeat_s. So
    the worker must speak between phases, or a slow but working worker is killed as hung."""
    cfg = config(timeout=0.7, heartbeat=0.2)
    hang_timeout = cfg.analysis.sample_timeout_s + cfg.analysis.heartbeat_s   # the least validate() allows
    w = worker.Worker(cfg, lambda c, m: _Slow(), _Stamped())
    w.last_sent = t0 = time.monotonic()
    w.handle(sample(GOOD))
    w.flush()
    stamps = [t0] + w.results.at
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) < hang_timeout, gaps
    (counted,) = [m for m in messages(w.results.sent) if m[0] == "samples"]
    assert counted[2] == 1 and not counted[3]


def test_the_slot_names_the_sample_being_handled_and_a_quarantined_one_is_not_handled():
    slot = bytearray(worker.SLOT_SIZE)
    seen: list = []

    class _Peek:
        def observe(self, batch):
            seen.append(worker.read_slot(slot))
            return []

        def status(self) -> dict:
            return {}

    w = worker.Worker(config(), lambda c, m: _Peek(), Pipe(), slot=slot)
    s = sample(GOOD)
    w.handle(s)
    assert seen == [(worker.fingerprint(s), "m")] and worker.read_slot(slot) is None
    q = worker.Worker(config(), lambda c, m: _Peek(), Pipe(), slot=slot, quarantine=frozenset([worker.fingerprint(s)]))
    q.handle(s)
    q.handle(sample(GOOD + b" "))
    q.flush()
    counted = [m for m in messages(q.results.sent) if m[0] == "samples"]
    assert sum(m[2] for m in counted) == 2 and [m[3] for m in counted if m[3]] == [{worker.QUARANTINED: 1}]
    assert len(seen) == 2   # the quarantined sample never reached the monitor


def test_a_worker_that_cannot_be_started_does_not_fail_the_request(manager):
    """proc.start() can fail (no memory to spawn, out of fds or processes): submit() runs on the
    request path, so it must drop the sample and retry later, not raise into the proxy."""
    mgr = manager

    class _NoProcess:
        def __init__(self, *a, **kw):
            raise OSError(11, "Resource temporarily unavailable")

    mgr._mp = type("Ctx", (), {"Pipe": staticmethod(mgr._mp.Pipe), "RawArray": staticmethod(mgr._mp.RawArray),
                               "Process": _NoProcess})()
    fds = 0
    for attempt in range(2):
        if attempt:
            mgr._restart_at = None   # as the supervisor does when the backoff is over
            fds = len(os.listdir("/proc/self/fd"))
        try:
            mgr.submit(Sample("a", "v2", {}, b"{}", {}, b"{}"))
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"submit() raised {exc!r} into the proxy")
    assert value(mgr, SAMPLES, {"model": "a", "outcome": "dropped"}) == 2
    assert mgr._restart_at is not None and mgr.proc is None   # retried by the supervisor, with backoff
    assert "worker_start" in mgr.state()["errors"]
    assert len(os.listdir("/proc/self/fd")) == fds   # the pipes made for it are closed
    mgr.stopping = True
    if mgr._supervisor is not None:
        mgr._supervisor.cancel()
        mgr.loop.run_until_complete(asyncio.gather(mgr._supervisor, return_exceptions=True))


def test_a_garbled_frame_length_is_counted_not_raised():
    """A frame length below -1 sent the reader's position backwards and struct.error escaped into
    the event loop's reader callback."""
    from multiprocessing import Pipe

    r, w = Pipe(duplex=False)
    reader = analysis.PipeReader(r)
    good = pickle.dumps(("heartbeat",))
    os.write(w.fileno(), struct.pack("!i", len(good)) + good + struct.pack("!i", -7) + b"junk")
    reader.read(None)
    msgs = list(reader.messages())
    assert msgs[0] == ("heartbeat",)
    assert msgs[1][:2] == ("error", "bad_result") and len(msgs) == 2
    assert not reader.buf   # the garbled rest is dropped, not re-read forever
    reader.close()
    w.close()


def test_only_a_death_the_worker_caused_itself_blames_its_sample():
    """SIGKILL (the OOM killer, an operator) and the hang watchdog land on whatever sample is being
    handled: blaming it put identical requests (a probe repeating one body) in quarantine for good."""
    import signal

    blame = analysis._self_inflicted
    assert blame(3, None) and blame(-signal.SIGSEGV, None) and blame(-signal.SIGABRT, None)
    assert not blame(-signal.SIGKILL, None) and not blame(-signal.SIGTERM, None)
    assert not blame(None, analysis.RESTART_HUNG) and not blame(0, None)
