"""All detectors of one model version, fitted on its golden set, evaluated together on a window."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sentinel.drift.atc import AccuracyEstimator, Score
from sentinel.drift.combine import Combination, combine
from sentinel.drift.diagnosis import Diagnoser, Diagnosis, Source, diagnose
from sentinel.drift.embedding import PCA, MMDTest
from sentinel.drift.features import (
    CONFIDENCE_FEATURES,
    confidence_features,
    input_feature_names,
    input_statistics,
    softmax,
    softmax_entropy,
)
from sentinel.drift.inputcontract import InputContract
from sentinel.drift.inputcontract import check as check_contract
from sentinel.drift.label import LabelShiftTest
from sentinel.drift.result import DetectorResult, abstain, decide
from sentinel.drift.univariate import MIN_SAMPLES, FeatureShiftTest, Univariate

ALL_DETECTORS = ("bbsd", "label", "confidence", "input_stats", "embedding", "mmd", "consistency")


@dataclass(frozen=True)
class Reference:
    """Reference arrays of one model version (from its golden set)."""

    logits: np.ndarray                      # N×K (or log-probabilities)
    labels: np.ndarray | None = None        # N, for the accuracy estimators
    inputs: np.ndarray | None = None        # N×C×H×W network inputs, for input statistics
    embeddings: np.ndarray | None = None    # N×D penultimate features of the reference model
    input_stats: np.ndarray | None = None   # N×F `input_statistics` of 1-channel inputs, when inputs are absent
    raw: np.ndarray | None = None           # inputs as the server receives them (candidate transforms act on these)
    preprocessing: Any = None               # sentinel.preprocess.Preprocessing from raw to network inputs
    contract: InputContract | None = None   # stored with the golden set; derived from `inputs` when None

    @classmethod
    def from_golden(cls, golden: Any) -> Reference:
        """Arrays of a loaded `sentinel.golden.GoldenSet` (and its stored input contract, digest-checked).

        Copied into memory: a golden set's arrays are memory-mapped, and a suite lives as long
        as the sidecar, which must not depend on the files staying as they were.
        """
        from sentinel.errors import UsageError
        from sentinel.golden import load_contract

        if len(golden.logits) < MIN_SAMPLES:
            raise UsageError(f"{golden.path}: {len(golden.logits)} samples; the drift detectors need a golden set "
                             f"of at least {MIN_SAMPLES}")

        def owned(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.array(a)

        return cls(np.array(golden.logits, np.float64), owned(golden.labels), owned(golden.inputs),
                   owned(golden.embeddings), raw=owned(golden.raw), preprocessing=golden.meta.preprocessing,
                   contract=load_contract(golden))


@dataclass(frozen=True)
class Window:
    """Window arrays; any may be None (the detectors needing it abstain)."""

    logits: np.ndarray | None = None        # M×K served logits (or log-probabilities)
    input_stats: np.ndarray | None = None   # M'×F from `features.input_statistics`
    embeddings: np.ndarray | None = None    # M''×k, already projected by the suite's PCA
    labels: np.ndarray | None = None        # true labels where known (evaluation only)
    signatures: np.ndarray | None = None    # M×S `Suite.samples(...).signatures` (diagnosis)
    violating: np.ndarray | None = None     # M bool: the sample violates the input contract
    verdicts: np.ndarray | None = None      # M ATC verdict codes (sentinel.drift.support), oldest first
    # Row by row with `logits` (M rows, NaN where a row has none), for the answer check
    # (support.AnswerCheck), which pairs each served class with its own input. `embeddings` and
    # `signatures` need not pair up with the outputs (the sidecar's shadow skips samples past its rate
    # cap, so its embedding window spans more traffic than the output window); when these are None, the
    # answer check takes `signatures`/`embeddings` only where they have as many rows as `logits`, as a
    # window built offline from whole batches does.
    row_signatures: np.ndarray | None = None    # M×S; NaN: no usable input (not decoded, or violating)
    row_embeddings: np.ndarray | None = None    # M×k projected; NaN: the shadow did not run on the row


@dataclass(frozen=True)
class Samples:
    """Per-sample results of `Suite.samples` for one batch (rows aligned with its inputs)."""

    violations: np.ndarray | None = None    # N×len(CHECKS) bool, None without inputs
    signatures: np.ndarray | None = None    # N×S
    ood: np.ndarray | None = None           # N bool: outside the golden support (kNN)
    verdicts: np.ndarray | None = None      # N int8 codes, None without outputs


@dataclass(frozen=True)
class Settings:
    """Statistical settings of a suite."""

    alpha: float = 0.05                              # per-detector and combined false-alarm level
    detectors: tuple[str, ...] = ("bbsd", "label", "confidence", "input_stats", "embedding", "consistency")
    univariate: Univariate = Univariate.KS           # test per feature for bbsd/confidence/input_stats/embedding
    combination: Combination = Combination.BONFERRONI
    pca_components: int = 8                          # principal components of golden embeddings kept
    mmd_permutations: int = 199
    mmd_max_samples: int = 200
    atc_score: Score = Score.NEG_ENTROPY
    seed: int = 0
    # The ATC lower bound is the whole window's, or the smaller of it and its last `accuracy_recent`
    # samples' when more than UNRELIABLE_SHARE of those are unknown (a sudden mismatch shows within
    # that many samples); 0 disables the recent part.
    accuracy_recent: int = 50
    # Weighted Bonferroni across detectors (combine.py): the label test gets twice the others' share of
    # alpha, which gives class knock-out ≥ 0.8 power at n=200 on digits (drift eval) at no cost in size.
    # The consistency test gets a quarter: what it alone sees (answers that changed for golden-like inputs)
    # it sees with p-values of 1e-6 and below, and at weight 1 the others' share of alpha fell by 1/7
    # (alarms on rot180 at 25% of 100 digits 0.8 -> 0.6, on levels4 0.8 -> 0.4).
    detector_weights: tuple[tuple[str, float], ...] = (("label", 2.0), ("consistency", 0.25))

    def __post_init__(self) -> None:
        unknown = [d for d in self.detectors if d not in ALL_DETECTORS]
        if unknown:
            raise ValueError(f"unknown detectors {unknown}; known: {', '.join(ALL_DETECTORS)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")


@dataclass(frozen=True)
class Verdict:
    """Every detector's result on one window, the combined verdict and the accuracy estimates."""

    n: int
    detectors: tuple[DetectorResult, ...]
    combined: DetectorResult
    estimated_accuracy: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None
    diagnosis: Diagnosis | None = None
    accuracy_verdicts: dict[str, int] = field(default_factory=dict)   # counts over the window
    unknown_share: float | None = None      # share of unknown verdicts (max of window and recent part)
    reliable: bool | None = None            # unknown_share <= support.UNRELIABLE_SHARE
    outside_share: float | None = None      # lower bound on the window's share outside the golden support
                                            # as a population (support.outside_share); counted as unknown
    samples: int | None = None              # rows the window holds, usable or not (verdicts or contract rows)
    unreliable_reason: str | None = None    # why `reliable` is False, in words (None when reliable or unknown)
    # lower bound on the share of the window's answers unlike what golden's model gives for such inputs
    # (support.AnswerCheck; None when no check ran); counted as unknown like `outside_share`
    inconsistent_share: float | None = None

    @property
    def drift(self) -> bool:
        return self.combined.alarm

    def result(self, name: str) -> DetectorResult:
        for r in self.detectors:
            if r.name == name:
                return r
        raise KeyError(name)


class Suite:
    """Detectors fitted on a reference; `evaluate(window)` runs the configured ones."""

    def __init__(self, reference: Reference, settings: Settings = Settings()):
        s = self.settings = settings
        logits = np.asarray(reference.logits, np.float64)
        if logits.ndim != 2 or not np.isfinite(logits).all():
            raise ValueError(f"reference logits must be a finite N×K array, got shape {logits.shape}")
        self.num_classes = logits.shape[1]
        probs = softmax(logits)
        self.bbsd = FeatureShiftTest("bbsd", probs, tuple(f"class_{k}" for k in range(self.num_classes)),
                                     s.alpha, s.univariate)
        self.label = LabelShiftTest(np.bincount(probs.argmax(axis=1), minlength=self.num_classes), s.alpha)
        self.confidence = FeatureShiftTest("confidence", confidence_features(probs), CONFIDENCE_FEATURES,
                                           s.alpha, s.univariate)
        self.input_stats: FeatureShiftTest | None = None
        if reference.inputs is not None:
            x = np.asarray(reference.inputs)
            self.input_stats = FeatureShiftTest("input_stats", input_statistics(x), input_feature_names(x.shape[1]),
                                                s.alpha, s.univariate)
        elif reference.input_stats is not None:
            st = np.asarray(reference.input_stats, np.float64)
            names = input_feature_names(1)
            if st.shape[1] != len(names):
                names = tuple(f"stat_{i}" for i in range(st.shape[1]))
            self.input_stats = FeatureShiftTest("input_stats", st, names, s.alpha, s.univariate)
        self.pca: PCA | None = None
        self.embedding: FeatureShiftTest | None = None
        self.mmd: MMDTest | None = None
        if reference.embeddings is not None:
            self.pca = PCA.fit(reference.embeddings, s.pca_components)
            proj = self.pca.transform(reference.embeddings)
            self.embedding = FeatureShiftTest("embedding", proj,
                                              tuple(f"pc{i}" for i in range(self.pca.n_components)),
                                              s.alpha, s.univariate)
            self.mmd = MMDTest(proj, s.alpha, s.mmd_permutations, s.mmd_max_samples, seed=s.seed)
        self.estimator: AccuracyEstimator | None = None
        if reference.labels is not None:
            self.estimator = AccuracyEstimator.fit(logits, reference.labels, s.atc_score)
        self.n_reference = len(logits)
        self.golden_shares = np.bincount(probs.argmax(axis=1), minlength=self.num_classes) / len(probs)
        self.contract: InputContract | None = None
        self.diagnoser: Diagnoser | None = None
        self.input_support = self.embedding_support = None
        self.n_support: int | None = None   # golden rows the support checks were fitted on
        if reference.inputs is not None:
            from sentinel.drift.support import KnnSupport

            x = np.asarray(reference.inputs, np.float32)
            self.contract = reference.contract or InputContract.derive(x)
            self.diagnoser = Diagnoser(x, probs.argmax(axis=1), _source(reference))
            self.input_support = KnnSupport.fit(self.diagnoser.golden_features, classes=self.diagnoser.classes)
            self.n_support = len(self.input_support.reference)
        from sentinel.drift.support import ClassVote

        # what golden says a sample's class is, from its golden neighbours: in the input signature space,
        # and in the reference embeddings' when the shadow runs (support.AnswerCheck)
        self.votes: dict[str, ClassVote] = {}
        if self.diagnoser is not None:
            cv = ClassVote.fit(self.diagnoser.golden_features, self.diagnoser.classes, "signature")
            if cv is not None:
                self.votes["signature"] = cv
        if self.pca is not None:
            from sentinel.drift.support import KnnSupport

            assert reference.embeddings is not None   # the PCA was fitted on them
            self.embedding_support = KnnSupport.fit(self.embedding.reference if self.embedding else
                                                    self.pca.transform(reference.embeddings),
                                                    classes=probs.argmax(axis=1))
            ev = ClassVote.fit(self.embedding.reference if self.embedding else
                               self.pca.transform(reference.embeddings), probs.argmax(axis=1), "embedding")
            if ev is not None:
                self.votes["embedding"] = ev
        from sentinel.drift.support import AnswerScores

        self.answer_scores = None if self.estimator is None else AnswerScores.fit(
            self.estimator.scores(logits), probs.argmax(axis=1))

    def samples(self, inputs: np.ndarray | None, logits: np.ndarray | None,
                embeddings: np.ndarray | None = None, dtype_kind: str | None = None) -> Samples:
        """Contract check, signature, support and ATC verdict per sample of one batch.

        `inputs` are N×C×H×W network inputs, `logits` N×K, `embeddings` N×k projections (or
        None where the shadow did not run); when given together their rows must align.
        """
        from sentinel.drift.support import verdicts

        viol = sig = ood = codes = None
        if inputs is not None and self.contract is not None and self.diagnoser is not None:
            rep = check_contract(self.contract, inputs, dtype_kind=dtype_kind)
            viol = rep.violations
            if not rep.violations[:, 0].any():           # shape fits: signatures can be computed
                sig = self.diagnoser.features(inputs)
                ood = self.outside(sig)
                # a sample with a non-finite value has no signature (as in the sidecar, which drops it
                # from the input windows): its zero-filled stand-in would pull the diagnosis and support
                finite = np.isfinite(np.asarray(inputs).reshape(len(inputs), -1)).all(axis=1)
                if not finite.all():
                    sig[~finite] = np.nan
                    ood[~finite] = True
            else:
                ood = np.ones(len(viol), bool)
        if embeddings is not None and self.embedding_support is not None and len(embeddings):
            e_ood = self.embedding_support.score(embeddings) > 1.0
            ood = e_ood if ood is None or len(ood) != len(e_ood) else (ood | e_ood)
        if logits is not None and self.estimator is not None:
            lg = np.asarray(logits, np.float64)
            unknown = None
            if ood is not None and viol is not None and len(ood) == len(lg):
                from sentinel.drift.inputcontract import untrusted

                unknown = ood | untrusted(viol)
            if embeddings is not None and len(embeddings) == len(lg):
                contradicted = self.contradicted(embeddings, lg)
                unknown = contradicted if unknown is None else (unknown | contradicted)
            codes = verdicts(self.estimator.scores(lg), self.estimator.threshold, unknown)
        return Samples(viol, sig, ood, codes)

    def contradicted(self, embeddings: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Per row: the served class is not the plurality class of the golden rows nearest its shadow
        embedding (`support.ClassVote`), so ATC's verdict on it is not to be trusted (`unknown`).

        The reference model's embedding of an input says what the input is as golden knows it; on golden
        itself the vote agrees with the predicted class 99.3% of the time (digits:v3), and on clean
        holdout digits the 0.4% that disagree were already not counted likely correct. A served answer
        the vote contradicts comes from something else: a label map off by one, two classes swapped,
        another model. All False without an embedding vote (no shadow, or too few golden rows)."""
        lg = np.asarray(logits, np.float64)
        out = np.zeros(len(lg), bool)
        cv = self.votes.get("embedding")
        e = np.asarray(embeddings, np.float64)
        if cv is None or len(e) != len(lg) or not len(lg):
            return out
        ok = np.isfinite(e).all(axis=1) & np.isfinite(lg).all(axis=1)
        if ok.any():
            out[ok] = cv.votes(e[ok]) != lg[ok].argmax(axis=1)
        return out

    def outside(self, signatures: np.ndarray) -> np.ndarray:
        """Per sample: outside the golden input support (kNN), or nearer a transformed golden sample
        than a golden one (`support.TransformLike`: a flipped digit the model is confidently wrong on)."""
        assert self.input_support is not None and self.diagnoser is not None
        ood: np.ndarray = self.input_support.score(signatures) > 1.0
        tl = self.diagnoser.transform_like
        if tl is not None and len(signatures):
            ood |= tl.flags(signatures)
        return ood

    def project(self, embeddings: np.ndarray) -> np.ndarray | None:
        """Reduce raw embeddings with the golden PCA (None when the reference had none)."""
        return None if self.pca is None else self.pca.transform(embeddings)

    def evaluate(self, window: Window) -> Verdict:
        """Run every configured detector, combine them, and estimate accuracy."""
        out = self._outputs(window)
        support_scores = self._support_scores(window)
        answers: dict[str, Any] | None = None
        if "consistency" in self.settings.detectors:
            answers = self._answers(window, out, support_scores)
        results = [self._run(name, window, out, answers) for name in self.settings.detectors]
        combined = combine(results, self.settings.alpha, self.settings.combination,
                           weights=dict(self.settings.detector_weights))
        cache: dict[str, Any] = {}

        def answers_now() -> dict[str, Any]:
            """The answer checks, computed at most once (the bound needs them only with verdicts, the
            diagnosis only for an alarming window that reaches its prior_shift branch)."""
            if "a" not in cache:
                cache["a"] = answers if answers is not None else self._answers(window, out, support_scores)
            found: dict[str, Any] = cache["a"]
            return found

        def preferred_now() -> Any:
            # The shadow's embeddings say what the reference model reads in an input, whatever moved in its
            # pixels; the signature neighbourhood also changes when the inputs move. So the bound and the
            # diagnosis take the embedding check when the window has one, the signature check otherwise
            # (the detector tests both).
            a = answers_now()
            return a.get("embedding", a.get("signature"))

        preferred = preferred_now() if answers is not None or window.verdicts is not None else None
        est: dict[str, float] = {}
        acc = None
        n = 0
        if out is not None:
            lg, ok, _, _ = out
            n = len(lg)
            if self.estimator is not None:
                est = self.estimator.estimate(lg)
            if window.labels is not None and len(window.labels) == len(ok) and len(ok):
                # over every row, as the client saw them: a non-finite output is a wrong answer
                acc = float((lg.argmax(axis=1) == np.asarray(window.labels)[ok]).sum() / len(ok))
        counts: dict[str, int] = {}
        unknown_share = reliable = None
        if window.verdicts is not None and len(window.verdicts):
            from sentinel.drift.support import UNRELIABLE_SHARE, lower_bound, verdict_counts

            codes = np.asarray(window.verdicts)
            counts = verdict_counts(codes)
            # Answers unlike what golden's model gives for such inputs (support.AnswerCheck): when a window
            # has significantly more of them than golden, each disagreeing answer is unknown to the bound
            # (a label map off by one, another model: confident, and wrong; ATC would count them correct).
            # The per-sample verdict counters keep what the sample alone says.
            if preferred is not None and preferred.inconsistent and len(preferred.disagree) == len(codes):
                from sentinel.drift.support import UNKNOWN
                codes = codes.copy()
                codes[preferred.disagree] = UNKNOWN
            lb, unk = lower_bound(codes)
            r = self.settings.accuracy_recent
            if 0 < r < len(codes):
                lb_r, unk_r = lower_bound(codes[-r:])
                if unk_r > UNRELIABLE_SHARE:        # the recent samples left the support: they speak for now
                    lb, unk = min(lb, lb_r), max(unk, unk_r)
            est["atc_lower"] = lb
            unknown_share, reliable = unk, bool(unk <= UNRELIABLE_SHARE)
        outside = self._outside_share(window, None if out is None else out[2].argmax(axis=1), support_scores)
        if outside is not None and "atc_lower" in est:
            # a population outside the support, though its samples one by one pass: that share is unknown,
            # and which samples it holds is not known either, so the likely-correct verdicts are trusted
            # only in the share that is not outside: lb·(1 − s), not min(lb, 1 − s). (The model can be
            # confidently wrong on the outside samples that pass one by one: a batch read with its axes
            # permuted, every image rows of 8 digits, read a bound of 0.23 at a true accuracy of 0.12.)
            est["atc_lower"] = est["atc_lower"] * (1.0 - outside)
            unknown_share = outside if unknown_share is None else max(unknown_share, outside)
            from sentinel.drift.support import UNRELIABLE_SHARE
            reliable = bool(unknown_share <= UNRELIABLE_SHARE)
        bad = bool(preferred is not None and preferred.inconsistent)
        inconsistent = None if preferred is None else (preferred.share if bad else 0.0)
        if bad and inconsistent is not None and "atc_lower" in est:
            # which of the answers are unlike golden's is known only in part (a disagreeing neighbourhood
            # vote can be the vote's mistake, an agreeing one a coincidence): as with `outside`, the
            # likely-correct verdicts are trusted only in the share that is not inconsistent
            est["atc_lower"] = est["atc_lower"] * (1.0 - inconsistent)
            unknown_share = inconsistent if unknown_share is None else max(unknown_share, inconsistent)
            from sentinel.drift.support import UNRELIABLE_SHARE
            reliable = bool(unknown_share <= UNRELIABLE_SHARE)

        def score_now() -> tuple[float, float] | None:
            if out is None or self.answer_scores is None or self.estimator is None or not len(out[0]):
                return None
            from sentinel.drift.diagnosis import ANSWER_SHIFT_D
            return self.answer_scores.test(self.estimator.scores(out[0]), out[2].argmax(axis=1), ANSWER_SHIFT_D)

        diag = self._diagnose(window, results, combined, out, outside, preferred_now, score_now)
        if reliable and diag.kind in ("preprocessing_mismatch", "input_contract", "output_shift"):
            # inputs the model was not validated on, or answers that are not the validated model's for
            # inputs like golden's: its confidence, calibrated on golden, proves nothing
            reliable = False
        ts = diag.transformed_share
        if ts is not None and "atc_lower" in est:
            # The samples a named transform explains were fed wrongly prepared inputs: count them as
            # unknown, whatever the per-sample verdicts say (a flipped or rotated digit still looks like
            # a digit, to the support check and to the model, which is then confidently wrong).
            # As with the verdicts, the last `accuracy_recent` samples speak for now when more of them
            # are transformed: a client that started sending flipped images 50 requests ago.
            r = self.settings.accuracy_recent
            sig = None if window.signatures is None else np.asarray(window.signatures, np.float64)
            if diag.transform is not None and self.diagnoser is not None and sig is not None and 0 < r < len(sig):
                sig = sig[np.isfinite(sig).all(axis=1)][-r:]
                ts_r = self.diagnoser.transformed_share(diag.transform, sig, diag.affine) if len(sig) >= 2 else None
                from sentinel.drift.support import UNRELIABLE_SHARE
                if ts_r is not None and ts_r > max(ts, UNRELIABLE_SHARE):
                    ts = ts_r
            est["atc_lower"] = min(est["atc_lower"], 1.0 - ts)
            unknown_share = ts if unknown_share is None else max(unknown_share, ts)
        samples = max(len(window.verdicts) if window.verdicts is not None else 0,
                      len(window.violating) if window.violating is not None else 0, n)
        judged = sum(counts.values())
        few = bool(counts) and judged < MIN_SAMPLES
        if reliable and few:
            reliable = False        # a share of 2 or 5 samples bounds nothing (the detectors abstain too)
        why = None if reliable is not False else _unreliable_reason(diag, unknown_share, counts, n, samples,
                                                                    self.n_support, inconsistent if bad else None)
        return Verdict(n, tuple(results), combined, est, acc, diag, counts, unknown_share, reliable, outside,
                       samples, why, inconsistent)

    def _spaces(self, w: Window) -> Iterator[tuple[str, Any, np.ndarray, np.ndarray]]:
        """(space, its support, the window's rows as float64, which rows are finite) per feature space
        the window has rows in and the golden set has a support for."""
        for space, support, rows in (("signature", self.input_support, w.signatures),
                                     ("embedding", self.embedding_support, w.embeddings)):
            if support is None or rows is None or not len(rows):
                continue
            f = np.asarray(rows, np.float64)
            yield space, support, f, np.asarray(np.isfinite(f).all(axis=1))

    def _support_scores(self, w: Window) -> dict[str, np.ndarray]:
        """Per feature space the window has, the kNN support score of every row (inf for a row with a
        non-finite feature), computed once for `outside_share` and the answer check."""
        out: dict[str, np.ndarray] = {}
        for space, support, f, fin in self._spaces(w):
            sc = np.full(len(f), np.inf)
            if fin.any():
                sc[fin] = support.score(f[fin])
            out[space] = sc
        return out

    def _answers(self, w: Window, out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
                 support_scores: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """`support.AnswerCheck` per feature space whose rows pair up with the window's outputs
        (`Window.row_signatures`/`row_embeddings` when given, else `signatures`/`embeddings` of the same
        length), over the rows inside the golden support and the input contract."""
        if out is None or not self.votes:
            return {}
        _, ok, probs, _ = out
        served = np.full(len(ok), -1, np.int64)
        served[ok] = probs.argmax(axis=1)
        # only inputs inside the golden support (kNN, in each space the window has) and within the contract:
        # answers to inputs outside it disagree with any neighbourhood, and the support checks speak for
        # those. (Not the verdicts: an answer its embedding contradicts is already `unknown` there.)
        #
        # Each served class must meet its own input: rows paired by position, never by a count that
        # happens to match (a window of the shadow's embeddings spanning more traffic than the outputs
        # has the same length once both are full, and its every row is another sample's: nine answers in
        # ten then "disagree", and a healthy replica read as another model).
        rows = self._answer_rows(w, len(ok))
        if w.row_signatures is None and w.row_embeddings is None:
            for space, sc in (support_scores if support_scores is not None else self._support_scores(w)).items():
                if space in rows and len(sc) == len(ok):
                    served[sc > 1.0] = -1
            if w.violating is not None and len(w.violating) == len(ok):
                served[np.asarray(w.violating, bool)] = -1
        else:
            # rows the sidecar paired (NaN where the input was not usable, or the shadow did not run)
            for space, f in rows.items():
                support = self.input_support if space == "signature" else self.embedding_support
                fin = np.isfinite(f).all(axis=1)
                if space == "signature":
                    served[~fin] = -1               # input not decoded, or violating the contract
                if support is not None and fin.any():
                    sc = np.full(len(f), np.inf)
                    sc[fin] = support.score(f[fin])
                    served[fin & (sc > 1.0)] = -1
        res: dict[str, Any] = {}
        for space, f in rows.items():
            cv = self.votes.get(space)
            if cv is None:
                continue
            chk = cv.check(f, served)
            if chk is not None:
                res[space] = chk
        return res

    @staticmethod
    def _answer_rows(w: Window, n: int) -> dict[str, np.ndarray]:
        """Per feature space, the window's feature rows paired row by row with its `n` output rows."""
        out: dict[str, np.ndarray] = {}
        paired = w.row_signatures is not None or w.row_embeddings is not None
        for space, row, loose in (("signature", w.row_signatures, w.signatures),
                                  ("embedding", w.row_embeddings, w.embeddings)):
            f = row if paired else loose
            if f is not None and len(f) == n and n:
                out[space] = np.asarray(f, np.float64)
        return out

    def _outside_share(self, w: Window, predicted: np.ndarray | None,
                       support_scores: dict[str, np.ndarray] | None = None) -> float | None:
        """The larger `outside_share` of the window's signatures and embedding projections (None: neither)."""
        shares = []
        scores = support_scores if support_scores is not None else self._support_scores(w)
        for space, support, f, fin in self._spaces(w):
            sc = scores.get(space)
            s = support.outside_share(f[fin], predicted, scores=None if sc is None else sc[fin])
            if s is not None:
                shares.append(s)
        return max(shares) if shares else None

    def _diagnose(self, w: Window, results: list[DetectorResult], combined: DetectorResult,
                  out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
                  outside: float | None = None, answers: Any = None, score_p: Any = None) -> Diagnosis:
        effects: dict[str, float] = {}
        if self.input_stats is not None and w.input_stats is not None and len(w.input_stats):
            ws = np.asarray(w.input_stats, np.float64)
            ws = ws[np.isfinite(ws).all(axis=1)]
            if len(ws):
                d = np.median(ws, axis=0) - np.median(self.input_stats.reference, axis=0)
                effects = {f: round(float(v), 4) for f, v in zip(self.input_stats.features, d, strict=True)}
        pred = None if out is None else out[2].argmax(axis=1)
        sig = w.signatures
        aligned = None               # the violating flags of the signature rows kept (rows align when counts match)
        if sig is not None:
            sig = np.asarray(sig, np.float64)
            keep = np.isfinite(sig).all(axis=1)
            if w.violating is not None and len(w.violating) == len(sig):
                aligned = np.asarray(w.violating, bool)[keep]
            sig = sig[keep]
        return diagnose(combined.alarm, results, diagnoser=self.diagnoser, window_features=sig,
                        violating=w.violating, predicted=pred, golden_predicted_shares=self.golden_shares,
                        input_effects=effects, outside_share=outside, feature_violating=aligned,
                        answers=answers, score_shift_p=score_p)

    def _outputs(self, w: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Finite window logits, their row mask, probabilities and entropies (computed once per window)."""
        if w.logits is None:
            return None
        lg = np.asarray(w.logits, np.float64)
        if lg.ndim != 2 or lg.shape[1] != self.num_classes:
            raise ValueError(f"window outputs have {lg.shape[-1]} classes, the reference has {self.num_classes}")
        ok = np.asarray(np.isfinite(lg).all(axis=1), dtype=bool)
        lg = lg[ok] if not ok.all() else lg
        probs, ent = softmax_entropy(lg)
        return lg, ok, probs, ent

    def _run(self, name: str, w: Window, out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
             answers: dict[str, Any] | None = None) -> DetectorResult:
        a = self.settings.alpha
        if name == "consistency":
            # the served classes against the golden neighbourhood of their inputs (support.AnswerCheck),
            # one-sided, Bonferroni over the feature spaces checked
            if not answers:
                return abstain(name, a, self.n_reference, 0 if out is None else len(out[0]),
                               "no input signatures or shadow embeddings row by row with the outputs")
            best = min(answers.values(), key=lambda c: c.p_value)
            return decide(name, best.observed - best.expected, min(1.0, best.p_value * len(answers)), a,
                          len(self.votes[best.space].reference), best.n, best.space)
        if name in ("bbsd", "label", "confidence"):
            if out is None:
                return abstain(name, a, self.n_reference, 0, "no decoded outputs in the window")
            _, _, probs, ent = out
            if name == "bbsd":
                return self.bbsd.test(probs)
            if name == "label":
                return self.label.test(probs.argmax(axis=1))
            return self.confidence.test(np.stack([probs.max(axis=1), ent], axis=1))
        if name == "input_stats":
            if self.input_stats is None:
                return abstain(name, a, 0, 0, "the golden set has no inputs")
            if w.input_stats is None:
                return abstain(name, a, self.n_reference, 0, "no decoded inputs in the window")
            return self.input_stats.test(w.input_stats)
        test = self.embedding if name == "embedding" else self.mmd
        if test is None:
            return abstain(name, a, 0, 0, "the golden set has no embeddings")
        if w.embeddings is None:
            return abstain(name, a, self.n_reference, 0, "no reference embeddings for the window (shadow off?)")
        return test.test(w.embeddings)


def _unreliable_reason(d: Diagnosis, unknown_share: float | None, counts: dict[str, int], n: int,
                       samples: int, n_support: int | None = None, inconsistent: float | None = None) -> str:
    """Why a window's accuracy estimate is flagged unreliable, in words (drift check, /status)."""
    judged = counts.get("likely_correct", 0) + counts.get("likely_wrong", 0)
    if samples and (n == 0 or (counts and judged == 0 and counts.get("unknown", 0) == samples)):
        # nothing in the window the estimator could judge: say so rather than report a number
        what = "no finite model outputs" if n == 0 else "every sample unknown to the estimator"
        contract = "" if d.contract_violating_share is None else \
            f"; {d.contract_violating_share:.0%} violate the input contract"
        return f"no usable samples: {what} ({samples} in the window{contract})"
    if sum(counts.values()) < MIN_SAMPLES and d.kind not in ("preprocessing_mismatch", "input_contract"):
        return f"too few samples: {sum(counts.values())} in the window (at least {MIN_SAMPLES})"
    if d.kind == "preprocessing_mismatch":
        return f"inputs {d.transform or 'transformed'}" + (
            f" on ~{d.transformed_share:.0%} of the window" if d.transformed_share is not None else "")
    if d.kind == "output_shift":
        return ("the answers changed for inputs like the golden set's (another model, calibration or label map?): "
                "the estimator's calibration on golden no longer applies")
    if d.kind == "input_contract":
        return "inputs violate the input contract" + (
            f" (~{d.contract_violating_share:.0%} of the window)" if d.contract_violating_share is not None else "")
    answers = None if inconsistent is None else (
        f"answers unlike what the golden set's model gives for such inputs (~{inconsistent:.0%} of the window at least")
    if answers is not None and d.kind != "covariate_shift":
        return f"{answers}; ~{unknown_share or 0.0:.0%} unknown)"
    # Inputs that moved lead: under noise the answers' disagreement with their inputs' golden
    # neighbours follows from the inputs, and "answers unlike" first read as if the model had changed.
    from sentinel.drift.support import SMALL_GOLDEN

    # A few % unknown can be the golden set's own doing; a window mostly outside the support is not.
    small = "" if n_support is None or n_support >= SMALL_GOLDEN or (unknown_share or 0.0) > 0.3 else (
        f"; the golden set has only {n_support} samples, too few to tell a clean sample at the edge of "
        f"the support from one outside it (clean windows read a few % unknown): keep {SMALL_GOLDEN} or more")
    return "inputs outside the golden support" + (
        f" (~{unknown_share:.0%} of the window)" if unknown_share is not None else "") + small + (
        f"; {answers})" if answers is not None else "")


def _source(ref: Reference) -> Source | None:
    """Golden raw inputs as the space candidate transforms act on, when the golden set has them."""
    pre = ref.preprocessing
    if ref.raw is None or pre is None or pre.layout not in ("NHW", "NCHW", "NHWC"):
        return None
    raw = np.asarray(ref.raw, np.float64)
    if raw.ndim != (3 if pre.layout == "NHW" else 4):
        return None
    # candidates act on N×C×H×W source images: an NHWC client's raw inputs (the usual layout of
    # decoded images) are transposed, so channel order and normalisation are judged where they happen
    images = raw[:, None] if pre.layout == "NHW" else (raw.transpose(0, 3, 1, 2) if pre.layout == "NHWC" else raw)
    mean = np.broadcast_to(np.asarray(pre.mean, np.float64), (images.shape[1],)).copy()
    std = np.broadcast_to(np.asarray(pre.std, np.float64), (images.shape[1],)).copy()
    scale = float(pre.scale) if pre.scale else 1.0

    def to_network(a: np.ndarray) -> np.ndarray:
        x: np.ndarray = pre.apply(a[:, 0] if pre.layout == "NHW" else (
            a.transpose(0, 2, 3, 1) if pre.layout == "NHWC" else a))
        return x

    # the raw range's top, 1/scale (255, 16), where golden lies within [0, 1/scale]: a preprocessing
    # written x/127.5 − 1 has golden reaching 255, and its own range stands in (Source.invert_sum)
    full = None
    if scale > 0 and scale != 1.0:
        top = 1.0 / scale
        if images.min() >= -1e-6 * top and images.max() <= top * (1 + 1e-6):
            full = np.full(images.shape[1], top)
    return Source(images, to_network, std / scale, mean / scale, mean, std, full)
