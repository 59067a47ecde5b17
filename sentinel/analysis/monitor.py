"""The per-model drift monitor the analysis process runs: windows, detectors, estimates, shadow agreement.

`build_monitor(config, model)` resolves the model's registry entry and golden set; a golden set
that fails its digest check (or is missing) yields a `RefusedMonitor` whose status says why,
so the other models' analysis goes on. `ModelMonitor.observe` turns each `DecodedBatch` into
`MetricUpdate`s: predictions and confidences per sample, and every `evaluate_every` samples
the detectors' p-values, statistics and alarms and the accuracy estimates on the last
`window_size` samples.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from sentinel import metricnames as mn
from sentinel.analysis.contract import DecodedBatch, MetricUpdate
from sentinel.metricnames import MAX_CLASS_LABELS

log = logging.getLogger(__name__)


class RefusedMonitor:
    """Stands in for a model whose analysis cannot start; observes nothing and says why."""

    def __init__(self, model: str, reason: str):
        self.model = model
        self.reason = reason

    def observe(self, batch: DecodedBatch) -> list[MetricUpdate]:
        return []

    def status(self) -> dict[str, Any]:
        return {"model": self.model, "state": "refused", "reason": self.reason}


def build_monitor(config, model):
    """The monitor for one configured model (a RefusedMonitor when its golden set is unusable)."""
    from sentinel.errors import IntegrityError, SentinelError
    from sentinel.golden import golden_for
    from sentinel.registry import Registry

    try:
        entry = Registry(config.resolve(config.registry), default_model=config.default_model).resolve(
            f"{model.name}:{model.version}")
    except SentinelError as exc:
        log.error("%s: drift analysis refused: %s", model.name, exc)
        return RefusedMonitor(model.name, f"model not in the registry: {exc}")
    try:
        golden = golden_for(entry, config.resolve(config.golden_sets))
    except IntegrityError as exc:
        log.error("%s: drift analysis refused: %s", model.name, exc)
        return RefusedMonitor(model.name, f"golden set failed its digest check: {exc}")
    except SentinelError as exc:
        log.error("%s: drift analysis refused: %s", model.name, exc)
        return RefusedMonitor(model.name, f"golden set unusable: {exc}")
    try:
        ModelMonitor.check_classes(model.name, entry, golden)
    except SentinelError as exc:              # model.yaml and golden set disagree on the class count
        log.error("%s: drift analysis refused: %s", model.name, exc)
        return RefusedMonitor(model.name, str(exc))
    runner, note = None, ""
    if config.drift.shadow:
        from sentinel.analysis.shadow import ReferenceRunner

        cache = config.resolve(config.drift.shadow_cache_dir) if config.drift.shadow_cache_dir else None
        try:
            runner = ReferenceRunner(entry, cache_dir=cache, check_inputs=golden.inputs[:8],
                                     check_outputs=(golden.logits[:8], golden.embeddings[:8]))
        except SentinelError as exc:          # e.g. weights failing their digest: drift goes on without shadow
            note = f"shadow off: the reference model cannot run: {exc}"
            log.error("%s: %s", model.name, note)
    mon = ModelMonitor(model.name, entry, golden, config.drift, runner=runner)
    mon.shadow_note = note
    return mon


class ModelMonitor:
    """Sliding windows and detectors of one model version, fed by decoded sampled traffic."""

    def __init__(self, name: str, entry, golden, drift, *, runner=None, clock=time.monotonic):
        from sentinel.drift import (
            Combination,
            Reference,
            Score,
            Settings,
            SlidingWindow,
            Suite,
            Univariate,
        )
        from sentinel.metricnames import confidence_buckets

        self.name = name
        self.entry = entry
        self.golden_path = str(golden.path)
        self.cfg = drift
        self.num_classes = self.check_classes(name, entry, golden)
        self.shadow_note = ""
        self.classes = tuple(entry.manifest.classes)
        self.suite = Suite(Reference.from_golden(golden), Settings(
            alpha=drift.alpha, detectors=tuple(drift.detectors), univariate=Univariate(drift.univariate),
            combination=Combination(drift.combination), pca_components=drift.pca_components,
            atc_score=Score(drift.atc_score), accuracy_recent=getattr(drift, "accuracy_recent", 50)))
        from sentinel.drift.support import SMALL_GOLDEN

        if self.suite.n_support is not None and self.suite.n_support < SMALL_GOLDEN:
            log.warning("%s: the golden set %s has %d samples; with fewer than %d the support checks also "
                        "flag clean samples (a few %% of each window), so clean traffic can read unknown and "
                        "its accuracy estimate be flagged unreliable: record a larger golden set",
                        name, self.golden_path, self.suite.n_support, SMALL_GOLDEN)
        self.input_shape = tuple(entry.manifest.input.shape)
        self.logits = SlidingWindow(drift.window_size, self.num_classes)
        n_stats = self.suite.input_stats.reference.shape[1] if self.suite.input_stats else 1
        self.input_stats = SlidingWindow(drift.window_size, n_stats)
        n_comp = self.suite.pca.n_components if self.suite.pca else 1
        self.embeddings = SlidingWindow(drift.window_size, n_comp)
        dg = self.suite.diagnoser
        self.signatures = SlidingWindow(drift.window_size, len(dg.signature.names) if dg else 1)
        self.violating = SlidingWindow(drift.window_size, 1)
        # The answer check pairs each served class with its own input's signature and shadow embedding:
        # these two take one row per output row (NaN where there is none), unlike `embeddings`, which
        # holds only the samples the shadow ran on (past its rate cap it skips some, and its window then
        # spans more traffic than the outputs').
        self.row_signatures = SlidingWindow(drift.window_size, self.signatures.width) if dg else None
        self.row_embeddings = SlidingWindow(drift.window_size, n_comp) if runner is not None and self.suite.pca \
            else None
        self.verdicts = SlidingWindow(drift.window_size, 1)
        self._counters_ready = False
        self._last_violations: np.ndarray | None = None
        self._last_untrusted: np.ndarray | None = None    # violations of what the network sees (not dtype)
        self._last_finite_in: np.ndarray | None = None    # per row of the last batch: a usable input (right
                                                          # shape, every value finite); None: no inputs
        est = self.suite.estimator
        self.confidence_buckets = confidence_buckets([est.confidence_threshold] if est else [])
        self.runner = runner
        self.shadow_rate = 0.0
        self.seen = 0                        # samples observed, for disjoint-window persistence
        self._combined_history: list[tuple[int, bool]] = []
        self._bucket = None
        if runner is not None:
            from sentinel.analysis.shadow import THROUGHPUT_SHARE, TokenBucket

            self.throughput = runner.measure_throughput(golden.inputs[:64])
            self.shadow_rate = min(drift.shadow_max_per_second, THROUGHPUT_SHARE * self.throughput)
            self._bucket = TokenBucket(self.shadow_rate, clock=clock)
        self._since = 0
        self.counts: dict[str, int] = {}
        self.error = ""
        self.last_max_abs_diff = math.nan
        self.last: dict[str, Any] | None = None
        self.windows = 0

    @staticmethod
    def check_classes(name: str, entry, golden) -> int:
        """The class count, after checking that model.yaml and the golden set agree on it (UsageError if not)."""
        from sentinel.errors import UsageError

        k = int(golden.probabilities.shape[1])
        if len(entry.manifest.classes) != k:
            raise UsageError(f"{name}: {entry.manifest_path} lists {len(entry.manifest.classes)} classes but golden "
                             f"set {golden.path} has {k} outputs per sample")
        return k

    def expect_classes(self, served_classes: int) -> None:
        """Raise UsageError naming both counts when the server's output width (e.g. from its metadata) differs."""
        from sentinel.errors import UsageError

        if served_classes != self.num_classes:
            raise UsageError(f"{self.name}: the server's output has {served_classes} classes but golden set "
                             f"{self.golden_path} has {self.num_classes}")

    # --- per batch ------------------------------------------------------------------------
    def observe(self, batch: DecodedBatch) -> list[MetricUpdate]:
        """Metric updates for one decoded batch (never raises on bad data: rejects and counts it)."""
        up: list[MetricUpdate] = []
        if not self._counters_ready:
            self._counters_ready = True
            up.extend(self._zero_counters())
        logits, finite_out = self._outputs(batch, up)
        if logits is None and batch.outputs is not None:
            return up
        x = self._inputs(batch, up)
        proj = None
        if x is not None and self.runner is not None:
            proj = self._shadow(x, batch, logits, finite_out, up)
        self._support(x, logits, finite_out, proj, up)
        # every observed row counts toward the cadence, usable or not: a stream of non-finite samples
        # must still produce evaluations that say so (not leave the last healthy one standing)
        new = len(finite_out) if finite_out is not None else (
            len(self._last_finite_in) if self._last_finite_in is not None else 0)
        self._since += new
        self.seen += new
        if new and self._since >= self.cfg.evaluate_every:
            self._since = 0
            up.extend(self.evaluate())
        return up

    def _reject(self, up: list[MetricUpdate], reason: str, n: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        up.append(MetricUpdate(mn.DRIFT_REJECTED.name, {"model": self.name, "reason": reason}, "inc", float(n)))

    def _outputs(self, batch: DecodedBatch, up: list[MetricUpdate]):
        from sentinel.drift.features import log_probabilities, softmax

        if batch.outputs is None:
            return None, None
        out = np.asarray(batch.outputs, dtype=np.float64)
        if out.ndim == 1:
            out = out[None]
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            got = out.shape[-1] if out.ndim else 0
            msg = (f"{self.name}: the server returns {got} classes per sample but golden set "
                   f"{self.golden_path} has {self.num_classes}; samples rejected")
            if msg != self.error:
                log.error("%s", msg)
            self.error = msg
            self._reject(up, "class_count_mismatch", len(out) if out.ndim else 1)
            return None, None
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            self._reject(up, "nonfinite_output", int((~finite).sum()))
        good = out[finite]
        logits = log_probabilities(good) if batch.output_kind == "probabilities" else good
        # one window row per observed sample, NaN where unusable (the suite drops such rows), so the
        # window is always the last `window_size` samples, not the last finite ones however old
        self.logits.push(logits if finite.all() else _rows(logits, finite))
        probs = good if batch.output_kind == "probabilities" else softmax(good)
        pred = probs.argmax(axis=1)
        conf = probs.max(axis=1)
        # One row (the usual sample): its class is the count; np.unique costs more than the rest here.
        counts = ([(int(pred[0]), 1)] if len(pred) == 1
                  else [(int(k), int(c)) for k, c in zip(*np.unique(pred, return_counts=True), strict=True)])
        for k, cnt in counts:
            up.append(MetricUpdate(mn.PREDICTIONS.name, {"model": self.name, "class": self._class_label(k)},
                                   "inc", float(cnt)))
        for c in conf.tolist():
            up.append(MetricUpdate(mn.PREDICTION_CONFIDENCE.name, {"model": self.name}, "observe", c))
        return logits, finite

    def _class_label(self, k: int) -> str:
        """The class index as a label (as the built-in monitor writes it); indices ≥ the cap fold into "other"."""
        return str(k) if k < MAX_CLASS_LABELS else "other"

    def buckets(self) -> dict[str, tuple[float, ...]]:
        """Histogram bounds this monitor needs: confidence with a bucket at the fitted ATC threshold."""
        return {mn.PREDICTION_CONFIDENCE.name: tuple(self.confidence_buckets)}

    def _inputs(self, batch: DecodedBatch, up: list[MetricUpdate]) -> np.ndarray | None:
        from sentinel.drift.features import input_statistics

        self._last_finite_in = None
        if batch.inputs is None:
            return None
        try:
            if batch.input_form == "raw":
                x = self.entry.manifest.preprocessing.apply(batch.inputs)
            else:
                x = np.asarray(batch.inputs, dtype=np.float32)
        except ValueError:
            x = None
        kind = np.asarray(batch.inputs).dtype.kind
        if x is None or x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            n_bad = len(batch.inputs) if np.ndim(batch.inputs) else 1
            self._reject(up, "input_shape", n_bad)
            self._contract_counts(up, n_bad, {"shape": n_bad}, n_bad)
            self._last_violations = self._last_untrusted = None
            self._last_finite_in = np.zeros(n_bad, bool)   # no row of it is usable
            if self.suite.input_stats is not None:
                self.input_stats.push(np.full((n_bad, self.input_stats.width), np.nan))
            return None
        viol = untrusted = None
        if self.suite.contract is not None:
            from sentinel.drift.inputcontract import check

            rep = check(self.suite.contract, x, dtype_kind=kind)
            self._contract_counts(up, rep.n, rep.counts(), int(rep.violating.sum()))
            viol, untrusted = rep.violating, rep.untrusted
        ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not ok.all():
            self._reject(up, "nonfinite_input", int((~ok).sum()))
            x = x[ok]
        # per row of the whole batch (rows with non-finite values included), aligned with the outputs
        self._last_finite_in = ok
        self._last_violations = viol
        self._last_untrusted = None if viol is None else untrusted
        if self.suite.input_stats is not None and len(ok):
            stats = input_statistics(x) if len(x) else np.zeros((0, self.suite.input_stats.reference.shape[1]))
            self.input_stats.push(stats if ok.all() else _rows(stats, ok))
        return x

    def _shadow(self, x: np.ndarray, batch: DecodedBatch, logits, finite_out, up: list[MetricUpdate]) -> None:
        from sentinel.drift.features import softmax

        k = self._bucket.take(len(x)) if self._bucket is not None else len(x)
        skipped = len(x) - k
        lbl = {"model": self.name}
        if skipped:
            self.counts["shadow_skipped"] = self.counts.get("shadow_skipped", 0) + skipped
            up.append(MetricUpdate(mn.SHADOW_SAMPLES.name, {**lbl, "outcome": "skipped"}, "inc", float(skipped)))
        if not k:
            return
        try:
            ref = self.runner.run(x[:k])
        except Exception as exc:  # noqa: BLE001 - a failing reference is counted, never fatal to analysis
            log.warning("%s: shadow reference failed: %s", self.name, exc)
            up.append(MetricUpdate(mn.SHADOW_SAMPLES.name, {**lbl, "outcome": "failed"}, "inc", float(k)))
            return
        proj = self.suite.project(ref.embeddings)
        if proj is not None:
            self.embeddings.push(proj)
        # Compare only when inputs and outputs are the same rows (all outputs finite, same count).
        if logits is None or finite_out is None or not finite_out.all() or len(finite_out) != len(x):
            return proj
        served = softmax(logits[:k])
        mine = softmax(ref.logits)
        agree = served.argmax(axis=1) == mine.argmax(axis=1)
        n_agree = int(agree.sum())
        self.counts["shadow_compared"] = self.counts.get("shadow_compared", 0) + k
        self.counts["shadow_agree"] = self.counts.get("shadow_agree", 0) + n_agree
        up.append(MetricUpdate(mn.SHADOW_SAMPLES.name, {**lbl, "outcome": "compared"}, "inc", float(k)))
        for result, n in (("agree", n_agree), ("disagree", k - n_agree)):
            if n:
                up.append(MetricUpdate(mn.REFERENCE_AGREEMENT.name, {**lbl, "source": "shadow", "result": result},
                                       "inc", float(n)))
        diff = float(np.abs(served - mine).max())
        self.last_max_abs_diff = diff
        up.append(MetricUpdate(mn.REFERENCE_MAX_ABS_DIFF.name, {**lbl, "source": "shadow"}, "set", diff))
        return proj

    def _zero_counters(self) -> list[MetricUpdate]:
        """Counters at 0 from the first sample on, so `increase()` sees the first violation or verdict."""
        from sentinel.drift.inputcontract import CHECKS
        from sentinel.drift.support import VERDICTS

        m = {"model": self.name}
        up = [MetricUpdate(mn.INPUT_CONTRACT_CHECKED.name, m, "inc", 0.0),
              MetricUpdate(mn.INPUT_CONTRACT_VIOLATING.name, m, "inc", 0.0)]
        up += [MetricUpdate(mn.INPUT_CONTRACT_VIOLATIONS.name, {**m, "check": c}, "inc", 0.0) for c in CHECKS]
        if self.suite.estimator is not None:
            up += [MetricUpdate(mn.ACCURACY_VERDICTS.name, {**m, "verdict": v}, "inc", 0.0) for v in VERDICTS]
        return up

    def _contract_counts(self, up: list[MetricUpdate], n: int, counts: dict[str, int], violating: int) -> None:
        m = {"model": self.name}
        up.append(MetricUpdate(mn.INPUT_CONTRACT_CHECKED.name, m, "inc", float(n)))
        if violating:
            up.append(MetricUpdate(mn.INPUT_CONTRACT_VIOLATING.name, m, "inc", float(violating)))
            self.counts["contract_violating"] = self.counts.get("contract_violating", 0) + violating
        for check_name, k in counts.items():
            if k:
                up.append(MetricUpdate(mn.INPUT_CONTRACT_VIOLATIONS.name, {**m, "check": check_name}, "inc", float(k)))

    def _support(self, x, logits, finite_out, proj, up: list[MetricUpdate]) -> None:
        """Signatures and support of the batch's inputs, and one ATC verdict per output row.

        Every row of the batch takes one row of the signature, violating and verdict windows, usable or
        not: a row with a non-finite input has a NaN signature, counts as violating and is `unknown`; a
        row with a non-finite output (a wrong answer to its client) is `likely_wrong` unless its input is
        untrusted. So a window of unusable samples says so instead of keeping older, healthy rows.
        """
        from sentinel.drift.support import UNKNOWN, VERDICTS, verdicts

        s = self.suite
        fin = self._last_finite_in
        ood = bad = None                          # per row of the whole batch, when inputs were decoded
        paired_sig = None                         # per row: its signature, NaN when violating
        if fin is not None and s.diagnoser is not None and s.input_support is not None:
            rows = len(fin)
            x = x if x is not None and len(x) == int(fin.sum()) else np.zeros((0,))
            sig = np.full((rows, len(s.diagnoser.signature.names)), np.nan)
            if len(x):
                sig[fin] = s.diagnoser.features(x)
            viol = self._last_violations if self._last_violations is not None and \
                len(self._last_violations) == rows else ~fin
            viol = viol | ~fin
            self.signatures.push(sig)
            paired_sig = np.where(viol[:, None], np.nan, sig)
            self.violating.push(viol.astype(np.float64)[:, None])
            ood = np.ones(rows, bool)
            if len(x):
                o = s.outside(sig[fin])
                if proj is not None and s.embedding_support is not None and len(proj):
                    k = min(len(proj), len(o))
                    o[:k] |= s.embedding_support.score(proj[:k]) > 1.0
                    if (logits is not None and finite_out is not None and finite_out.all() and fin.all()
                            and len(logits) == len(o)):
                        # an answer its input's golden neighbours contradict (a label map off by one,
                        # another model) is not trusted either (Suite.contradicted)
                        o[:k] |= s.contradicted(proj[:k], logits[:k])
                ood[fin] = o
            untrusted = self._last_untrusted if self._last_untrusted is not None and \
                len(self._last_untrusted) == rows else viol
            bad = untrusted | ~fin
        if finite_out is not None:
            self._push_paired(fin, paired_sig, proj, len(finite_out))
        if finite_out is None or s.estimator is None:
            return
        rows = len(finite_out)
        if not rows:
            return
        codes = np.full(rows, 1, np.int8)         # a non-finite output: a wrong answer
        if logits is not None and len(logits):
            codes[finite_out] = verdicts(s.estimator.scores(logits), s.estimator.threshold, None)
        if fin is None:
            pass                                  # inputs not decoded: the support cannot be checked
        elif ood is not None and bad is not None and len(ood) == rows:
            codes[ood | bad] = UNKNOWN
        else:
            codes[:] = UNKNOWN                    # inputs and outputs do not pair up row by row
        self.verdicts.push(codes.astype(np.float64)[:, None])
        for i, n in enumerate(np.bincount(codes.astype(np.int64), minlength=3)):
            if n:
                up.append(MetricUpdate(mn.ACCURACY_VERDICTS.name, {"model": self.name, "verdict": VERDICTS[i]},
                                       "inc", float(n)))

    def _push_paired(self, fin: np.ndarray | None, sig: np.ndarray | None, proj: np.ndarray | None,
                     rows: int) -> None:
        """One row per output row of the batch into the paired windows (see __init__): the input's
        signature and its shadow projection where the batch's inputs pair up with its outputs, else NaN."""
        paired = fin is not None and len(fin) == rows
        if self.row_signatures is not None:
            out = np.full((rows, self.row_signatures.width), np.nan)
            if paired and sig is not None and len(sig) == rows:
                out[:] = sig
            self.row_signatures.push(out)
        if self.row_embeddings is not None:
            emb = np.full((rows, self.row_embeddings.width), np.nan)
            if paired and proj is not None and len(proj):
                assert fin is not None
                at = np.flatnonzero(fin)[:len(proj)]        # the shadow ran on the first k usable inputs
                emb[at] = np.asarray(proj, np.float64)[:len(at)]
            self.row_embeddings.push(emb)

    # --- per window -----------------------------------------------------------------------
    def evaluate(self):
        """Run the detectors on the current windows; updates for every detector and the estimates."""
        from sentinel.drift import Window

        w = Window(logits=self.logits.values() if len(self.logits) else None,
                   input_stats=self.input_stats.values() if len(self.input_stats) else None,
                   embeddings=self.embeddings.values() if len(self.embeddings) else None,
                   signatures=self.signatures.values() if len(self.signatures) else None,
                   violating=self.violating.values()[:, 0] > 0.5 if len(self.violating) else None,
                   verdicts=self.verdicts.values()[:, 0].astype(np.int8) if len(self.verdicts) else None,
                   row_signatures=_values(self.row_signatures), row_embeddings=_values(self.row_embeddings))
        v = self.suite.evaluate(w)
        self.windows += 1
        up = [MetricUpdate(mn.DRIFT_WINDOWS.name, {"model": self.name}, "inc", 1.0)]
        persistent = self._persistent(v.combined.alarm)
        for r in (*v.detectors, v.combined):
            lbl = {"model": self.name, "detector": r.name}
            alarm = persistent if r is v.combined else r.alarm
            up.append(MetricUpdate(mn.DRIFT_P_VALUE.name, lbl, "set", r.p_value))
            up.append(MetricUpdate(mn.DRIFT_STATISTIC.name, lbl, "set", r.statistic))
            up.append(MetricUpdate(mn.DRIFT_ALARM.name, lbl, "set", 1.0 if alarm else 0.0))
        for method, value in v.estimated_accuracy.items():
            # NaN when the window has no finite output to estimate from: the gauge must not keep the
            # last healthy value (as the p-values of abstaining detectors are NaN)
            up.append(MetricUpdate(mn.ESTIMATED_ACCURACY.name, {"model": self.name, "method": method},
                                   "set", value if math.isfinite(value) else math.nan))
        from sentinel.drift.diagnosis import KINDS, TRANSFORMS

        d = v.diagnosis
        if d is not None:
            for kind in KINDS:
                up.append(MetricUpdate(mn.DRIFT_DIAGNOSIS.name, {"model": self.name, "kind": kind}, "set",
                                       1.0 if kind == d.kind else 0.0))
            for t in TRANSFORMS:
                up.append(MetricUpdate(mn.DRIFT_DIAGNOSIS_TRANSFORM.name, {"model": self.name, "transform": t},
                                       "set", 1.0 if t == d.transform else 0.0))
        if v.reliable is not None:
            up.append(MetricUpdate(mn.ACCURACY_ESTIMATE_RELIABLE.name, {"model": self.name}, "set",
                                   1.0 if v.reliable else 0.0))
            # How many samples the estimate rests on: the SLO rules skip estimates on too few.
            up.append(MetricUpdate(mn.ACCURACY_ESTIMATE_SAMPLES.name, {"model": self.name}, "set",
                                   float(sum(v.accuracy_verdicts.values()))))
        up += self._feature_means()
        # /status describes the very evaluation whose values the metrics above carry.
        self.last = {"window_id": self.windows, "samples_seen": self.seen, "n": v.n, "drift": v.drift,
                     "alarm": persistent, "combined": v.combined.to_dict(),
                     "detectors": [r.to_dict() for r in v.detectors],
                     "estimated_accuracy": {k: (x if math.isfinite(x) else None)
                                            for k, x in v.estimated_accuracy.items()},
                     "accuracy_verdicts": dict(v.accuracy_verdicts), "unknown_share": v.unknown_share,
                     "accuracy_estimate_reliable": v.reliable,
                     "accuracy_estimate_unreliable_reason": v.unreliable_reason,
                     "outside_share": v.outside_share, "samples": v.samples,
                     "diagnosis": None if d is None else d.to_dict()}
        return up

    def _feature_means(self) -> list[MetricUpdate]:
        """Live-window and golden means of each input statistic, for the debug dashboard."""
        test = self.suite.input_stats
        if test is None or not len(self.input_stats):
            return []
        live = np.asarray(self.input_stats.values(), np.float64)
        if live.ndim != 2 or live.shape[1] != len(test.features):
            return []
        live = live[np.isfinite(live).all(axis=1)]
        if not len(live):
            return []
        golden = np.asarray(test.reference, np.float64).mean(axis=0)
        out = []
        for j, feature in enumerate(test.features):
            for source, value in (("live", float(live[:, j].mean())), ("golden", float(golden[j]))):
                if math.isfinite(value):
                    out.append(MetricUpdate(mn.INPUT_FEATURE_MEAN.name,
                                            {"model": self.name, "feature": feature, "source": source}, "set", value))
        return out

    def _persistent(self, alarm: bool) -> bool:
        """True when the combined verdict alarmed now and in the `persistence - 1` disjoint windows before.

        Windows are disjoint when their evaluations are at least `window_size` samples apart;
        for each earlier step the latest evaluation that far back is the one that counts.
        """
        hist = self._combined_history
        hist.append((self.seen, alarm))
        need = getattr(self.cfg, "persistence", 1)
        # keep only what the check can reach
        horizon = self.seen - need * self.cfg.window_size
        while len(hist) > 1 and hist[1][0] <= horizon:
            hist.pop(0)
        if not alarm:
            return False
        at = self.seen
        for _ in range(need - 1):
            earlier = [(n, a) for n, a in hist if n <= at - self.cfg.window_size]
            if not earlier or not earlier[-1][1]:
                return False
            at = earlier[-1][0]
        return True

    def status(self) -> dict[str, Any]:
        est = self.suite.estimator
        return {
            "model": self.name, "version": self.entry.version, "state": "error" if self.error else "ok",
            "reason": self.error, "golden_set": self.golden_path, "n_reference": self.suite.n_reference,
            "window": {"size": self.cfg.window_size, "evaluate_every": self.cfg.evaluate_every,
                       "outputs": len(self.logits), "inputs": len(self.input_stats),
                       "embeddings": len(self.embeddings)},
            "windows_evaluated": self.windows, "counts": dict(self.counts),
            "atc": None if est is None else {"score": est.score_kind.value, "temperature": est.temperature,
                                             "threshold": est.threshold,
                                             "confidence_threshold": est.confidence_threshold},
            "confidence_buckets": list(self.confidence_buckets),
            "shadow": self._shadow_status(),
            "last": self.last,
        }

    def _shadow_status(self) -> dict[str, Any]:
        if self.runner is None:
            return {"backend": None, "note": self.shadow_note or "drift.shadow is false"}
        return {"backend": self.runner.backend, "note": self.runner.note,
                "throughput_per_s": round(self.throughput, 1), "rate_cap_per_s": round(self.shadow_rate, 1),
                "last_max_abs_diff": None if math.isnan(self.last_max_abs_diff) else self.last_max_abs_diff}


def _rows(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`values` (one row per True of `mask`) spread over len(mask) rows, NaN where `mask` is False."""
    out = np.full((len(mask), *values.shape[1:]), np.nan)
    out[mask] = values
    return out


def _values(w: Any) -> np.ndarray | None:
    """A sliding window's rows, None when there is no such window or it is empty."""
    return w.values() if w is not None and len(w) else None
