"""A sampled pair decoded with the hints the worker builds (`hints_for`) and observed by the drift
monitor: what the analysis counts is what the client sent and the model answered, row by row."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from testpaths import REPO

from sentinel.config import Config, DriftConfig, ModelConfig
from sentinel.protocols import oip_v2

pytestmark = pytest.mark.slow   # builds the digits monitor (~5 s)

th = pytest.importorskip("tritonclient.http")


def test_a_channels_first_batch_with_one_nan_answer_is_analysed_row_by_row():
    from sentinel.analysis.monitor import build_monitor
    from sentinel.protocols.hints import hints_for
    from sentinel.proxy.worker import decode
    from sentinel.training.digits import load_split

    if not (REPO / "golden_sets/digits/v3").is_dir():
        pytest.skip("digits:v3 golden set not present")
    cfg = Config(models=(ModelConfig("digits", "v3", protocol="v2"),), registry=str(REPO / "models"),
                 golden_sets=str(REPO / "golden_sets"),
                 drift=DriftConfig(window_size=100, evaluate_every=50, shadow=False))
    x = load_split()[0][:4].astype(np.float32)[:, None]   # N×1×8×8 to an N×8×8 model
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, hlen = th.InferenceServerClient.generate_request_body([inp])
    logits = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    logits[2, 5] = np.nan
    rbody, rheaders = oip_v2.encode_response([("logits", logits)], binary=True)
    sample = SimpleNamespace(protocol="v2", request_body=body, request_headers={oip_v2.HEADER_LENGTH: str(hlen)},
                             response_body=rbody, response_headers=rheaders, source="proxy", request_id="1",
                             timestamp=0.0)
    batch, err = decode(sample, "digits", hints_for(cfg, cfg.models[0]))
    # before: the response rejected whole (nonfinite_output) and the inputs read as a network tensor
    assert err is None and batch.input_form == "raw" and batch.inputs.shape == (4, 8, 8)
    ups = build_monitor(cfg, cfg.models[0]).observe(batch)
    counted = {(u.metric, tuple(sorted(u.labels.items()))): u.value for u in ups if u.op == "inc" and u.value}
    assert counted[("sentinel_drift_rejected_samples", (("model", "digits"), ("reason", "nonfinite_output")))] == 1
    assert sum(v for (m, _), v in counted.items() if m == "sentinel_predictions") == 3
    assert counted[("sentinel_input_contract_checked_samples", (("model", "digits"),))] == 4
    assert not any(m == "sentinel_drift_rejected_samples" and ("reason", "input_shape") in lbl for m, lbl in counted)
