"""Hot-path invariants of issue 15: TCP_NODELAY both ways, bounded route cache, bound metric children."""

from __future__ import annotations

import socket

import httpx
from proxy_helpers import RunningSidecar, Upstream, make_config

from sentinel.proxy import server
from sentinel.proxy.metrics import ProxyMetrics

V2_BODY = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'


def test_nodelay_on_client_and_upstream_sockets_and_route_cache_bounded(monkeypatch):
    monkeypatch.setattr(server, "ROUTE_CACHE_SIZE", 16)
    with Upstream() as up, RunningSidecar(make_config(up.url)) as sc:
        with httpx.Client(base_url=sc.url) as c:
            assert c.post("/v2/models/digits/infer", content=V2_BODY).status_code == 200
            ctx = sc.sc.ctx   # type: ignore[union-attr]
            socks = [conn.transport.get_extra_info("socket") for conn in list(ctx.connections)]
            socks += [u.transport.get_extra_info("socket") for u in ctx.pool.idle]
            assert len(socks) >= 2
            for s in socks:   # small heads and bodies leave at once, not after Nagle's delay
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            for i in range(server.ROUTE_CACHE_SIZE + 10):   # distinct targets: the cache stays bounded
                c.get(f"/status?i={i}")
            assert len(ctx.routes) <= server.ROUTE_CACHE_SIZE
            r = c.post("/v2/models/digits/infer?x=1", content=V2_BODY)
            assert r.status_code == 200
        assert sc.value("sentinel_requests_total", {"model": "digits", "protocol": "v2", "code": "200"}) == 2


def test_bound_children_match_public_histogram():
    """The direct-write path gives the same exposition as prometheus_client's own observe."""
    fast, slow = ProxyMetrics({"m": "m"}, 4), ProxyMetrics({"m": "m"}, 4)
    for secs in (0.0, 0.0005, 0.005, 0.1, 2.5, 1e9):
        fast.observe_request("m", "v2", "200", secs, "ab" * 16)
        slow.duration.labels("m", "v2", "200").observe(secs, {"trace_id": "ab" * 16})
        slow.requests.labels("m", "v2", "200").inc()
    assert fast._children[("m", "v2", "200")].fast

    def samples(m: ProxyMetrics) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): (s.value, s.exemplar and s.exemplar.labels)
                for fam in m.registry.collect() if fam.name.startswith("sentinel_request")
                for s in fam.samples if not s.name.endswith("_created")}

    assert samples(fast) == samples(slow)
