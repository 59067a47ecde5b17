"""The worker's per-sample handling in-process: every exception becomes a reason, the budget holds."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from sentinel import metricnames as mn
from sentinel.config import AnalysisConfig, Config, ModelConfig
from sentinel.proxy import worker
from sentinel.proxy.builtin_monitor import build_builtin
from sentinel.proxy.sampling import Sample

pytestmark = pytest.mark.unit

RESPONSE = b'{"outputs":[{"name":"logits","shape":[1,3],"datatype":"FP32","data":[0.1,2.0,-1.0]}]}'


class Pipe:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, msg: tuple) -> None:
        self.sent.append(msg)


def config(timeout: float = 0.5) -> Config:
    return Config(models=(ModelConfig(name="m", version="v1", protocol="v2"),),
                  analysis=AnalysisConfig(sample_timeout_s=timeout))


def sample(body: bytes, response: bytes = RESPONSE) -> Sample:
    return Sample("m", "v2", {"content-type": "application/json"}, body, {"content-type": "application/json"},
                  response)


def messages(sent: list[tuple]) -> list[tuple]:
    """The messages written, with batches unwrapped."""
    out: list[tuple] = []
    for m in sent:
        out.extend(m[1] if m[0] == "batch" else [m])
    return out


def outcome(w: worker.Worker, body: bytes, response: bytes = RESPONSE) -> tuple:
    w.results.sent.clear()
    w.handle(sample(body, response))
    w.flush()
    msgs = messages(w.results.sent)
    counted = [m for m in msgs if m[0] == "samples"]
    assert len(counted) == 1 and counted[0][2] == 1   # exactly one answer per sample, whatever happened
    rejected = counted[0][3]
    assert sum(rejected.values()) <= 1
    why = next(iter(rejected), None)
    return "rejected" if why else "decoded", why, [m for m in msgs if m[0] == "error"]


def test_poison_payloads_are_rejected_with_a_reason():
    w = worker.Worker(config(), build_builtin, Pipe())
    deep = b"[" * 100_000 + b"]" * 100_000
    cases = {
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":' + deep + b"}]}": None,
        b'{"inputs":[{"name":"x","shape":[0,1000000000000,1000000000000],"datatype":"FP32","data":[]}]}': None,
        b'{"inputs":[{"name":"x","shape":[0,10000000000000000000000],"datatype":"FP32","data":[]}]}': None,
        b"{oops": "malformed_json",
    }
    for body, reason in cases.items():
        got, why, _ = outcome(w, body)
        assert got == "rejected" and why, body[:60]
        assert reason is None or why == reason
    assert outcome(w, b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}')[:2] == ("decoded", None)


def test_reasons_of_escaped_exceptions():
    from sentinel.protocols import DecodeError

    assert worker.reject_reason(DecodeError("bad_shape", "x")) == "bad_shape"
    assert worker.reject_reason(RecursionError()) == worker.TOO_DEEP
    assert worker.reject_reason(MemoryError()) == worker.OUT_OF_MEMORY
    assert worker.reject_reason(KeyError(3)) == worker.UNEXPECTED
    assert worker.reject_reason(ZeroDivisionError()) == worker.UNEXPECTED


class _Monitor:
    def __init__(self, behaviour: str):
        self.behaviour = behaviour

    def observe(self, batch):
        if self.behaviour == "loop":
            while True:
                pass
        if self.behaviour == "swallow":   # a monitor's own except Exception must not eat the timeout
            try:
                time.sleep(60)
            except Exception:  # noqa: BLE001
                return []
        raise MemoryError("pretend")

    def status(self) -> dict:
        return {}


@pytest.mark.parametrize("behaviour", ["loop", "swallow"])
def test_budget_breaks_an_endless_monitor(behaviour):
    w = worker.Worker(config(0.3), lambda c, m: _Monitor(behaviour), Pipe())
    t0 = time.monotonic()
    got, why, errors = outcome(w, b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}')
    assert 0.25 < time.monotonic() - t0 < 5
    assert got == "decoded" and [e[1] for e in errors] == ["timeout"]
    assert not w.budget.active


def test_monitor_memory_error_is_reported_not_fatal():
    w = worker.Worker(config(), lambda c, m: _Monitor("oom"), Pipe())
    _, _, errors = outcome(w, b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}')
    assert [e[1] for e in errors] == ["MemoryError"]


def test_memory_limit_turns_a_huge_allocation_into_memory_error():
    code = ("from sentinel.proxy.worker import limit_memory\n"
            "limit_memory(512 << 20)\n"
            "import numpy as np\n"
            "try:\n    np.ones(1 << 30)\nexcept MemoryError:\n    print('MemoryError')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "MemoryError", r.stderr


def test_config_validates_the_timeouts():
    problems = dict(AnalysisConfig(sample_timeout_s=40, hang_timeout_s=30).validate())
    assert "hang_timeout_s" in problems
    assert not dict(AnalysisConfig().validate())


GOOD = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'


def test_results_of_several_samples_go_out_in_one_write_with_counters_summed():
    w = worker.Worker(config(), build_builtin, Pipe())
    for body in [GOOD] * 5 + [b"{oops"]:
        w.handle(sample(body))
    assert [m[0] for m in w.results.sent] == ["busy"]   # building the monitor is said at once; the rest waits
    w.results.sent.clear()
    w.flush()
    assert len(w.results.sent) == 1                     # one write for all six
    msgs = messages(w.results.sent)
    (counted,) = [m for m in msgs if m[0] == "samples"]
    _, model, n, rejected, updates, size = counted
    assert (model, n, rejected) == ("m", 6, {"malformed_json": 1})
    assert size == 5 * (len(GOOD) + len(RESPONSE)) + len(b"{oops") + len(RESPONSE)
    preds = [u for u in updates if u[0] == mn.PREDICTIONS.name]
    assert preds == [(mn.PREDICTIONS.name, {"model": "m", "class": "1"}, "inc", 6.0)]   # summed
    conf = [u for u in updates if u[2] == "observe"]
    assert len(conf) == 6 and all(0.5 < u[3] < 1 for u in conf)   # one observation per sample, kept
    assert [m[0] for m in msgs if m[0] == "status"] == ["status"]
    w.flush()
    assert len(w.results.sent) == 1   # nothing left to write


def test_main_loop_drains_waiting_samples_into_few_writes():
    import multiprocessing as mp
    import signal

    from sentinel.proxy.builtin_monitor import BuiltinMonitor  # noqa: F401 - imported before timing

    cfg = Config(models=(ModelConfig(name="m", version="v1", protocol="v2"),),
                 analysis=AnalysisConfig(sample_timeout_s=0, worker_memory_limit_bytes=0))
    s_r, s_w = mp.Pipe(duplex=False)
    r_r, r_w = mp.Pipe(duplex=False)
    for _ in range(20):
        s_w.send(sample(GOOD))
    s_w.send(None)
    old = signal.getsignal(signal.SIGINT)
    try:
        worker.main(cfg, "sentinel.proxy.builtin_monitor:build_builtin", s_r, r_w)
    finally:
        signal.signal(signal.SIGINT, old)
    writes = []
    while r_r.poll(0):
        writes.append(r_r.recv())
    assert writes[0] == ("heartbeat",)
    counted = [m for m in messages(writes) if m[0] == "samples"]
    assert sum(m[2] for m in counted) == 20 and not any(m[3] for m in counted)
    assert len(writes) <= 6   # 20 waiting samples: a handful of writes, not one per sample


class _Slow:
    def observe(self, batch):
        time.sleep(0.05)
        return []

    def status(self) -> dict:
        return {}


class _Samples:
    """Always another sample waiting (a worker that cannot keep up)."""

    def poll(self, timeout: float = 0.0) -> bool:
        return True

    def recv(self):
        return sample(GOOD)


def test_a_burst_of_slow_samples_still_writes_within_its_time_budget():
    w = worker.Worker(config(), lambda c, m: _Slow(), Pipe())
    w.handle(sample(GOOD))   # warm: imports, hints and the monitor
    w.flush()
    w.results.sent.clear()
    t0 = time.monotonic()
    going, behind = worker.burst(w, _Samples(), 0.0, 1.0)
    assert going and behind and time.monotonic() - t0 < 6.0   # MAX_BATCH of them would take 12.8 s
    counted = [m for m in messages(w.results.sent) if m[0] == "samples"]
    assert len(counted) == 1 and 2 <= counted[0][2] <= 21   # written after ~1 s of 50 ms samples


def test_builtin_monitor_counts_a_nonfinite_row_as_such_not_as_class_0():
    # The decoders keep a batch's rows as served (a NaN row no longer rejects the answer):
    # the built-in monitor must not read NaN scores as a class-0 prediction.
    import numpy as np

    from sentinel.analysis.contract import DecodedBatch
    from sentinel.proxy.builtin_monitor import BuiltinMonitor

    m = BuiltinMonitor("digits")
    scores = np.array([[0.1, 2.0, -1.0], [np.nan, 1.0, 0.0], [3.0, 0.0, 0.0]], dtype=np.float32)
    ups = m.observe(DecodedBatch("digits", outputs=scores, output_kind="logits"))
    by = {(u.metric, tuple(sorted(u.labels.items()))): u.value for u in ups if u.op == "inc"}
    assert by[(mn.DRIFT_REJECTED.name, (("model", "digits"), ("reason", "nonfinite_output")))] == 1
    assert by[(mn.PREDICTIONS.name, (("class", "1"), ("model", "digits")))] == 1
    assert by[(mn.PREDICTIONS.name, (("class", "0"), ("model", "digits")))] == 1   # the third row only
    confs = [u.value for u in ups if u.op == "observe"]
    assert len(confs) == 2 and all(np.isfinite(confs))
    assert m.predictions == 2
    only_nan = m.observe(DecodedBatch("digits", outputs=scores[1:2], output_kind="logits"))
    assert [u.metric for u in only_nan] == [mn.DRIFT_REJECTED.name]
