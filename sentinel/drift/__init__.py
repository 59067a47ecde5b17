"""Drift detectors and label-free accuracy estimators: pure numpy/scipy, arrays in, frozen results out.

Every detector compares a window with the golden set of the served model version and returns a
`DetectorResult` whose p-value is already corrected for its own multiple tests:

    bbsd         softmax, one KS (or CVM) test per class, Bonferroni      Rabanser et al. 2019
    label        predicted classes, 2×K chi-square, sparse classes pooled  Cochran's rule (expected ≥ 5)
    confidence   max softmax and entropy, KS each, Bonferroni
    input_stats  per-channel mean/std (+ brightness/contrast), sharpness, KS each, Bonferroni
    embedding    reference DenseNet features → PCA (golden) → KS per component, Bonferroni
    mmd          the same PCA features, Gaussian-kernel MMD², permutation p = (1+#≥)/(1+B)   Gretton et al. 2012
    consistency  served class vs the class of the input's golden neighbours (signatures; shadow embeddings),
                 disagreements against golden's own per-class rate, one-sided, Bonferroni over the spaces

`combine` turns them into one verdict whose family-wise false-alarm rate is at most alpha
(Bonferroni across detectors, valid under any dependence). `AccuracyEstimator` gives ATC
(Garg et al. 2022, negative entropy after temperature scaling) and average confidence.
Windows smaller than 10 samples make detectors abstain (no alarm, with a reason).

Only the analysis process and CLI commands import this package (scipy loads inside the
functions that need it); the proxy never does.
"""

from sentinel.drift.atc import AccuracyEstimator, Score
from sentinel.drift.combine import Combination, combine
from sentinel.drift.embedding import PCA, MMDTest
from sentinel.drift.label import LabelShiftTest, pool_sparse
from sentinel.drift.result import DetectorResult
from sentinel.drift.suite import ALL_DETECTORS, Reference, Settings, Suite, Verdict, Window
from sentinel.drift.univariate import FeatureShiftTest, Univariate, ks_statistics
from sentinel.drift.window import SlidingWindow

__all__ = [
    "ALL_DETECTORS", "AccuracyEstimator", "Combination", "DetectorResult", "FeatureShiftTest", "LabelShiftTest",
    "MMDTest", "PCA", "Reference", "Score", "Settings", "SlidingWindow", "Suite", "Univariate", "Verdict",
    "Window", "combine", "ks_statistics", "pool_sparse",
]
