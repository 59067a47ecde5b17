"""Every body the KServe logger emits, built with the `cloudevents` package, posted to a running sidecar.

The logger (kserve pkg/logger) sends binary-mode events carrying the payload as is and only
its Content-Type: v1 and v2 JSON, and v2 binary-tensor bodies without
Inference-Header-Content-Length. Structured mode is accepted too.
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import numpy as np
import pytest
from cloudevents.http import CloudEvent, to_binary, to_structured
from proxy_helpers import LOGITS, RunningSidecar, Upstream, make_config

from sentinel import metricnames as mn
from sentinel.config import AnalysisConfig
from sentinel.protocols import encode_request, encode_response
from sentinel.proxy.ingest import REQUEST_TYPE, RESPONSE_TYPE, Event, JoinTable, parse_event
from sentinel.scores import softmax

INGEST = mn.INGEST_EVENTS.sample_name
SAMPLES = mn.SAMPLES.sample_name
X = np.random.default_rng(0).random((1, 1, 8, 8)).astype(np.float32)


def _event(ev_id: str, ce_type: str, data: bytes, ctype: str) -> CloudEvent:
    # Attributes as kserve's logger sets them (id shared by request and response).
    return CloudEvent({"id": ev_id, "type": ce_type, "source": "http://localhost:9081/",
                       "inferenceservicename": "digits", "namespace": "default", "component": "predictor",
                       "endpoint": "digits-predictor", "datacontenttype": ctype}, data)


def _pairs() -> dict[str, tuple[tuple[bytes, str], tuple[bytes, str]]]:
    probs = softmax(LOGITS).astype(np.float32)
    v2_req_bin, h = encode_request("v2", X, binary=True)
    v2_resp_bin, hr = encode_response("v2", [("probabilities", probs), ("logits", LOGITS)], binary=True)
    return {
        "v1": ((encode_request("v1", X)[0], "application/json"),
               (encode_response("v1", [("p", probs)])[0], "application/json")),
        "v2-json": ((encode_request("v2", X)[0], "application/json"),
                    (encode_response("v2", [("logits", LOGITS)])[0], "application/json")),
        "v2-binary": ((v2_req_bin, h["content-type"]), (v2_resp_bin, hr["content-type"])),
    }


def _post(c: httpx.Client, headers: dict, body: bytes) -> httpx.Response:
    return c.post("/ingest", content=body, headers=headers)


@pytest.mark.slow
def test_logger_bodies_of_every_protocol_join_and_decode_in_binary_and_structured_mode():
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc, httpx.Client(base_url=sc.admin_url) as c:
        n = 0
        for mode, encode in (("binary", to_binary), ("structured", to_structured)):
            for name, ((req, rct), (resp, pct)) in _pairs().items():
                ev_id = f"{mode}-{name}"
                h, body = encode(_event(ev_id, REQUEST_TYPE, req, rct))
                r = _post(c, h, body)
                assert r.status_code == 200, (ev_id, r.text)
                assert r.json()["status"] == "waiting for the other half"
                h, body = encode(_event(ev_id, RESPONSE_TYPE, resp, pct))
                r = _post(c, h, body)
                assert r.status_code == 200 and r.json()["status"] == "joined", (ev_id, r.text)
                n += 1
                assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "decoded"}, n) == n, ev_id
                assert sc.value(SAMPLES, {"model": "digits", "outcome": "rejected"}) == 0, ev_id
        assert sc.value(INGEST, {"outcome": "accepted"}) == n
        assert sc.value(INGEST, {"outcome": "joined"}) == n
        # the predicted class of every joined response reached the monitor
        assert sc.wait_for(mn.PREDICTIONS.sample_name, {"model": "digits", "class": "1"}, n) == n
        metrics = c.get("/metrics").text
        help_line = next(line for line in metrics.splitlines() if line.startswith("# HELP sentinel_ingest_events"))
        for outcome in ("accepted", "joined", "orphaned", "rejected", "oversize"):
            assert outcome in help_line
        # a structured event that is not an inference event is refused naming what is wrong
        h, body = to_structured(CloudEvent({"id": "z", "type": "com.example.other", "source": "x"}, {"a": 1}))
        r = _post(c, h, body)
        assert r.status_code == 400 and "Ce-Type" in r.json()["error"]
        r = _post(c, {"content-type": "application/cloudevents+json"}, b"{not json")
        assert r.status_code == 400 and "structured mode" in r.json()["error"]
        # the sidecar still proxies afterwards
        body, h = encode_request("v2", X)
        assert httpx.post(f"{sc.url}/v2/models/digits/infer", content=body, headers=h).status_code == 200


@pytest.mark.slow
def test_unjoined_halves_are_bounded_in_bytes_and_oversize_bodies_are_not_kept():
    cfg = make_config("http://127.0.0.1:1")
    cfg = dataclasses.replace(cfg, analysis=AnalysisConfig(queue_size=64, ingest_ttl_s=60.0,
                                                           ingest_max_pending_bytes=300_000))
    big = b'{"instances": [' + b"0," * 50_000 + b"0]}"   # ~100 kB
    with Upstream() as up, RunningSidecar(dataclasses.replace(cfg, upstream=up.url)) as sc, \
            httpx.Client(base_url=sc.admin_url) as c:
        for i in range(10):
            h, body = to_binary(_event(f"big-{i}", REQUEST_TYPE, big, "application/json"))
            assert _post(c, h, body).status_code == 200
        assert sc.sc.join.bytes <= 300_000 and len(sc.sc.join) == 2
        assert sc.value(INGEST, {"outcome": "orphaned"}) == 8
        st = c.get("/status").json()
        assert st["ingest_pending"] == 2
        # a body over sampling.max_bytes (4 MiB here) is answered, counted, never stored
        h, body = to_binary(_event("huge", REQUEST_TYPE, b"0" * (5 << 20), "application/json"))
        r = _post(c, h, body)
        assert r.status_code == 200 and sc.value(INGEST, {"outcome": "oversize"}) == 1
        assert len(sc.sc.join) == 2
        # a body over the admin listener's limit is refused before it is kept
        r = _post(c, h, b"0" * (9 << 20) + b"00")
        assert r.status_code == 413


def _ev(i: str, half: str, size: int = 2) -> Event:
    return Event(i, half, "digits", {}, b"x" * size)  # type: ignore[arg-type]


@pytest.mark.unit
def test_join_table_byte_bound_drops_oldest_first():
    t = JoinTable(ttl_s=10, max_pending=100, max_bytes=1000)
    for i in range(5):
        assert t.add(_ev(str(i), "request", 300), float(i)) == (None, 0 if i < 2 else 1)
    assert len(t) == 2 and t.bytes <= 1000
    pair, _ = t.add(_ev("4", "response", 10), 5.0)
    assert pair is not None and pair[0].id == "4"
    assert t.add(_ev("huge", "request", 5000), 6.0) == (None, 1)   # can never fit: an orphan at once
    assert len(t) == 1 and t.bytes == 300 + 64 + 1


@pytest.mark.unit
def test_structured_mode_envelopes_parse():
    h, body = to_structured(_event("s1", REQUEST_TYPE, b"\x00\x01binary", "application/octet-stream"))
    ev = parse_event({k.lower(): v for k, v in h.items()}, body)
    assert ev.body == b"\x00\x01binary" and ev.headers["content-type"] == "application/octet-stream"
    assert ev.service == "digits" and ev.half == "request" and ev.id == "s1"
    h, body = to_structured(CloudEvent({"id": "s2", "type": RESPONSE_TYPE, "source": "x",
                                        "inferenceservicename": "digits"}, {"predictions": [[0.5, 0.5]]}))
    ev = parse_event({k.lower(): v for k, v in h.items()}, body)
    assert json.loads(ev.body) == {"predictions": [[0.5, 0.5]]} and ev.half == "response"


@pytest.mark.unit
def test_a_batch_of_structured_events_is_taken_event_by_event():
    import base64

    from sentinel.protocols import decode_request
    from sentinel.proxy.ingest import BATCH, handle

    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                        "3a7e9b550000000a49444154789c6360000000020001e221bc330000000049454e44ae426082")
    # a v1 request whose `inputs` list holds {"b64": ...}: sniffed as v1, not as v2 tensors
    req_data = {"inputs": [{"b64": base64.b64encode(png).decode()}]}
    envelopes = [json.loads(to_structured(_event("b1", REQUEST_TYPE, req_data, "application/json"))[1]),
                 json.loads(to_structured(_event("b1", RESPONSE_TYPE, {"predictions": [[0.25, 0.75]]},
                                                 "application/json"))[1]),
                 {"type": REQUEST_TYPE, "source": "x", "data": {}}]   # no id
    counts: dict[str, int] = {}
    submitted: list = []

    class Sampler:
        max_bytes = 1 << 20

    def post(body: bytes):
        return handle({"content-type": BATCH}, body, join=JoinTable(30, 16),
                      count=lambda o, n: counts.__setitem__(o, counts.get(o, 0) + n),
                      route=lambda service: ("digits", Sampler()), submit=submitted.append,
                      known_models="digits", now=0.0)

    status, _, reply = post(json.dumps(envelopes).encode())
    doc = json.loads(reply)
    assert status == 400 and [e["code"] for e in doc["events"]] == [200, 200, 400]
    assert "no string 'id'" in doc["events"][2]["error"] and "batch mode" in doc["events"][2]["error"]
    assert counts == {"accepted": 1, "joined": 1, "rejected": 1}
    (sample,) = submitted
    got = decode_request(sample.protocol, sample.request_body, sample.request_headers).inputs
    assert got.shape == (1, 1, 1) and got.dtype == np.uint8
    status, _, _ = post(b'{"not": "an array"}')
    assert status == 400 and counts["rejected"] == 2


@pytest.mark.unit
def test_json_text_given_to_the_sdk_as_a_string_is_the_payload_in_both_modes():
    doc = {"instances": [[1.0, 2.0]]}
    event = CloudEvent({"id": "t1", "type": REQUEST_TYPE, "source": "x", "inferenceservicename": "digits",
                        "datacontenttype": "application/json"}, json.dumps(doc))
    for mode in (to_binary, to_structured):
        h, body = mode(event)
        assert body.lstrip()[:1] in (b'"', b"{")   # the SDK quotes str data
        ev = parse_event({k.lower(): v for k, v in h.items()}, body)
        assert json.loads(ev.body) == doc
    h, body = to_binary(CloudEvent({"id": "t2", "type": REQUEST_TYPE, "source": "x",
                                    "datacontenttype": "application/json"}, "plain words"))
    assert parse_event({k.lower(): v for k, v in h.items()}, body).body == body   # not JSON text: as sent


@pytest.mark.unit
def test_a_transformer_and_its_predictor_logging_one_request_id_pair_within_each_component():
    from sentinel.proxy.ingest import handle

    def event(ce_type: str, component: str, body: bytes) -> tuple[dict, bytes]:
        ev = CloudEvent({"id": "client-ce-id", "type": ce_type, "source": "x", "inferenceservicename": "digits",
                         "component": component, "endpoint": "default", "datacontenttype": "application/json"}, body)
        h, b = to_binary(ev)
        return {k.lower(): v for k, v in h.items()}, b

    class Sampler:
        max_bytes = 1 << 20

    join, counts, submitted = JoinTable(30, 16), {}, []
    for ce_type, component, body in [(REQUEST_TYPE, "transformer", b'{"instances": [[1]]}'),
                                     (REQUEST_TYPE, "predictor", b'{"instances": [[2]]}'),
                                     (RESPONSE_TYPE, "predictor", b'{"predictions": [[0.2, 0.8]]}'),
                                     (RESPONSE_TYPE, "transformer", b'{"predictions": [[0.1, 0.9]]}')]:
        status, _, _ = handle(*event(ce_type, component, body), join=join,
                              count=lambda o, n: counts.__setitem__(o, counts.get(o, 0) + n),
                              route=lambda service: ("digits", Sampler()), submit=submitted.append,
                              known_models="digits", now=0.0)
        assert status == 200
    assert counts == {"accepted": 2, "joined": 2} and len(join) == 0
    pairs = sorted((s.request_body, s.response_body) for s in submitted)
    assert pairs == [(b'{"instances": [[1]]}', b'{"predictions": [[0.1, 0.9]]}'),
                     (b'{"instances": [[2]]}', b'{"predictions": [[0.2, 0.8]]}')]
