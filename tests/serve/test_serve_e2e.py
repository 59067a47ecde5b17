"""`sentinel serve` as a real kserve process: v1, v2 JSON/binary, TorchServe route, errors, shutdown."""

from __future__ import annotations

import json
import signal

import httpx
import numpy as np
import pytest
from servers import start_model_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with start_model_server("digits:v3") as url:
        yield url


def _v2_binary(url: str, x: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    data = x.astype("<f4").tobytes()
    req = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                       "parameters": {"binary_data_size": len(data)}}],
           "parameters": {"binary_data_output": True}}
    if outputs:
        req["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    head = json.dumps(req).encode()
    r = httpx.post(f"{url}/v2/models/digits/infer", content=head + data,
                   headers={"Inference-Header-Content-Length": str(len(head)),
                            "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    doc = json.loads(r.content[:n])
    out, off = {}, n
    for o in doc["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(r.content[off:off + size], "<f4").reshape(o["shape"])
        off += size
    return out


def test_v2_json_raw_inputs_match_the_golden_reference(server, digits_golden):
    raw = digits_golden.raw[:4]
    body = {"inputs": [{"name": "input", "shape": [4, 8, 8], "datatype": "FP32", "data": raw.ravel().tolist()}]}
    r = httpx.post(f"{server}/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    outs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    assert set(outs) == {"probabilities", "logits"}
    np.testing.assert_allclose(outs["probabilities"], digits_golden.probabilities[:4], atol=1e-5)
    np.testing.assert_allclose(outs["logits"], digits_golden.logits[:4], atol=1e-4)


def test_v2_binary_network_shaped_inputs_and_requested_outputs(server, digits_golden):
    x = digits_golden.inputs[:3]
    outs = _v2_binary(server, x, outputs=["logits"])
    assert set(outs) == {"logits"}
    np.testing.assert_allclose(outs["logits"], digits_golden.logits[:3], atol=1e-4)


def test_v1_predictions_are_probabilities(server, digits_golden):
    r = httpx.post(f"{server}/v1/models/digits:predict", json={"instances": digits_golden.raw[:2].tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], digits_golden.probabilities[:2], atol=1e-5)


def test_torchserve_route_single_instance(server, digits_golden):
    r = httpx.post(f"{server}/predictions/digits", json=digits_golden.raw[0].tolist())
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json(), digits_golden.probabilities[0], atol=1e-5)


def test_wrong_shape_is_a_400_naming_the_expected_shapes(server):
    r = httpx.post(f"{server}/v1/models/digits:predict", json={"instances": [[1.0, 2.0, 3.0]]})
    assert r.status_code == 400
    assert "8×8" in r.text and "1×32×32" in r.text


def test_error_ratio_answers_500_and_sigterm_exits_cleanly(digits_golden):
    with start_model_server("digits:v3", error_ratio=1.0) as url:
        r = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": digits_golden.raw[:1].tolist()})
        assert r.status_code == 500
        assert "injected fault" in r.text
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        proc = url.process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, url.log()[-2000:]
