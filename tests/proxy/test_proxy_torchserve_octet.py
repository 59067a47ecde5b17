"""TorchServe requests with a raw float32 application/octet-stream body reach analysis decoded.

`sentinel serve` accepts them (shaped by the model's raw input); the sidecar's decoder
shapes them the same way, from the config's raw_input_shape or the registry's raw_input.
"""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import pytest
from proxy_helpers import RunningSidecar, Upstream, make_config

from sentinel import metricnames as mn
from sentinel.config import ModelConfig

SAMPLES = mn.SAMPLES.sample_name


def _sidecar_config(upstream: str, **model_kw) -> object:
    model = ModelConfig(name="digits", version="v3", protocol="torchserve", **model_kw)
    cfg = make_config(upstream, rate=1.0, models=(model,))
    return dataclasses.replace(cfg, registry="/nonexistent-registry")   # only the config may say the shape


@pytest.mark.slow
def test_octet_stream_tensor_is_decoded_with_the_configured_raw_shape():
    x = np.random.default_rng(1).random((2, 8, 8)).astype("<f4")
    with Upstream() as up, RunningSidecar(_sidecar_config(up.url, raw_input_shape=(8, 8))) as sc:
        r = httpx.post(f"{sc.url}/predictions/digits", content=x.tobytes(),
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200
        assert up.seen[-1]["body"] == x.tobytes()          # passed through unchanged
        assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "decoded"}, 1) == 1
        assert sc.value(SAMPLES, {"model": "digits", "outcome": "rejected"}) == 0


@pytest.mark.slow
def test_octet_stream_without_a_known_shape_is_rejected_with_a_reason_and_the_proxy_serves_on():
    x = np.zeros((1, 8, 8), "<f4")
    with Upstream() as up, RunningSidecar(_sidecar_config(up.url)) as sc:
        r = httpx.post(f"{sc.url}/predictions/digits", content=x.tobytes(),
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200
        assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "rejected"}, 1) == 1
        r = httpx.post(f"{sc.url}/predictions/digits", json=x[0].tolist())
        assert r.status_code == 200
        assert sc.wait_for(SAMPLES, {"model": "digits", "outcome": "decoded"}, 1) == 1
