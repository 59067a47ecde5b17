"""/ingest edge cases as the KServe logger (mode all) produces them, events built with `cloudevents`.

What every event posted must add up to: each is counted once on arrival as accepted, joined,
rejected or oversize, and each accepted half later leaves as joined (its partner's count) or
orphaned; a pair that can never be analysed is not kept waiting for the TTL.
"""

from __future__ import annotations

import json

import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from sentinel.proxy.ingest import (
    BATCH,
    MAX_BATCH_EVENTS,
    REQUEST_TYPE,
    RESPONSE_TYPE,
    STRUCTURED,
    STRUCTURED_MAX_BYTES,
    Event,
    JoinTable,
    handle,
)

pytestmark = pytest.mark.unit

REQ = b'{"instances": [' + b"0.5," * 99 + b"0.5]}"   # ~400 bytes
RESP = b'{"predictions": [[0.25, 0.75]]}'


class _Sampler:
    max_bytes = 200   # REQ is over it, RESP is not


class _Ingest:
    """handle() with its counters and submissions kept."""

    def __init__(self, ttl_s: float = 30.0, canary=None, max_bytes: int | None = None) -> None:
        self.join = JoinTable(ttl_s, 16)
        self.canary = canary
        self.sampler = _Sampler() if max_bytes is None else type("S", (), {"max_bytes": max_bytes})()
        self.counts: dict[str, int] = {}
        self.submitted: list = []

    def post(self, headers: dict, body: bytes, now: float = 0.0) -> tuple[int, dict]:
        status, _, reply = handle({k.lower(): v for k, v in headers.items()}, body, join=self.join,
                                  count=lambda o, n: self.counts.__setitem__(o, self.counts.get(o, 0) + n),
                                  route=lambda service: ("digits", self.sampler), submit=self.submitted.append,
                                  known_models="digits", now=now, canary=self.canary)
        return status, json.loads(reply)


def _event(ev_id: str, ce_type: str, data: bytes) -> CloudEvent:
    return CloudEvent({"id": ev_id, "type": ce_type, "source": "http://localhost:9081/",
                       "inferenceservicename": "digits", "namespace": "default", "component": "predictor",
                       "endpoint": "default", "datacontenttype": "application/json"}, data)


@pytest.mark.parametrize("mode", [to_binary, to_structured])
def test_the_other_half_of_an_oversize_event_is_counted_oversize_and_never_kept(mode):
    ing = _Ingest()
    # request over sampling.max_bytes first (the logger's usual order), then its response
    assert ing.post(*mode(_event("a", REQUEST_TYPE, REQ)))[0] == 200
    status, doc = ing.post(*mode(_event("a", RESPONSE_TYPE, RESP)), now=1.0)
    assert status == 200 and "over sampling.max_bytes" in doc["status"]
    assert len(ing.join) == 0 and ing.join.bytes == 0        # not held until the TTL
    assert ing.counts == {"oversize": 2}                       # never "accepted", never "orphaned"
    # response first (logger workers race): it waits, then leaves as soon as the oversize request comes
    assert ing.post(*mode(_event("b", RESPONSE_TYPE, RESP)), now=2.0)[1]["status"] == "waiting for the other half"
    assert ing.post(*mode(_event("b", REQUEST_TYPE, REQ)), now=3.0)[0] == 200
    assert len(ing.join) == 0 and ing.join.bytes == 0
    assert ing.counts == {"oversize": 3, "accepted": 1, "orphaned": 1}
    assert ing.submitted == []
    # a later exchange reusing an id (a client's Ce-Id) with small bodies still joins
    ing.post(*mode(_event("a", REQUEST_TYPE, b'{"instances": [[1]]}')), now=4.0)
    assert ing.post(*mode(_event("a", RESPONSE_TYPE, RESP)), now=5.0)[1]["status"] == "joined"
    assert len(ing.submitted) == 1


def test_an_oversize_half_is_remembered_only_for_the_ttl():
    ing = _Ingest(ttl_s=5.0)
    ing.post(*to_binary(_event("a", REQUEST_TYPE, REQ)), now=0.0)
    # a response 10 s later is an unrelated event (over the TTL): it waits for its own request
    assert ing.post(*to_binary(_event("a", RESPONSE_TYPE, RESP)), now=10.0)[1]["status"] == \
        "waiting for the other half"
    assert ing.counts == {"oversize": 1, "accepted": 1}
    # both halves over the cap: each is counted oversize once and nothing is left behind
    big_resp = b'{"predictions": [' + b"[0.5, 0.5]," * 40 + b"[0.5, 0.5]]}"
    ing.post(*to_binary(_event("c", REQUEST_TYPE, REQ)), now=11.0)
    ing.post(*to_binary(_event("c", RESPONSE_TYPE, big_resp)), now=11.5)
    assert ing.counts == {"oversize": 3, "accepted": 1}
    assert len(ing.join._skipped) == 0 and len(ing.join) == 1   # only the lone response "a" waits


def test_oversize_keys_are_bounded_by_max_pending():
    t = JoinTable(ttl_s=60, max_pending=4)
    for i in range(100):
        assert t.skip(Event(str(i), "request", "digits", {}, b""), float(i) / 100, "oversize") == 0
    assert len(t._skipped) == 4
    assert t.partner_skipped(Event("99", "response", "digits", {}, b""), 1.0)
    assert not t.partner_skipped(Event("0", "response", "digits", {}, b""), 1.0)   # pushed out


def test_a_batch_refused_for_holding_too_many_events_counts_each_of_them():
    ing = _Ingest()
    envelope = {"specversion": "1.0", "type": REQUEST_TYPE, "source": "x", "data": {}}   # small: under the byte bound
    docs = [dict(envelope, id=str(i)) for i in range(MAX_BATCH_EVENTS + 1)]
    status, doc = ing.post({"content-type": BATCH}, json.dumps(docs).encode())
    assert status == 400 and "more than" in doc["error"]
    assert ing.counts == {"rejected": MAX_BATCH_EVENTS + 1}
    # a request that cannot be read at all is one rejection
    assert ing.post({"content-type": BATCH}, b"[not json")[0] == 400
    assert ing.counts == {"rejected": MAX_BATCH_EVENTS + 2}


def test_an_unknown_inference_service_is_not_given_to_the_default_model():
    """With several models, `default_model` took every unknown InferenceService's events, so another
    service's payloads fed that model's drift windows and accuracy estimate."""
    import dataclasses

    from proxy_helpers import make_config

    from sentinel.config import ModelConfig
    from sentinel.proxy.sidecar import Sidecar

    models = (ModelConfig(name="digits", version="v3", protocol="v2"), ModelConfig(name="mnist", version="v1"))
    sc = Sidecar(dataclasses.replace(make_config("http://127.0.0.1:1", models=models), default_model="digits"))
    assert sc._model_for_service("digits")[0] == "digits"
    assert sc._model_for_service("mnist")[0] == "mnist"
    assert sc._model_for_service("someone-elses-service") is None
    one = Sidecar(make_config("http://127.0.0.1:1"))   # one model: any service name is it
    assert one._model_for_service("digits-predictor")[0] == "digits"


@pytest.mark.parametrize("ctype", [STRUCTURED, BATCH])
def test_a_json_envelope_too_large_to_parse_on_the_event_loop_is_refused_naming_binary_mode(ctype):
    """A 4 MB structured event was parsed and re-encoded on the proxy's event loop (~200 ms stall)."""
    import time

    ing = _Ingest()
    data = [[0.5] * 1000] * 500   # ~2.5 MB of JSON numbers
    doc = {"specversion": "1.0", "id": "a", "type": REQUEST_TYPE, "source": "x", "data": data}
    body = json.dumps(doc if ctype == STRUCTURED else [doc]).encode()
    assert len(body) > STRUCTURED_MAX_BYTES
    t = time.perf_counter()
    status, reply = ing.post({"content-type": ctype}, body)
    assert time.perf_counter() - t < 0.02   # refused before parsing
    assert status == 400 and "binary-mode" in reply["error"]
    assert ing.counts == {"rejected": 1}
    # the same payload in binary mode is taken (its body is never parsed here)
    status, _ = ing.post(*to_binary(_event("a", REQUEST_TYPE, json.dumps(data).encode())))
    assert status == 200


def test_the_sidecars_own_canary_requests_and_their_answers_are_never_analysed():
    """KServe's logger reports the canary's golden replays like any traffic: they fed the drift
    windows and the accuracy estimate (easy, known-good inputs that dilute a shift)."""
    canary_body = b'{"instances": [[0.0, 1.0]]}'
    ing = _Ingest(canary=lambda model, body: model == "digits" and body == canary_body, max_bytes=1 << 20)

    def post(ev_id, ce_type, body, now):
        return ing.post(*to_binary(_event(ev_id, ce_type, body)), now=now)

    assert post("c1", REQUEST_TYPE, canary_body, 0.0)[0] == 200
    assert post("c1", RESPONSE_TYPE, RESP, 0.1)[1]["status"].startswith("not analysed")
    assert ing.counts == {"canary": 2} and len(ing.join) == 0 and ing.submitted == []
    # the answer first (logger workers race): it waits, then goes when the canary request comes
    post("c2", RESPONSE_TYPE, RESP, 1.0)
    post("c2", REQUEST_TYPE, canary_body, 1.1)
    assert ing.counts == {"canary": 3, "accepted": 1, "orphaned": 1} and len(ing.join) == 0
    # client traffic still joins
    post("t1", REQUEST_TYPE, b'{"instances": [[1.0, 0.0]]}', 2.0)
    assert post("t1", RESPONSE_TYPE, RESP, 2.1)[1]["status"] == "joined"
    assert len(ing.submitted) == 1
