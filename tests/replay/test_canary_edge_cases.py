"""The daemon's canary where on-call relies on it: several models on one registry, the shadow's
agreement counter beside it, /status saying why a round failed, and a stop during a slow round.

Real `sentinel serve` model servers (one with run-time faults), real sockets.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry
from servers import start_model_server

from sentinel import metricnames as mn
from sentinel.replay.canary import Canary
from sentinel.replay.session import select_samples
from sentinel.replay.wire import WireFormat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def v3():
    """digits:v3 whose delay and error ratio change at run time (POST /sentinel/faults)."""
    with start_model_server("digits:v3", extra_args=["--fault-admin"]) as url:
        yield url


@pytest.fixture(scope="module")
def v2():
    """digits:v2 under the same served name: the wrong version behind a digits:v3 sidecar."""
    with start_model_server("digits:v2") as url:
        yield url


@pytest.fixture
def faults(v3):
    def set_faults(delay_ms: float = 0.0, error_ratio: float = 0.0) -> None:
        r = httpx.post(v3 + "/sentinel/faults", json={"delay_ms": delay_ms, "error_ratio": error_ratio}, timeout=10)
        assert r.status_code == 200, r.text

    yield set_faults
    set_faults()


def _canary(model, target, entry, golden, registry, **kw) -> Canary:
    return Canary(model=model, target=target, wire=WireFormat("v2", "digits"),
                  samples=select_samples(entry, golden), registry=registry, **kw)


def test_every_model_gets_a_canary_on_the_sidecar_registry(v3, digits_v3, digits_golden):
    """The sidecar builds one canary per configured model on its one registry, after the shadow may
    have made sentinel_reference_agreement_total there: the second canary raised "Duplicated
    timeseries" and the sidecar ran no canary for every model after the first."""
    from sentinel.proxy.metrics import ProxyMetrics

    metrics = ProxyMetrics({"digits": "digits", "digits2": "digits2"}, 10)
    # the analysis worker's shadow comparison, applied before the canaries exist
    metrics.apply(mn.REFERENCE_AGREEMENT.name, {"model": "digits", "source": "shadow", "result": "agree"}, "inc", 3)
    reg = metrics.registry
    first = _canary("digits", v3, digits_v3, digits_golden, reg, count=4, rate=20)
    second = _canary("digits2", v3, digits_v3, digits_golden, reg, count=3, rate=20)
    assert first.run_once().agreed == 4 and second.run_once().agreed == 3
    for model, n in (("digits", 4), ("digits2", 3)):
        assert reg.get_sample_value(mn.REPLAY_REQUESTS.sample_name, {"model": model, "result": "ok"}) == n
        assert reg.get_sample_value(mn.REPLAY_DURATION.name + "_count", {"model": model}) == n
        assert reg.get_sample_value(mn.REFERENCE_AGREEMENT.sample_name,
                                    {"model": model, "source": "replay", "result": "agree"}) == n
    # the shadow's series is still there, in the same family, and analysis updates still land in it
    metrics.apply(mn.REFERENCE_AGREEMENT.name, {"model": "digits", "source": "shadow", "result": "agree"}, "inc", 1)
    assert reg.get_sample_value(mn.REFERENCE_AGREEMENT.sample_name,
                                {"model": "digits", "source": "shadow", "result": "agree"}) == 4
    body = metrics.exposition("text/plain")[0].decode()
    assert body.count(f"# TYPE {mn.REFERENCE_AGREEMENT.sample_name} counter") <= 1


def test_last_round_says_why_it_failed(v3, faults, digits_v3, digits_golden):
    """/status shows `vars(canary.last)`: error kinds and the first error's message, not just a count."""
    canary = _canary("digits", v3, digits_v3, digits_golden, CollectorRegistry(), count=4, rate=20)
    ok = canary.run_once()
    assert ok.errors == 0 and ok.error_kinds == {} and ok.error_example == ""
    assert ok.top1_disagreed == 0 and ok.prob_max_abs is not None and ok.prob_max_abs < 1e-3
    faults(error_ratio=1.0)
    bad = canary.run_once()
    assert bad.errors == 4 and bad.error_kinds == {"http_500": 4}
    assert bad.error_example.startswith("http_500: ")
    assert set(vars(bad)) >= {"sent", "errors", "agreed", "disagreed", "p99_s", "error_kinds", "error_example"}


def test_wrong_version_behind_the_canary_says_top1_changed(v2, digits_v3, digits_golden):
    """digits:v2 answering for a digits:v3 golden set: every answer disagrees, and the round tells a
    changed class apart from scores merely out of tolerance."""
    run = _canary("digits", v2, digits_v3, digits_golden, CollectorRegistry(), count=16, rate=50).run_once()
    assert run.errors == 0 and run.disagreed == 16
    assert 0 < run.top1_disagreed <= run.disagreed
    assert run.prob_max_abs is not None and run.prob_max_abs > 0.1


def test_stop_cancels_a_round_in_flight(v3, faults, digits_v3, digits_golden):
    """A slow model server made a round last count/rate + delay seconds, and stop() waited it out
    (the sidecar stops each canary in turn, 5 s each, on its event loop)."""
    faults(delay_ms=4000)
    reg = CollectorRegistry()
    canary = _canary("digits", v3, digits_v3, digits_golden, reg, count=8, rate=4, interval_s=3600,
                     ready_timeout_s=10)
    canary.start()
    thread = canary._thread
    assert thread is not None
    time.sleep(2.0)   # ready, and requests in flight against the 4 s delay
    t0 = time.monotonic()
    canary.stop(timeout=30)
    took = time.monotonic() - t0
    assert took < 3.0, f"stop took {took:.1f} s"
    assert not thread.is_alive()
    assert canary.last is None   # the cancelled round is not reported as a finished one
    assert not [t for t in threading.enumerate() if t.name == "sentinel-canary"]


def test_request_bodies_are_the_bytes_the_canary_sends(digits_v3, digits_golden):
    """The sidecar's /ingest drops what the model server's payload logger reports of canary traffic
    by these digests: they must be the very bodies on the wire."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[bytes] = []

    class Capture(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def do_GET(self) -> None:   # readiness
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            seen.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = _canary("digits", f"http://127.0.0.1:{srv.server_address[1]}", digits_v3, digits_golden,
                    CollectorRegistry(), count=4, rate=50.0, ready_timeout_s=5.0)
        c.run_once()
        c.run_once()   # the next round replays the next samples: over rounds, every class
    finally:
        srv.shutdown()
    assert len(seen) == 8 and len(set(seen)) == 8
    assert all(c.sends(b) for b in seen)
    assert not c.sends(seen[0][:-1] + b" ") and not c.sends(b"")


def test_status_before_the_first_round_says_what_the_readiness_polls_answer(digits_v3, digits_golden):
    """/status said only "first round pending" while the canary waited for a server that refused it."""
    from servers import free_port

    c = _canary("digits", f"http://127.0.0.1:{free_port()}", digits_v3, digits_golden, CollectorRegistry(),
                ready_timeout_s=60.0)
    c.start()
    try:
        deadline = time.monotonic() + 5
        while "waiting" not in str(c.status()) and time.monotonic() < deadline:
            time.sleep(0.05)
        status = c.status()
        assert isinstance(status, str) and status.startswith("first round pending (waiting for the model server")
        assert "127.0.0.1" in status
    finally:
        t = time.monotonic()
        c.stop(timeout=5)
        assert time.monotonic() - t < 3
