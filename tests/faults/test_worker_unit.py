"""The worker's per-sample handling in-process: every exception becomes a reason, the budget holds."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

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
