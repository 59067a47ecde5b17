"""The daemon's combined alarm with `drift.persistence`: consecutive disjoint windows must all alarm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sentinel.analysis.monitor import ModelMonitor

pytestmark = pytest.mark.unit


def _monitor(persistence: int, window: int = 100):
    return SimpleNamespace(cfg=SimpleNamespace(persistence=persistence, window_size=window),
                           seen=0, _combined_history=[])


def _feed(m, evals: list[tuple[int, bool]]) -> list[bool]:
    out = []
    for seen, alarm in evals:
        m.seen = seen
        out.append(ModelMonitor._persistent(m, alarm))
    return out


def test_persistence_one_passes_the_verdict_through():
    assert _feed(_monitor(1), [(50, False), (100, True), (150, False)]) == [False, True, False]


def test_persistence_two_needs_an_alarm_one_window_earlier():
    # evaluations every 50 samples, window 100: the disjoint predecessor of 250 is 150
    evals = [(50, False), (100, True), (150, True), (200, True), (250, True), (300, False)]
    assert _feed(_monitor(2), evals) == [False, False, False, True, True, False]


def test_persistence_two_ignores_overlapping_alarms_only():
    # alarms at 100 and 150 overlap (50 apart); the one 100 back (50) did not alarm
    assert _feed(_monitor(2), [(50, False), (100, True), (150, True)]) == [False, False, False]
