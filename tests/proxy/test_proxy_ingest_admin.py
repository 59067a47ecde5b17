"""KServe logger CloudEvents on /ingest, and the admin endpoints."""

from __future__ import annotations

import httpx
import pytest
from proxy_helpers import RunningSidecar, Upstream, make_config, v2_response

from sentinel import metricnames as mn
from sentinel.proxy.ingest import (
    REQUEST_TYPE,
    RESPONSE_TYPE,
    Event,
    IngestError,
    JoinTable,
    parse_event,
)

INGEST = mn.INGEST_EVENTS.sample_name
V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'


def _ev(i: str, half: str) -> Event:
    return Event(i, half, "digits", {}, b"{}")  # type: ignore[arg-type]


def test_join_table_pairs_by_id():
    t = JoinTable(ttl_s=10, max_pending=10)
    assert t.add(_ev("a", "response"), 0.0) == (None, 0)
    pair, orphans = t.add(_ev("a", "request"), 1.0)
    assert pair is not None and pair[0].half == "request" and pair[1].half == "response" and orphans == 0
    assert len(t) == 0


def test_join_table_ttl_and_bound():
    t = JoinTable(ttl_s=5, max_pending=2)
    t.add(_ev("a", "request"), 0.0)
    t.add(_ev("b", "request"), 1.0)
    assert t.add(_ev("c", "request"), 2.0) == (None, 1)     # "a" evicted by the bound
    assert t.expire(6.5) == 1                                # "b" too old
    assert t.add(_ev("c", "request"), 7.0) == (None, 1)      # same half twice: the older is an orphan
    assert len(t) == 1


@pytest.mark.parametrize("headers,msg", [
    ({"ce-type": REQUEST_TYPE}, "Ce-Id"),
    ({"ce-id": "1", "ce-type": "com.example.other"}, "Ce-Type"),
])
def test_parse_event_errors(headers, msg):
    with pytest.raises(IngestError, match=msg):
        parse_event(headers, b"{}")


def _ce(i: str, ce_type: str) -> dict:
    return {"Ce-Id": i, "Ce-Type": ce_type, "Ce-Specversion": "1.0", "Ce-Source": "http://localhost:9081/",
            "Ce-Inferenceservicename": "digits", "Ce-Namespace": "default", "Ce-Endpoint": "digits-predictor",
            "Content-Type": "application/json"}


def test_ingest_joins_and_feeds_analysis():
    cfg = make_config("http://127.0.0.1:1")
    with Upstream() as up:
        import dataclasses
        with RunningSidecar(dataclasses.replace(cfg, upstream=up.url)) as sc:
            with httpx.Client(base_url=sc.admin_url) as c:
                r = c.post("/ingest", content=V2_BODY, headers=_ce("ev-1", REQUEST_TYPE))
                assert r.status_code == 200
                r = c.post("/ingest", content=v2_response(), headers=_ce("ev-1", RESPONSE_TYPE))
                assert r.status_code == 200 and r.json()["status"] == "joined"
                assert sc.value(INGEST, {"outcome": "joined"}) == 1
                assert sc.wait_for(mn.SAMPLES.sample_name, {"model": "digits", "outcome": "decoded"}, 1) == 1
                # a request whose response never comes is an orphan after the TTL (1 s here)
                c.post("/ingest", content=V2_BODY, headers=_ce("ev-2", REQUEST_TYPE))
                assert sc.wait_for(INGEST, {"outcome": "orphaned"}, 1, timeout=5) == 1
                r = c.post("/ingest", content=b"{}", headers={"Ce-Id": "x", "Ce-Type": "nope"})
                assert r.status_code == 400 and "Ce-Type" in r.json()["error"]
                assert sc.value(INGEST, {"outcome": "rejected"}) == 1
                assert c.get("/ingest").status_code == 405


def test_admin_endpoints():
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        with httpx.Client(base_url=sc.admin_url) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            st = c.get("/status").json()
            assert {"models_seen", "sampling", "analysis", "last_results", "inflight"} <= set(st)
            assert st["sampling"]["digits"]["rate"] == 0.0
            assert st["analysis"]["queue_capacity"] == 64
            assert c.get("/nope").status_code == 404
            assert c.post("/metrics").status_code == 405
