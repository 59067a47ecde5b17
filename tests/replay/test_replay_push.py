"""Pushing a replay's metrics to a Pushgateway (a local stand-in that records the request)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client import CollectorRegistry
from servers import free_port

from sentinel.errors import InfrastructureError
from sentinel.replay.push import ReplayMetrics, push
from sentinel.replay.runner import Outcome

pytestmark = pytest.mark.unit


def test_push_sends_replay_families_under_the_job_and_model():
    got: dict[str, object] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 - http.server's naming
            got["path"] = self.path
            got["body"] = self.rfile.read(int(self.headers["Content-Length"])).decode()
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):  # keep test output quiet
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.handle_request, daemon=True)
    t.start()
    reg = CollectorRegistry()
    m = ReplayMetrics(reg)
    m.observe("digits:v3", Outcome(1, 0.012, None, None), True)
    m.observe("digits:v3", Outcome(2, 0.5, "http_500", None), None)
    push(f"127.0.0.1:{srv.server_port}", reg, "digits:v3")
    t.join(5)
    srv.server_close()
    assert got["path"] == "/metrics/job/sentinel_replay/model/digits%3Av3"
    body = got["body"]
    assert 'sentinel_replay_requests_total{model="digits:v3",result="ok"} 1.0' in body
    assert 'sentinel_replay_requests_total{model="digits:v3",result="error"} 1.0' in body
    assert 'sentinel_reference_agreement_total{model="digits:v3",result="agree",source="replay"} 1.0' in body
    assert 'sentinel_replay_duration_seconds_count{model="digits:v3"} 2.0' in body


def test_push_to_a_dead_gateway_is_an_infrastructure_error():
    with pytest.raises(InfrastructureError, match="push to"):
        push(f"http://127.0.0.1:{free_port()}", CollectorRegistry(), "digits:v3", timeout=2)
