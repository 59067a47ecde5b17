"""gRPC streams that open and never send, over real loopback sockets (the gRPC listener's slowloris)."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grpc"))

from grpc_helpers import GrpcUpstream, RunningSidecar, grpc_config, infer_request  # noqa: E402

from sentinel import metricnames as mn  # noqa: E402
from sentinel.proxy.grpc_proxy import INFER, STREAM_INFER  # noqa: E402

pytestmark = pytest.mark.slow   # starts a gRPC upstream and a sidecar


def test_streams_that_never_send_do_not_hold_every_slot_for_good():
    """max_concurrent_rpcs streams opened with no deadline and no message held their slots forever:
    every other call was shed UNAVAILABLE. The first message is bounded like a unary call's."""
    with GrpcUpstream() as up:
        cfg = grpc_config("http://127.0.0.1:9", up.address, max_concurrent_rpcs=2)
        cfg = dataclasses.replace(cfg, proxy=dataclasses.replace(cfg.proxy, body_idle_timeout_s=2.0))
        with RunningSidecar(cfg) as sc, grpc.insecure_channel(f"127.0.0.1:{sc.sc.grpc_address[1]}") as ch:
            release = threading.Event()

            def silent():
                release.wait(20)
                return
                yield   # a generator that sends nothing

            streams = [ch.stream_stream(STREAM_INFER)(silent()) for _ in range(2)]
            try:
                # both hold their slots before the normal call is tried (a call starts asynchronously)
                deadline = time.monotonic() + 5
                while sc.sc.grpc_proxy.inflight < 2:  # type: ignore[union-attr]
                    assert time.monotonic() < deadline, "the silent streams never opened"
                    time.sleep(0.01)
                deadline = time.monotonic() + 8
                while True:   # the silent streams are ended, so a normal call gets through
                    try:
                        reply = ch.unary_unary(INFER)(infer_request("digits"), timeout=5)
                        break
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                        assert time.monotonic() < deadline, "silent streams still hold every slot"
                        time.sleep(0.2)
                assert reply
                for s in streams:
                    with pytest.raises(grpc.RpcError) as ei:
                        next(s)
                    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert sc.value(mn.PROXY_ERRORS.sample_name, {"reason": "request_body_timeout"}) == 2
            finally:
                release.set()
