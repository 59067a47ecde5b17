"""/ingest events the admin listener refuses unread (413, over 2 × sampling.max_bytes + 64 KiB), and
envelopes sent with a Content-Encoding, posted over loopback to a running sidecar with `cloudevents`.

A refused event was counted only in sentinel_proxy_errors_total{reason="body_too_large"}: ingest
never heard of it, so its other half waited out the TTL and was counted `orphaned`. A binary-mode
event is known by its Ce-* headers without its body: it is counted `oversize` like one over
sampling.max_bytes that fits, and its other half is turned away (or dropped, if it was waiting).
A structured-mode one cannot be identified: `rejected`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import socket
import time

import httpx
import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from proxy_helpers import ResponseReader, RunningSidecar, Upstream, make_config

from sentinel import metricnames as mn
from sentinel.config import SamplingConfig
from sentinel.proxy.ingest import REQUEST_TYPE, RESPONSE_TYPE

pytestmark = pytest.mark.slow

INGEST = mn.INGEST_EVENTS.sample_name
ERRORS = mn.PROXY_ERRORS.sample_name
OUTCOMES = ("accepted", "joined", "orphaned", "rejected", "oversize")
MAX_BYTES = 16 << 10                      # sampling.max_bytes; the admin body limit is 2 × this + 64 KiB
BIG = b'{"instances": [' + b"0," * 60_000 + b"0]}"   # ~120 kB: over the admin listener's limit
REQ = b'{"instances": [[[[0.5, 0.5], [0.5, 0.5]]]]}'
RESP = b'{"predictions": [[0.25, 0.75]]}'


@pytest.fixture
def sidecar():
    cfg = make_config("http://127.0.0.1:1")
    cfg = dataclasses.replace(cfg, sampling=SamplingConfig(rate=0.0, max_per_second=1000, max_bytes=MAX_BYTES))
    with Upstream() as up, RunningSidecar(dataclasses.replace(cfg, upstream=up.url)) as sc:
        yield sc


def _event(ev_id: str, ce_type: str, data: bytes) -> CloudEvent:
    # the attributes KServe's logger sets (pkg/logger/worker.go); request and response share the id
    return CloudEvent({"id": ev_id, "type": ce_type, "source": "http://localhost:9081/",
                       "inferenceservicename": "digits", "namespace": "default", "component": "predictor",
                       "endpoint": "default", "datacontenttype": "application/json"}, data)


def _counts(sc) -> dict[str, float]:
    return {o: v for o in OUTCOMES if (v := sc.value(INGEST, {"outcome": o}))}


def _settle(sc, expected: dict[str, float], timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while _counts(sc) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return _counts(sc)


def _chunked(body: bytes):
    for i in range(0, len(body), 8192):
        yield body[i:i + 8192]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_binary_event_over_the_admin_limit_is_oversize_and_its_other_half_is_not_kept(sidecar, framing):
    sc = sidecar
    with httpx.Client(base_url=sc.admin_url) as c:
        h, body = to_binary(_event("a", REQUEST_TYPE, BIG))
        r = c.post("/ingest", headers=h, content=body if framing == "content-length" else _chunked(body))
        assert r.status_code == 413 and r.json()["error"]["reason"] == "body_too_large"
        assert _settle(sc, {"oversize": 1}) == {"oversize": 1}
        # its response: turned away at once, counted oversize, never accepted, never an orphan
        r = c.post("/ingest", headers=to_binary(_event("a", RESPONSE_TYPE, RESP))[0], content=RESP)
        assert r.status_code == 200 and r.json()["status"].startswith("not analysed")
        assert len(sc.sc.join) == 0
        # the other order (logger workers race): the waiting response is dropped when the request is refused
        assert c.post("/ingest", headers=to_binary(_event("b", RESPONSE_TYPE, RESP))[0], content=RESP).json() == \
            {"status": "waiting for the other half"}
        h, body = to_binary(_event("b", REQUEST_TYPE, BIG))
        assert c.post("/ingest", headers=h, content=body).status_code == 413
        assert _settle(sc, {"oversize": 3, "accepted": 1, "orphaned": 1}) == \
            {"oversize": 3, "accepted": 1, "orphaned": 1}
        assert len(sc.sc.join) == 0
        time.sleep(2.5)   # past the TTL (1 s) and the expiry sweep: nothing more becomes an orphan
        assert _counts(sc) == {"oversize": 3, "accepted": 1, "orphaned": 1}
        assert sc.value(ERRORS, {"reason": "body_too_large"}) == 2
        assert c.get("/healthz").status_code == 200


def test_a_structured_event_over_the_admin_limit_is_a_rejection_naming_binary_mode(sidecar):
    sc = sidecar
    with httpx.Client(base_url=sc.admin_url) as c:
        h, body = to_structured(_event("s", REQUEST_TYPE, BIG))
        r = c.post("/ingest", headers=h, content=body)
        assert r.status_code == 413
        assert _settle(sc, {"rejected": 1}) == {"rejected": 1}
        # the same body in binary mode, over the limit without Ce-Id: cannot be identified either
        h, body = to_binary(_event("t", REQUEST_TYPE, BIG))
        del h["ce-id"]
        assert c.post("/ingest", headers=h, content=body).status_code == 413
        assert _settle(sc, {"rejected": 2}) == {"rejected": 2}
        assert c.get("/healthz").status_code == 200


def test_the_413_goes_out_before_any_of_the_body_is_sent_and_the_event_is_counted(sidecar):
    sc = sidecar
    h, _ = to_binary(_event("h", REQUEST_TYPE, b""))
    head = "POST /ingest HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
    with socket.create_connection(("127.0.0.1", sc.sc.admin_address[1]), timeout=5) as s:
        s.sendall((head + "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n").encode())
        status, headers, body = ResponseReader(s).read()
    assert status == 413 and headers["connection"] == "close"
    assert _settle(sc, {"oversize": 1}) == {"oversize": 1}
    with httpx.Client(base_url=sc.admin_url) as c:   # the listener keeps serving
        assert c.get("/healthz").status_code == 200
        r = c.post("/ingest", headers=to_binary(_event("h", RESPONSE_TYPE, RESP))[0], content=RESP)
        assert r.status_code == 200 and r.json()["status"].startswith("not analysed")
    assert _counts(sc) == {"oversize": 2}


def test_a_pipelined_event_over_the_limit_is_answered_413_after_the_answers_before_it(sidecar):
    """The admin listener closed the connection without answering it: the sender saw a reset."""
    sc = sidecar
    data = b""
    for ce_type, payload in ((RESPONSE_TYPE, RESP), (REQUEST_TYPE, BIG)):
        h, body = to_binary(_event("p", ce_type, payload))
        data += ("POST /ingest HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
                 + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", sc.sc.admin_address[1]), timeout=5) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        reader = ResponseReader(s)
        first, second = reader.read(), reader.read()
    assert first[0] == 200 and json.loads(first[2]) == {"status": "waiting for the other half"}
    assert second[0] == 413 and second[1]["connection"] == "close"
    assert _settle(sc, {"accepted": 1, "orphaned": 1, "oversize": 1}) == {"accepted": 1, "orphaned": 1, "oversize": 1}
    assert len(sc.sc.join) == 0


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_structured_envelope_with_a_content_encoding_is_inflated_and_joins(sidecar, coding):
    """The envelope was parsed as sent: "not JSON: 'utf-8' codec can't decode byte 0x8b"."""
    import zlib

    sc = sidecar
    pack = gzip.compress if coding == "gzip" else zlib.compress
    with httpx.Client(base_url=sc.admin_url) as c:
        for ce_type, payload in ((REQUEST_TYPE, REQ), (RESPONSE_TYPE, RESP)):
            h, body = to_structured(_event("z", ce_type, payload))
            r = c.post("/ingest", headers={**h, "content-encoding": coding}, content=pack(body))
            assert r.status_code == 200, r.text
        assert r.json() == {"status": "joined"}
        assert _counts(sc) == {"accepted": 1, "joined": 1}
        # a gzip bomb is bounded: refused naming the coding and the envelope bound, never inflated whole
        h, body = to_structured(_event("bomb", REQUEST_TYPE, b'{"instances": [' + b"0," * 2_000_000 + b"0]}"))
        packed = gzip.compress(body)
        assert len(packed) < 64 << 10
        r = c.post("/ingest", headers={**h, "content-encoding": "gzip"}, content=packed)
        assert r.status_code == 400 and "Content-Encoding" in r.json()["error"] and "binary-mode" in r.json()["error"]
        # a coding sentinel cannot undo is named as such
        r = c.post("/ingest", headers={**h, "content-encoding": "br"}, content=b"\x0b\x02\x80{}\x03")
        assert r.status_code == 400 and "'br'" in r.json()["error"]
        assert _counts(sc) == {"accepted": 1, "joined": 1, "rejected": 2}


@pytest.mark.unit
def test_handle_counts_a_refused_head_by_what_its_headers_say():
    """ingest.handle given the head of a refused body (admin.RefusedBody, empty body): binary mode by
    its Ce-* headers, structured and batch mode as a rejection naming why."""
    from sentinel.proxy.admin import RefusedBody
    from sentinel.proxy.ingest import BATCH, STRUCTURED, JoinTable, handle

    class Sampler:
        max_bytes = MAX_BYTES

    join, counts = JoinTable(30, 16), {}

    def post(headers: dict, body: bytes = b"", now: float = 0.0) -> tuple[int, dict]:
        status, _, reply = handle(headers, body, join=join,
                                  count=lambda o, n: counts.__setitem__(o, counts.get(o, 0) + n),
                                  route=lambda service: ("digits", Sampler()), submit=lambda s: None,
                                  known_models="digits", now=now)
        return status, json.loads(reply)

    for ctype in (STRUCTURED, BATCH + "; charset=utf-8"):
        status, doc = post(RefusedBody({"content-type": ctype}, 200_000, 98_304))
        assert status == 413 and "cannot be identified" in doc["error"] and "binary-mode" in doc["error"]
    assert counts == {"rejected": 2}
    h = to_binary(_event("r", REQUEST_TYPE, b""))[0]
    status, doc = post(RefusedBody(h, 200_000, 98_304, chunked=True))
    assert status == 413 and "more than 200000 bytes" in doc["status"]
    assert post(to_binary(_event("r", RESPONSE_TYPE, RESP))[0], RESP, now=1.0)[1]["status"].startswith("not analysed")
    assert counts == {"rejected": 2, "oversize": 2} and len(join) == 0
    # a plain dict with the same headers and no body is an ordinary (empty) event, not a refused one
    assert post(to_binary(_event("q", REQUEST_TYPE, b""))[0])[1] == {"status": "waiting for the other half"}
