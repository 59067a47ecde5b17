"""Limits from the config, the burst-limited log, the /ingest secret: pure and fast."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from sentinel.config import AnalysisConfig, Config, ModelConfig, ProxyConfig
from sentinel.errors import ConfigError
from sentinel.proxy.context import BurstLog, Limits

pytestmark = pytest.mark.unit


def test_limits_follow_the_config_and_the_admin_gets_its_own_budget():
    p = ProxyConfig(request_head_timeout_s=3, upstream_timeout_s=7, max_connections=99, admin_max_connections=5)
    lim, admin = Limits.from_config(p), Limits.from_config(p, admin=True)
    assert (lim.head_timeout, lim.ttfb, lim.max_connections) == (3, 7, 99)
    assert admin.max_connections == 5 and admin.head_timeout == 3
    assert 0.05 <= lim.tick <= 1.0
    assert b"retry-after: 1" in lim.shed_response() and lim.shed_response().startswith(b"HTTP/1.1 503 ")


@pytest.mark.parametrize("field,value", [("request_head_timeout_s", 0), ("send_timeout_s", -1),
                                         ("max_header_bytes", 100), ("max_connections", 0)])
def test_bad_limits_are_named(field, value):
    problems = dict(dataclasses.replace(ProxyConfig(), **{field: value}).validate())
    assert field in problems


def test_burst_log_reports_once_per_window_with_the_count_in_between(caplog):
    now = [0.0]
    b = BurstLog(logging.getLogger("t"), window_s=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    assert b.warn("connection_limit", "full")
    assert not any(b.warn("connection_limit", "full") for _ in range(99))
    assert b.warn("request_head_timeout", "slow")     # another kind is its own burst
    now[0] = 61
    assert b.warn("connection_limit", "full")
    assert len(caplog.records) == 3 and "99 more since the last report" in caplog.records[-1].getMessage()


def test_ingest_token_from_a_file(tmp_path):
    from sentinel.proxy.sidecar import read_ingest_token

    base = Config(models=(ModelConfig(name="digits", version="v3"),), source=str(tmp_path / "s.yaml"))
    assert read_ingest_token(base) is None
    (tmp_path / "token").write_text("s3cret\n")
    cfg = dataclasses.replace(base, analysis=AnalysisConfig(ingest_token_file="token"))
    assert read_ingest_token(cfg) == b"s3cret"
    assert read_ingest_token(dataclasses.replace(base, analysis=AnalysisConfig(ingest_token="t"))) == b"t"
    (tmp_path / "token").write_text("")
    with pytest.raises(ConfigError, match="ingest_token_file"):
        read_ingest_token(cfg)


def test_a_connection_cap_below_the_worker_count_is_named():
    """The cap is split over the proxy processes, each holding at least one: a cap of 2 over 4
    workers let 4 connections in."""
    problems = dict(ProxyConfig(workers=4, max_connections=2).validate())
    assert "at least proxy.workers (4)" in problems["max_connections"]
    assert "max_connections" not in dict(ProxyConfig(workers=4, max_connections=4).validate())
