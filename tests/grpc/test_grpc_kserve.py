"""The sidecar's gRPC listener in front of a real kserve ModelServer (`sentinel serve --grpc-port`).

Driven with `tritonclient.grpc` (raw binary inputs) and kserve's own gRPC client and stubs:
responses are byte-identical through the sidecar and direct, the sidecar counts them with
protocol="grpc", and sampled ModelInfer pairs are decoded and reach the drift windows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_helpers import RunningSidecar

from sentinel import metricnames as mn
from sentinel.config import DriftConfig, GrpcConfig, ModelConfig, ReplayConfig
from sentinel.protocols import oip_grpc
from sentinel.proxy.grpc_proxy import INFER

REPO = Path(__file__).resolve().parents[2]
REQ = mn.REQUESTS.sample_name
SAMPLES = mn.SAMPLES.sample_name
WINDOWS = mn.DRIFT_WINDOWS.sample_name
REAL_MONITOR = "sentinel.analysis.monitor:build_monitor"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "models/digits/v3/model.yaml").is_file(), reason="digits:v3 not in the registry"),
    pytest.mark.skipif(importlib.util.find_spec("kserve") is None, reason="kserve (serve extra) not installed"),
    pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient not installed"),
]


def _digits(seed: int, n: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 8, 8), dtype=np.float32) * 16).astype(np.float32)


@pytest.fixture(scope="module")
def env():
    from proxy_helpers import make_config
    from servers import free_port, start_model_server

    gport = free_port()
    with start_model_server("digits:v3", extra_args=["--grpc-port", str(gport)]) as server_url:
        direct = f"127.0.0.1:{gport}"
        with grpc.insecure_channel(direct) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        url = str(server_url)
        cfg = make_config(url, rate=1.0, models=(ModelConfig(name="digits", version="v3", protocol="v2"),))
        cfg = dataclasses.replace(
            cfg, upstream=url, grpc_listen="127.0.0.1:0", grpc_upstream=direct, grpc=GrpcConfig(),
            registry=str(REPO / "models"), golden_sets=str(REPO / "golden_sets"),
            replay=ReplayConfig(canary_interval_s=0),
            drift=DriftConfig(window_size=10, evaluate_every=10, shadow=False,
                              detectors=("bbsd", "label", "confidence")))
        with RunningSidecar(cfg, monitor_factory=REAL_MONITOR) as sc:
            yield direct, f"127.0.0.1:{sc.sc.grpc_address[1]}", sc


# tritonclient and kserve both register `inference.*` in protobuf's default descriptor pool, so
# one process cannot import both: the Triton client runs in a process of its own.
TRITON_CLIENT = """
import sys, numpy as np, tritonclient.grpc as tg
x = (np.random.default_rng(1).random((2, 8, 8), dtype=np.float32) * 16).astype(np.float32)
client = tg.InferenceServerClient(sys.argv[1])
assert client.is_server_live() and client.is_model_ready("digits")
inp = tg.InferInput("input-0", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
res = client.infer("digits", [inp], request_id="t-1", client_timeout=30)
assert res.as_numpy("probabilities").shape == (2, 10)
sys.stdout.write(res.get_response().SerializeToString().hex())
"""


def _triton(addr: str) -> bytes:
    r = subprocess.run([sys.executable, "-c", TRITON_CLIENT, addr], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return bytes.fromhex(r.stdout)


def test_tritonclient_raw_inputs_identical_through_sidecar(env):
    direct, proxied, sc = env
    d, p = _triton(direct), _triton(proxied)
    assert p == d and len(p) > 100
    assert sc.wait_for(REQ, {"model": "digits", "protocol": "grpc", "code": "200"}, 1, timeout=5) >= 1


def test_raw_bytes_identical_with_kserve_stub_messages(env):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    direct, proxied, _ = env
    req = pb.ModelInferRequest(model_name="digits", id="k-1")
    req.inputs.add(name="input-0", datatype="FP32", shape=[1, 8, 8])
    req.raw_input_contents.append(_digits(2).tobytes())
    body = req.SerializeToString()
    got = []
    for addr in (direct, proxied):
        with grpc.insecure_channel(addr) as ch:
            got.append(ch.unary_unary(INFER)(body, timeout=30))
    assert got[0] == got[1]
    resp = pb.ModelInferResponse.FromString(got[1])
    assert resp.id == "k-1" and [o.name for o in resp.outputs] == ["probabilities", "logits"]
    # our codec reads what kserve wrote
    out = oip_grpc.decode_response(got[1], {})
    assert out.outputs.shape == (1, 10) and out.kind == "probabilities"


def test_kserve_inference_grpc_client(env):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    direct, proxied, _ = env
    x = _digits(3)

    async def ask(addr: str):
        inp = InferInput(name="input-0", shape=list(x.shape), datatype="FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        async with InferenceGRPCClient(addr, retries=0) as client:
            resp = await client.infer(InferRequest(model_name="digits", infer_inputs=[inp], request_id="ks-1"))
            return resp.to_grpc().SerializeToString(), resp.outputs[0].as_numpy()

    d, p = asyncio.run(ask(direct)), asyncio.run(ask(proxied))
    assert d[0] == p[0]
    np.testing.assert_array_equal(d[1], p[1])


def test_errors_pass_through_with_the_same_status(env):
    direct, proxied, sc = env
    body = oip_grpc.encode([("input-0", np.zeros((1, 3), np.float32))], model_name="digits")
    errs = []
    for addr in (direct, proxied):
        with grpc.insecure_channel(addr) as ch, pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(INFER)(body, timeout=30)
        errs.append((ei.value.code(), ei.value.details()))
    assert errs[0] == errs[1] and errs[0][0] != grpc.StatusCode.OK
    from sentinel.proxy.grpc_proxy import code_label

    assert sc.wait_for(REQ, {"model": "digits", "protocol": "grpc", "code": code_label(errs[0][0])}, 1,
                       timeout=5) >= 1


def test_sampled_grpc_pairs_are_decoded_and_reach_drift(env):
    _, proxied, sc = env
    decoded0 = sc.value(SAMPLES, {"model": "digits", "outcome": "decoded"})
    with grpc.insecure_channel(proxied) as ch:
        call = ch.unary_unary(INFER)
        for i in range(12):
            call(oip_grpc.encode([("input-0", _digits(100 + i))], model_name="digits", id=f"d{i}"), timeout=30)
    assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "decoded"}, decoded0 + 12, timeout=60) >= decoded0 + 12
    assert sc.value(SAMPLES, {"model": "digits", "outcome": "rejected"}) == 0
    assert sc.wait_for(WINDOWS, {"model": "digits"}, 1, timeout=60) >= 1


def _replay(*args: str) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "sentinel", "replay", "--model", "digits:v3", "--registry",
                           str(REPO / "models"), "--json", "-", "--quiet", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=180, env=env)


def test_replay_protocol_grpc_direct_and_through_sidecar(env):
    import json

    direct, proxied, sc = env
    before = sc.value(REQ, {"model": "digits", "protocol": "grpc", "code": "200"})
    for addr in (direct, f"grpc://{proxied}"):
        r = _replay("--protocol", "grpc", "--target", addr, "--rate", "40", "--count", "16")
        assert r.returncode == 0, r.stderr[-2000:]
        doc = json.loads(r.stdout)
        assert doc["protocol"] == "grpc" and doc["target"].endswith("/inference.GRPCInferenceService/ModelInfer")
        assert doc["sent"] == doc["answered"] == 16 and doc["errors"] == 0, doc["errors_by_kind"]
        assert doc["top1_agreement"] == 1.0 and doc["latency_ms"]["corrected"]["p99"] > 0
    assert sc.wait_for(REQ, {"model": "digits", "protocol": "grpc", "code": "200"}, before + 16, timeout=5) >= before + 16


def test_replay_protocol_grpc_unreachable_is_exit_2():
    from servers import free_port

    r = _replay("--protocol", "grpc", "--target", f"127.0.0.1:{free_port()}", "--count", "2")
    assert r.returncode == 2 and "unreachable" in r.stderr


def test_canary_over_grpc(env):
    from prometheus_client import CollectorRegistry

    from sentinel.config import Config
    from sentinel.replay.canary import Canary

    direct, _, _ = env
    cfg = Config(models=(ModelConfig("digits", "v3"),), registry=str(REPO / "models"),
                 golden_sets=str(REPO / "golden_sets"), grpc_upstream=direct,
                 replay=ReplayConfig(canary_samples=6, canary_rate=20.0, protocol="grpc"))
    reg = CollectorRegistry()
    run = Canary.from_config(cfg, "digits", reg).run_once()
    assert (run.sent, run.errors, run.agreed) == (6, 0, 6)
    assert reg.get_sample_value(mn.REPLAY_REQUESTS.sample_name, {"model": "digits", "result": "ok"}) == 6


def test_daemon_canary_over_grpc(env):
    """replay.protocol: grpc — the daemon's canary thread calls grpc_upstream while its own gRPC listener runs."""
    from proxy_helpers import make_config

    direct, _, running = env
    http_url = running.config.upstream   # the canary polls the model's HTTP readiness endpoint first
    cfg = dataclasses.replace(
        make_config(http_url, models=(ModelConfig("digits", "v3", endpoint=http_url),)),
        grpc_listen="127.0.0.1:0", grpc_upstream=direct,
        registry=str(REPO / "models"), golden_sets=str(REPO / "golden_sets"),
        replay=ReplayConfig(canary_interval_s=600, canary_samples=4, canary_rate=20.0, protocol="grpc"))
    with RunningSidecar(cfg) as sc:
        ok = sc.wait_for(mn.REPLAY_REQUESTS.sample_name, {"model": "digits", "result": "ok"}, 4, timeout=60)
        assert ok == 4
        assert sc.value(mn.REFERENCE_AGREEMENT.sample_name,
                        {"model": "digits", "source": "replay", "result": "agree"}) == 4
        # canary calls go straight to the model server (with x-sentinel-canary), not through the listener
        assert sc.value(REQ, {"model": "digits", "protocol": "grpc", "code": "200"}) == 0
