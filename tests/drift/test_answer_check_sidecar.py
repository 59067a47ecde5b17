"""The answer check (`consistency`, `output_shift`) through the sidecar's own analysis path.

`ModelMonitor` (what the analysis worker runs) fed one sampled request at a time, shaped as in
tests/gate/test_gate_e2e.py: window 100, evaluate_every 50, alpha 0.01, persistence 2, the shadow on
behind its rate cap. Real model outputs (digits:v3 and its reference), real golden set, holdout digits
in load_digits order (writer-grouped, as the e2e sends them).

The check was first landed with the shadow's embeddings paired to the served classes by their count:
past the shadow's rate cap, its embedding window holds the last 100 samples it *ran on*, which span
more traffic than the 100 outputs, yet has as many rows once both are full. Every answer then met
another sample's embedding, nine in ten "disagreed", and a healthy replica read `output_shift` with a
lower bound near 0 (the e2e: combined alarm up 64% of the window). The monitor now keeps the signatures
and shadow projections paired with the outputs row by row (NaN where the shadow skipped a sample).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
E2E_REPLICA = [0] + list(range(30, 480))      # one request before the main traffic, then bodies[30:480]


@pytest.fixture(scope="module")
def sidecar():
    from sentinel.analysis.contract import DecodedBatch
    from sentinel.analysis.monitor import ModelMonitor
    from sentinel.analysis.shadow import ReferenceOutputs, ReferenceRunner
    from sentinel.config import DriftConfig
    from sentinel.golden import golden_for
    from sentinel.registry import open_registry
    from sentinel.training.digits import load_split

    entry = open_registry(None, None).resolve("digits:v3")
    golden = golden_for(entry, REPO / "golden_sets")
    images, labels, split = load_split()
    hold = np.asarray(split["holdout"])
    raw, y = images[hold].astype(np.float32), labels[hold]
    net = entry.manifest.preprocessing.apply(raw)
    ref = ReferenceRunner(entry, check_inputs=golden.inputs[:8], threads=1).run(net)
    index = {hashlib.sha1(np.ascontiguousarray(r, np.float32).tobytes()).hexdigest(): i for i, r in enumerate(net)}

    class Runner:
        """The reference's outputs, looked up (the monitor calls `run` on the inputs it shadows)."""

        backend, note = "test", ""

        def run(self, x):
            at = [index[hashlib.sha1(np.ascontiguousarray(r, np.float32).tobytes()).hexdigest()] for r in x]
            return ReferenceOutputs(ref.logits[at], ref.embeddings[at])

        def measure_throughput(self, x):
            return 1000.0

    class Bucket:
        """The shadow's rate cap: refuses the samples `refuse` marks."""

        refuse = False

        def take(self, n):
            return 0 if self.refuse else n

    def run(served, order=E2E_REPLICA, refuse=None, shadow=True, **drift):
        cfg = DriftConfig(**{"window_size": 100, "evaluate_every": 50, "alpha": 0.01, "persistence": 2,
                             "shadow": shadow, **drift})
        mon = ModelMonitor("digits", entry, golden, cfg, runner=Runner() if shadow else None)
        bucket = Bucket()
        if shadow:
            mon._bucket = bucket
        evals = []
        for j, i in enumerate(order):
            bucket.refuse = bool(refuse is not None and refuse[j])
            before = mon.windows
            mon.observe(DecodedBatch(model="digits", inputs=raw[i:i + 1].copy(), input_form="raw",
                                     outputs=served[i:i + 1], output_kind="logits"))
            if mon.windows > before:
                evals.append(mon.last)
        return evals, mon

    return run, np.asarray(ref.logits, np.float64), y


def _refusals(n: int, seed: int) -> np.ndarray:
    """A rate cap's pattern: runs of 3-20 refused samples every 5-30 (about 40% of the traffic)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, bool)
    i = 0
    while i < n:
        i += int(rng.integers(5, 30))
        k = int(rng.integers(3, 20))
        out[i:i + k] = True
        i += k
    return out


def _full(evals):
    return [e for e in evals if e["n"] == 100]


def _det(e, name):
    return next(d for d in e["detectors"] if d["name"] == name)


@pytest.mark.parametrize("start,seed", [(None, 1), (None, 2), (250, 3), (400, 4)])
def test_a_healthy_replica_behind_a_rate_capped_shadow_raises_no_alarm(sidecar, start, seed):
    """The gate e2e's healthy v3 replica: the same model's answers, the shadow skipping samples in runs.
    The answer check runs on every full window (in both spaces it has rows for) and stays quiet; the
    combined alarm never persists, and the estimate stays reliable. Before the rows were paired, the
    consistency p-value was 0 in 80-90% of such windows (output_shift, lower bound ~0.02)."""
    run, served, y = sidecar
    order = E2E_REPLICA if start is None else [(start + k) % len(y) for k in range(451)]
    refuse = _refusals(len(order), seed)
    evals, mon = run(served, order, refuse)
    assert mon.counts.get("shadow_skipped", 0) > 100           # the shadow did skip (its window spans more)
    full = _full(evals)
    assert len(full) == 8
    for e in full:
        c = _det(e, "consistency")
        assert c["p_value"] is not None and c["p_value"] == c["p_value"], e   # ran: not abstained
        assert not c["alarm"] and c["p_value"] > 0.05, c
        assert e["accuracy_estimate_reliable"] is True, e["accuracy_estimate_unreliable_reason"]
        assert e["diagnosis"]["kind"] != "output_shift"
        assert e["estimated_accuracy"]["atc_lower"] > 0.9
    assert not any(e["alarm"] for e in evals)                  # persistence 2: never two disjoint alarms


def test_paired_rows_are_what_the_answer_check_reads(sidecar):
    """Straight from the suite: a window whose shadow embeddings are other samples' rows (as many as the
    outputs) is not read as answers that changed when the rows paired with the outputs are given."""
    from dataclasses import replace

    from sentinel.drift import Window

    run, served, y = sidecar
    _, mon = run(served, E2E_REPLICA[:301], refuse=_refusals(301, 5))
    w = Window(logits=mon.logits.values(), input_stats=mon.input_stats.values(), embeddings=mon.embeddings.values(),
               signatures=mon.signatures.values(), violating=mon.violating.values()[:, 0] > 0.5,
               verdicts=mon.verdicts.values()[:, 0].astype(np.int8), row_signatures=mon.row_signatures.values(),
               row_embeddings=mon.row_embeddings.values())
    assert len(w.embeddings) == len(w.logits) == 100                            # same count, other samples
    assert np.isnan(w.row_embeddings).all(axis=1).sum() > 20                   # where the shadow skipped
    v = mon.suite.evaluate(w)
    assert not _det_r(v, "consistency").alarm and v.inconsistent_share == 0.0 and v.reliable
    # an offline window (no paired rows) of the same length is paired by position: its own rows agree
    emb = np.where(np.isnan(w.row_embeddings), 0.0, w.row_embeddings)
    off = replace(w, row_signatures=None, row_embeddings=None, embeddings=emb)
    assert set(mon.suite._answers(off, mon.suite._outputs(off))) == {"signature", "embedding"}


def _det_r(v, name):
    return next(r for r in v.detectors if r.name == name)


def _faults(served: np.ndarray) -> dict[str, np.ndarray]:
    """Answer changes none of the round-8 probe rows has: another permutation of the label map, one
    other pair swapped, an off-by-one map on 30% of the traffic."""
    perm = np.array([3, 7, 0, 9, 5, 1, 8, 2, 4, 6])
    part = np.random.default_rng(11).random(len(served)) < 0.3
    return {"permutation": served[:, perm], "swap_1_7": served[:, [0, 7, 2, 3, 4, 5, 6, 1, 8, 9]],
            "off_by_one_30pct": np.where(part[:, None], np.roll(served, 1, axis=1), served)}


@pytest.mark.parametrize("fault", ["off_by_one", "permutation", "swap_1_7", "off_by_one_30pct"])
def test_answers_that_changed_are_flagged_through_the_sidecar(sidecar, fault):
    """The same inputs, other answers, through the sidecar with its shadow rate-capped: the consistency
    detector alarms, the combined alarm persists, the diagnosis is output_shift (covariate_shift when the
    writer-grouped inputs also moved the input statistics), and the estimate is unreliable with a lower
    bound not over the truth. Before: no detector alarmed on a label map off by one in most windows and
    the bound read 0.97-0.98 at a true accuracy of 0.002."""
    run, clean, y = sidecar
    served = np.roll(clean, 1, axis=1) if fault == "off_by_one" else _faults(clean)[fault]
    evals, _ = run(served, refuse=_refusals(len(E2E_REPLICA), 7))
    full = _full(evals)
    truth = float(np.mean(served[E2E_REPLICA].argmax(axis=1) == y[E2E_REPLICA]))
    assert truth < 0.85                                          # the fault costs accuracy
    assert all(_det(e, "consistency")["alarm"] for e in full)
    assert sum(e["alarm"] for e in full) >= len(full) - 1          # persistence 2: from the second window on
    kinds = [e["diagnosis"]["kind"] for e in full]
    assert kinds.count("output_shift") >= len(full) - 1 and set(kinds) <= {"output_shift", "covariate_shift"}
    assert all(e["accuracy_estimate_reliable"] is False for e in full)
    assert np.mean([e["estimated_accuracy"]["atc_lower"] for e in full]) <= truth + 0.05


def test_without_a_shadow_the_signature_vote_still_flags_a_label_map_off_by_one(sidecar):
    """No shadow (drift.shadow off): the input-signature neighbourhood alone (golden's own agreement
    0.76, against the window's) still sees every answer moved by one."""
    run, clean, y = sidecar
    evals, _ = run(np.roll(clean, 1, axis=1), shadow=False)
    full = _full(evals)
    assert all(_det(e, "consistency")["alarm"] and _det(e, "consistency")["feature"] == "signature" for e in full)
    assert all(e["accuracy_estimate_reliable"] is False for e in full)
    assert max(e["estimated_accuracy"]["atc_lower"] for e in full) < 0.2
