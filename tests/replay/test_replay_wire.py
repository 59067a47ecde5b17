"""Request encoders and response decoders, on literal bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sentinel.golden import Tolerance
from sentinel.replay.compare import compare
from sentinel.replay.report import Objectives, build_report
from sentinel.replay.runner import LoadPlan, RunResult
from sentinel.replay.wire import DecodeError, WireFormat

pytestmark = pytest.mark.unit

X = np.arange(64, dtype=np.float32).reshape(8, 8)
P = np.array([0.1, 0.7, 0.2])


def test_v2_json_request_and_response():
    w = WireFormat("v2", "digits")
    headers, body = w.encode(X)
    doc = json.loads(body)
    assert w.path == "/v2/models/digits/infer"
    assert doc["inputs"][0]["shape"] == [1, 8, 8] and doc["inputs"][0]["data"][5] == 5.0
    resp = {"outputs": [{"name": "logits", "shape": [1, 3], "datatype": "FP32", "data": [0.0, 2.0, 1.0]},
                        {"name": "probabilities", "shape": [1, 3], "datatype": "FP32", "data": P.tolist()}]}
    d = w.decode({}, json.dumps(resp).encode())
    assert d.top1 == 1 and np.allclose(d.probabilities, P) and np.allclose(d.logits, [0, 2, 1])


def test_v2_binary_request_and_response():
    w = WireFormat("v2", "digits", binary=True)
    headers, body = w.encode(X)
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert head["inputs"][0]["parameters"]["binary_data_size"] == 256
    assert np.array_equal(np.frombuffer(body[n:], "<f4").reshape(8, 8), X)
    jh = json.dumps({"outputs": [{"name": "probabilities", "shape": [1, 3], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 12}}]}).encode()
    d = w.decode({"inference-header-content-length": str(len(jh))}, jh + P.astype("<f4").tobytes())
    assert d.top1 == 1 and np.allclose(d.probabilities, P, atol=1e-7) and d.logits is None


def test_v2_lone_logits_output_of_another_name_is_softmaxed():
    w = WireFormat("v2", "m")
    resp = {"outputs": [{"name": "output0", "shape": [1, 3], "datatype": "FP32", "data": [3.0, -1.0, 0.5]}]}
    d = w.decode({}, json.dumps(resp).encode())
    assert d.top1 == 0 and d.logits is not None and abs(d.probabilities.sum() - 1) < 1e-9


def test_v1_and_torchserve_answers():
    v1 = WireFormat("v1", "digits")
    assert v1.path == "/v1/models/digits:predict"
    assert json.loads(v1.encode(X)[1])["instances"][0][0][:2] == [0.0, 1.0]
    assert v1.decode({}, b'{"predictions": [[0.1, 0.7, 0.2]]}').top1 == 1
    ts = WireFormat("torchserve", "digits", classes=("cat", "dog", "eel"))
    assert ts.path == "/predictions/digits"
    assert ts.decode({}, b'{"dog": 0.6, "eel": 0.3}').top1 == 1   # TorchServe's top-k form
    assert ts.decode({}, b"[0.2, 0.1, 0.7]").top1 == 2


@pytest.mark.parametrize("body", [b"not json", b'{"outputs": []}', b'{"predictions": 3}'])
def test_undecodable_answers_raise_decode_error(body):
    w = WireFormat("v2" if b"outputs" in body or body == b"not json" else "v1", "m")
    with pytest.raises(DecodeError):
        w.decode({}, body)


def test_comparison_and_objectives_report_misses_with_amounts():
    from sentinel.replay.wire import Decoded

    tol = Tolerance(prob_atol=1e-3)
    ok = compare(1, Decoded(1, probabilities=P), P, np.log(P), tol)
    bad = compare(2, Decoded(2, probabilities=np.array([0.1, 0.2, 0.7])), P, np.log(P), tol)
    assert ok.agrees(tol) and not bad.agrees(tol) and bad.prob_max_abs == pytest.approx(0.5)
    r = RunResult("open", 2, sent=2, completed=2, comparisons=[ok, bad])
    for _ in range(2):
        r.corrected.record(0.2)
        r.uncorrected.record(0.01)
    rep = build_report(r, model="digits:v3", target="http://x", protocol="v2", binary=False,
                       plan=LoadPlan(rate=10), tolerance=tol,
                       objectives=Objectives(p99_ms=50, min_agreement=1.0, max_error_ratio=0.0))
    assert not rep.passed
    missed = {o.name: o.message for o in rep.missed}
    assert set(missed) == {"p99_ms", "min_agreement"}
    assert "exceeds 50 ms by 150.0 ms" in missed["p99_ms"]
    assert rep.doc["mismatches"] == [{"id": 2, "expected": 1, "served": 2, "prob_max_abs": 0.5, "logits_max_abs": None}]
    assert rep.doc["agreement"] == 0.5 and rep.doc["errors"] == 0


def test_slo_file_objectives_for_the_model(tmp_path):
    from sentinel.replay.report import objectives_from_slo

    slo = tmp_path / "slo.yaml"
    slo.write_text("slos:\n"
                   "  - {name: availability, model: digits, objective: 0.999, sli: availability}\n"
                   "  - {name: latency, model: digits, objective: 0.99, sli: latency, threshold: 0.15}\n"
                   "  - {name: agreement, model: digits, objective: 0.995, sli: agreement}\n"
                   "  - {name: other, model: cats, objective: 0.9, sli: agreement}\n")
    o = objectives_from_slo(str(slo), "digits", "digits:v3", Objectives(min_agreement=1.0))
    assert o.max_error_ratio == pytest.approx(0.001)
    assert o.latency_threshold_ms == 150.0 and o.latency_ratio == 0.99
    assert o.min_agreement == 1.0   # the flag wins


def test_latency_slo_objective_counts_requests_within_the_threshold():
    r = RunResult("open", 100, sent=100, completed=100)
    for i in range(100):
        r.corrected.record(0.01 if i < 97 else 0.5)
        r.uncorrected.record(0.01)
    rep = build_report(r, model="m", target="t", protocol="v2", binary=False, plan=LoadPlan(rate=10),
                       tolerance=Tolerance(), objectives=Objectives(latency_threshold_ms=150, latency_ratio=0.99))
    assert rep.doc["latency_ms"]["corrected"]["within_threshold"] == 0.97
    assert not rep.passed and "only 97.00% of requests within 150 ms" in rep.missed[0].message


@pytest.mark.parametrize("protocol,body", [
    ("v2", b'{"outputs": [{"name": "logits", "shape": [1, 7], "datatype": "FP32", "data": [0,1,2,3,4,5,6]}]}'),
    ("v1", b'{"predictions": [[0.1, 0.9]]}'),
    ("torchserve", b"[0.2, 0.1, 0.3, 0.4]"),
])
def test_an_answer_with_another_class_count_is_a_decode_error_not_a_mismatch(protocol, body):
    # Compared as they came, 7 scores against a 3-class reference gave chance top-1 agreements
    # and blamed the model for the rest; the answer itself is what is wrong.
    w = WireFormat(protocol, "m", classes=("a", "b", "c"))
    with pytest.raises(DecodeError, match="has 3 classes") as info:
        w.decode({}, body)
    assert info.value.kind == "bad_shape"
    assert WireFormat(protocol, "m").decode({}, body).top1 >= 0   # classes unknown: read as served


def test_count_and_duration_together_are_a_usage_error():
    # the count silently won and --duration was ignored
    assert LoadPlan(rate=5, count=10, duration_s=5).validate() == [
        "--count and --duration exclude each other (the count would win and the duration be ignored)"]
    assert LoadPlan(rate=5, duration_s=5).validate() == [] and LoadPlan(concurrency=2, count=3).validate() == []


@pytest.mark.parametrize("n", [0, -3])
def test_samples_below_one_is_a_usage_error(digits_v3, digits_golden, n):
    # 0 crashed with ZeroDivisionError; -3 silently replayed all but the last 3 samples
    from sentinel.errors import UsageError
    from sentinel.replay.session import ReplaySpec, run_replay

    spec = ReplaySpec(target="http://127.0.0.1:9", protocol="v2", model_path_name="digits", samples=n)
    with pytest.raises(UsageError, match=f"--samples must be at least 1, got {n}"):
        run_replay(digits_v3, digits_golden, spec, LoadPlan(rate=5, count=1), Objectives())


def test_nan_and_infinite_load_and_objectives_are_usage_errors():
    # NaN passed `<= 0` checks: --rate nan sent at full speed, --duration nan crashed,
    # --timeout nan leaked coroutines, --p99-ms nan "missed" by nan ms
    nan, inf = float("nan"), float("inf")
    assert LoadPlan(rate=nan).validate() == ["--rate must be a positive number, got nan"]
    assert LoadPlan(rate=inf).validate() == ["--rate must be a positive number, got inf"]
    assert LoadPlan(rate=5, duration_s=nan).validate() == ["--duration must be a positive number, got nan"]
    assert LoadPlan(rate=5, timeout_s=nan).validate() == ["--timeout must be a positive number, got nan"]
    assert Objectives(p99_ms=nan).validate() == ["--p99-ms must be a positive number, got nan"]
    assert LoadPlan(rate=5, duration_s=1, timeout_s=2).validate() == [] and Objectives(p99_ms=5).validate() == []


def test_an_unwritable_json_path_is_refused_before_the_run(tmp_path):
    # `--json /tmp` ran the whole replay, then died with IsADirectoryError and lost the report
    from sentinel.commands._common import check_json_target, write_json_report
    from sentinel.errors import InfrastructureError, UsageError

    with pytest.raises(UsageError, match="is a directory"):
        check_json_target(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"file is not a writable directory"):
        check_json_target(tmp_path / "file" / "sub" / "r.json")
    check_json_target(tmp_path / "new" / "r.json")   # fine, and nothing created yet
    assert not (tmp_path / "new").exists()
    with pytest.raises(InfrastructureError, match="cannot write the report"):
        write_json_report({"a": 1}, tmp_path / "file" / "r.json")


def test_an_error_objective_is_missed_when_nothing_was_sent():
    # --duration shorter than one request: "ok error ratio 0.00% ≤ 0.00%" on 0 of 0 requests
    rep = build_report(RunResult("closed", 0), model="digits:v3", target="http://x", protocol="v2", binary=False,
                       plan=LoadPlan(concurrency=4, duration_s=1e-4), tolerance=Tolerance(),
                       objectives=Objectives(max_error_ratio=0.0))
    assert not rep.passed
    assert [(o.name, o.actual, o.message) for o in rep.missed] == [
        ("max_error_ratio", None, "no request was sent: no error ratio measured")]


def test_resent_requests_are_in_the_report():
    from sentinel.replay.report import render_text

    rep = build_report(RunResult("closed", 3, sent=3, completed=3, retried=2), model="digits:v3", target="http://x",
                       protocol="v2", binary=False, plan=LoadPlan(concurrency=1), tolerance=Tolerance(),
                       objectives=Objectives())
    assert rep.doc["retried"] == 2
    assert "2 resent after the server closed a kept-alive connection" in render_text(rep)


def test_the_tally_keeps_the_worst_mismatches_in_bounded_memory():
    # Every comparison was kept in a list (~240 B a request: 2 GB for a day at 100 rps); the
    # tally keeps counts, maxima and the worst `keep` mismatches, in the order a full sort gave.
    from sentinel.replay.compare import Comparison, Tally

    rng = np.random.default_rng(3)
    tol = Tolerance(prob_atol=0.05)
    comps = [Comparison(i, 1, int(rng.integers(0, 3)), float(round(rng.random() * 0.1, 2)), None, True)
             for i in range(5000)]
    t = Tally(tol, keep=50)
    for c in comps:
        t.append(c)
    bad = [c for c in comps if not c.agrees(tol)]
    assert len(t._worst) == 50 and t.mismatch_count == len(bad) and t.answered == 5000
    assert t.worst() == sorted(bad, key=lambda c: (c.top1_agrees, -(c.prob_max_abs or 0.0)))[:50]
    assert t.agreed == 5000 - len(bad) and t.top1_agreed == sum(c.top1_agrees for c in comps)
    assert t.prob_max_abs == max(c.prob_max_abs for c in comps)
