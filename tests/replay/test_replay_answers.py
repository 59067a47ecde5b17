"""`run_replay` against small in-test HTTP servers that answer in ways a real server might:
errors, bodies that are not answers, other shapes. Each run sends one golden sample a few times."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from servers import send_json, serve_in_thread, stop_server

from sentinel.replay.report import Objectives
from sentinel.replay.runner import LoadPlan
from sentinel.replay.session import ReplaySpec, run_replay


def _server(answer):
    """A v2 server whose n-th answer (from 0) is `answer(n)`: (status, JSON document)."""
    seen = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            status, doc = answer(seen[0])
            seen[0] += 1
            send_json(self, status, doc)

        def log_message(self, *args):
            pass

    return serve_in_thread(Handler)


def _v2(probabilities) -> dict:
    p = [float(v) for v in probabilities]
    return {"outputs": [{"name": "probabilities", "shape": [1, len(p)], "datatype": "FP32", "data": p}]}


def _replay(digits_v3, digits_golden, answer, objectives=Objectives(), count=4):
    srv = _server(answer)
    try:
        spec = ReplaySpec(target=f"http://127.0.0.1:{srv.server_address[1]}", protocol="v2",
                          model_path_name="digits", samples=1)
        return run_replay(digits_v3, digits_golden, spec, LoadPlan(concurrency=1, count=count), objectives)
    finally:
        stop_server(srv)


def test_failed_requests_fail_the_run_without_an_error_objective(digits_v3, digits_golden):
    # 1 request in 4 answered 500, the other 3 agree: this passed (exit 0) unless
    # --max-error-ratio or --slo asked about errors.
    good = _v2(digits_golden.probabilities[0])
    rep = _replay(digits_v3, digits_golden, lambda n: (500, {"error": "boom"}) if n == 1 else (200, good))
    assert rep.doc["errors"] == 1 and rep.doc["agreement"] == 1.0
    assert not rep.passed and [o.name for o in rep.missed] == ["max_error_ratio"]
    assert "error ratio 25.00% exceeds 0.00%" in rep.missed[0].message
    # An error budget that is asked for is used.
    rep = _replay(digits_v3, digits_golden, lambda n: (500, {"error": "boom"}) if n == 1 else (200, good),
                  Objectives(max_error_ratio=0.25))
    assert rep.passed


def test_an_answer_with_more_rows_than_inputs_is_a_decode_error(digits_v3, digits_golden):
    # One input, two rows back (someone else's result, a batching bug): the first row was
    # compared as this sample's answer and the run passed.
    p = [float(v) for v in digits_golden.probabilities[0]]
    two = {"outputs": [{"name": "probabilities", "shape": [2, 10], "datatype": "FP32", "data": p + p[::-1]}]}
    rep = _replay(digits_v3, digits_golden, lambda n: (200, two), count=2)
    assert rep.doc["answered"] == 0 and rep.doc["errors_by_kind"] == {"decode": 2}
    assert rep.doc["error_examples"]["decode"] == "the answer has 2 rows for 1 input sample"
    assert not rep.passed
    # the text report says what went wrong, not only that 2 decode errors happened
    from sentinel.replay.report import render_text

    assert "  first decode error: the answer has 2 rows for 1 input sample" in render_text(rep).splitlines()


def test_more_connections_than_the_file_limit_allows_is_a_usage_error(monkeypatch):
    # Past RLIMIT_NOFILE every connect failed with EMFILE, counted as the target's `connect`
    # errors (--concurrency 2000 under ulimit -n 512: 93% "errors" blamed on the server).
    import resource

    from sentinel.errors import UsageError
    from sentinel.replay.session import check_fd_room

    limits = {"soft": 512, "hard": 1024}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))

    def setrlimit(_, value):
        limits["soft"] = value[0]

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    check_fd_room(LoadPlan(concurrency=900))          # fits once the soft limit is raised
    assert limits["soft"] == 964
    check_fd_room(LoadPlan(concurrency=5000), requests=10)   # 10 requests need 10 connections
    with pytest.raises(UsageError, match=r"--concurrency 2000 needs 2000 connections.*only 1024 files.*at most 960"):
        check_fd_room(LoadPlan(concurrency=2000))
    with pytest.raises(UsageError, match=r"--connections 4000"):
        check_fd_room(LoadPlan(rate=10, connections=4000))


@pytest.mark.parametrize("edit,message", [
    (lambda s: {"probabilities": np.pad(s.probabilities, ((0, 0), (0, 1)))},
     r"probabilities.npy: reference scores of shape \[11\] per sample; digits:v3 has 10 classes"),
    (lambda s: {"logits": s.logits[:, :9]}, r"logits.npy: reference scores of shape \[9\]"),
    (lambda s: {"probabilities": np.where(np.arange(4)[:, None] == 2, np.nan, s.probabilities)},
     r"probabilities.npy: 1 reference rows hold NaN or infinite scores \(first: sample id \d+\)"),
    (lambda s: {"inputs": s.inputs.reshape(4, -1)},
     r"inputs.npy: samples of shape \[1024\]; digits:v3's model.yaml input is \[1, 32, 32\]"),
    (lambda s: {"ids": np.array([7, 8, 7, 9])}, r"ids.npy: sample id 7 appears 2 times"),
])
def test_golden_rows_that_do_not_fit_the_model_are_refused_naming_the_file(digits_v3, digits_golden, edit, message):
    # Such a set passes its digest check once re-signed; replay then called every answer a
    # mismatch of the model (11-wide or NaN reference), or ids named two samples at once.
    from dataclasses import replace

    from sentinel.errors import UsageError
    from sentinel.replay.session import check_samples, select_samples

    s = select_samples(digits_v3, digits_golden, "inputs", limit=4)
    check_samples(digits_v3, digits_golden, s, "inputs")   # the real set fits
    with pytest.raises(UsageError, match=message):
        check_samples(digits_v3, digits_golden, replace(s, **edit(s)), "inputs")
