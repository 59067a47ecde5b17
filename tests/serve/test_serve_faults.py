"""Fault injection decisions: which request stalls, fails or is delayed."""

from __future__ import annotations

from sentinel.serve.faults import FaultInjector, FaultPlan


def test_stall_happens_once_at_the_nth_request():
    inj = FaultInjector(FaultPlan(stall_after=3, stall_seconds=1.5))
    stalls = [inj.next().stall_s for _ in range(6)]
    assert stalls == [0, 0, 1.5, 0, 0, 0]


def test_error_ratio_is_deterministic_per_seed_and_near_the_ratio():
    a = [FaultInjector(FaultPlan(error_ratio=0.3, seed=7)) for _ in range(2)]
    fa = [a[0].next().fail for _ in range(1000)]
    fb = [a[1].next().fail for _ in range(1000)]
    assert fa == fb
    assert 0.25 < sum(fa) / 1000 < 0.35


def test_delay_applies_to_every_request():
    inj = FaultInjector(FaultPlan(delay_ms=25))
    assert {inj.next().delay_s for _ in range(5)} == {0.025}


def test_invalid_plans_name_the_flag():
    problems = FaultPlan(delay_ms=-1, error_ratio=2, stall_after=0, stall_seconds=-1).validate()
    joined = " ".join(problems)
    for flag in ("--delay-ms", "--error-ratio", "--stall-after", "--stall-seconds"):
        assert flag in joined
    assert FaultPlan(stall_seconds=1).validate() == ["--stall-seconds needs --stall-after N"]
    assert FaultPlan().validate() == []
