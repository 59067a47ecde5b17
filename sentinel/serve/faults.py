"""Fault injection for drills: added delay, 5xx errors, a one-off stall, broken preprocessing."""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultPlan:
    """What to break, from the `sentinel serve` flags."""

    delay_ms: float = 0.0            # added to every inference request
    error_ratio: float = 0.0         # fraction of inference requests answered with HTTP 500
    stall_after: int | None = None   # the N-th inference request (1-based) stalls the server
    stall_seconds: float = 0.0       # ... for this long, once
    skip_normalization: bool = False  # preprocess raw inputs without mean/std (a preprocessing bug)
    seed: int = 0                    # of the error draw, so drills are repeatable

    def validate(self) -> list[str]:
        """One sentence per invalid flag."""
        problems = []
        # NaN passes every comparison and infinity is no duration (a request delayed forever,
        # a stall that fails with OverflowError): both are refused by name.
        for flag, v in (("--delay-ms", self.delay_ms), ("--stall-seconds", self.stall_seconds)):
            if not math.isfinite(v):
                problems.append(f"{flag} must be a finite number, got {v}")
        if self.delay_ms < 0 and math.isfinite(self.delay_ms):
            problems.append(f"--delay-ms must not be negative, got {self.delay_ms}")
        if not 0.0 <= self.error_ratio <= 1.0:
            problems.append(f"--error-ratio must be between 0 and 1, got {self.error_ratio}")
        if self.stall_after is not None and self.stall_after < 1:
            problems.append(f"--stall-after must be at least 1, got {self.stall_after}")
        if self.stall_seconds < 0 and math.isfinite(self.stall_seconds):
            problems.append(f"--stall-seconds must not be negative, got {self.stall_seconds}")
        if self.stall_seconds > 0 and self.stall_after is None:
            problems.append("--stall-seconds needs --stall-after N")
        return problems

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.error_ratio or self.stall_after or self.skip_normalization)


@dataclass(frozen=True)
class Decision:
    """What happens to one request."""

    number: int            # 1-based count of inference requests seen
    delay_s: float         # sleep (without blocking the server) before answering
    stall_s: float         # block the whole server (event loop) for this long, before answering
    fail: bool             # answer 500


class FaultInjector:
    """Decides, request by request, which faults apply (thread-safe, deterministic per seed)."""

    def __init__(self, plan: FaultPlan):
        self.plan = plan
        self._lock = threading.Lock()
        self._count = 0
        self._stalled = False
        self._rng = random.Random(plan.seed)

    def next(self) -> Decision:
        with self._lock:
            self._count += 1
            n = self._count
            stall = 0.0
            if (not self._stalled and self.plan.stall_after is not None
                    and n >= self.plan.stall_after and self.plan.stall_seconds > 0):
                self._stalled = True
                stall = self.plan.stall_seconds
            fail = self.plan.error_ratio > 0 and self._rng.random() < self.plan.error_ratio
        return Decision(n, self.plan.delay_ms / 1000.0, stall, fail)
