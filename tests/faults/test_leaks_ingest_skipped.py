"""Leak soak finding: keys of skipped /ingest halves (over sampling.max_bytes, the canary's own
requests) outlived the TTL once ingest traffic stopped.

`JoinTable.expire`, which the sidecar runs every second, dropped old pending halves but not old
skipped keys: those were only expired by the next skip or lookup, so after a burst of oversize
events the table kept up to `ingest_max_pending` keys for good instead of returning to empty
within `analysis.ingest_ttl_s`.
"""

from __future__ import annotations

import time
import urllib.request

import pytest

from sentinel.proxy.ingest import REQUEST_TYPE, Event, JoinTable, parse_event
from tests.proxy.proxy_helpers import RunningSidecar, Upstream, make_config


def _event(i: int, body: bytes = b"{}") -> Event:
    return parse_event({"ce-id": f"id-{i}", "ce-type": REQUEST_TYPE, "ce-inferenceservicename": "digits",
                        "content-type": "application/json"}, body)


@pytest.mark.unit
def test_expire_drops_skipped_keys_past_the_ttl() -> None:
    join = JoinTable(ttl_s=1.0, max_pending=1024)
    for i in range(100):
        join.skip(_event(i), now=0.0, why="oversize")
    assert len(join._skipped) == 100
    join.expire(now=0.5)
    assert len(join._skipped) == 100   # within the TTL: kept, its partner may still come
    assert join.expire(now=2.0) == 0   # skipped keys are no orphans: not counted
    assert len(join._skipped) == 0
    assert len(join) == 0


def test_sidecar_forgets_skipped_ingest_keys_within_the_ttl() -> None:
    with Upstream() as up:
        cfg = make_config(up.url)   # analysis.ingest_ttl_s = 1.0, sampling.max_bytes = 4 MiB
        with RunningSidecar(cfg) as rs:
            big = b"[" + b"0," * (cfg.sampling.max_bytes // 2) + b"0]"   # over sampling.max_bytes
            for i in range(5):
                req = urllib.request.Request(rs.admin_url + "/ingest", data=big, method="POST", headers={
                    "Ce-Id": f"big-{i}", "Ce-Type": REQUEST_TYPE, "Ce-Specversion": "1.0", "Ce-Source": "t",
                    "Ce-Inferenceservicename": "digits", "Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert r.status == 200
            assert rs.value("sentinel_ingest_events_total", {"outcome": "oversize"}) == 5
            deadline = time.monotonic() + 5.0   # TTL 1 s + the 1 s expiry tick, with room to spare
            while rs.sc.join._skipped and time.monotonic() < deadline:   # type: ignore[union-attr]
                time.sleep(0.1)
            assert len(rs.sc.join._skipped) == 0   # type: ignore[union-attr]
