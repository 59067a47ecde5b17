"""`run_replay` against small in-test HTTP servers that answer in ways a real server might:
errors, bodies that are not answers, other shapes. Each run sends one golden sample a few times."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

from servers import serve_in_thread, stop_server

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
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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
