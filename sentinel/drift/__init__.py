"""Drift detectors and label-free accuracy estimators: pure numpy/scipy, arrays in, frozen results out.

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
