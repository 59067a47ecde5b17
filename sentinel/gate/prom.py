"""A small client for the Prometheus HTTP API (instant queries); failures become InfrastructureError."""

from __future__ import annotations

import json
import logging
import math
import time as _time
from dataclasses import dataclass
from typing import Any

import httpx

from sentinel.errors import InfrastructureError

# httpx logs every request at INFO; a gate run makes ~30 queries and its report is the output.
logging.getLogger("httpx").setLevel(logging.WARNING)

MAX_SERIES = 10_000        # a gate query returning more series than this is a mistake, not data
MAX_WARNINGS = 20          # distinct warnings kept from all answers (each cut to 300 characters)
MAX_BODY_BYTES = 64 * 1024 * 1024   # an answer larger than this is not read (10,000 series fit in a few MiB)
TIMEOUT_S = 30.0           # one query


@dataclass(frozen=True)
class Sample:
    """One series of an instant vector: its labels and value."""

    labels: dict[str, str]
    value: float


class BudgetSpent(InfrastructureError):
    """The whole run's time budget (`sentinel gate --timeout`) ran out before a query was answered."""


class Prometheus:
    """Instant queries against one Prometheus (or Thanos/Mimir query frontend) at `url`.

    `timeout` bounds one query; `budget` (seconds, None: unbounded) all of them together,
    counted from construction: a query is cut when the budget runs out, whatever the per-query
    timeout, and one started after it raises `BudgetSpent`. Both hold for a server that
    trickles its answer a byte at a time (httpx's timeouts are per read), since the body is
    read in chunks with the clock checked between them.
    """

    def __init__(self, url: str, *, timeout: float = TIMEOUT_S, time: float | None = None,
                 budget: float | None = None):
        if not url.startswith(("http://", "https://")):
            raise InfrastructureError(f"--prometheus: expected an http(s) URL, got {url!r}")
        self.url = url.rstrip("/")
        self.time = time
        self.timeout = timeout
        self.budget = budget
        self.answered = 0
        self.warnings: list[str] = []   # distinct `warnings` of successful answers (partial data)
        self._deadline = None if budget is None else _time.monotonic() + budget
        self._client = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, expr: str) -> list[Sample]:
        """Evaluate `expr` now (or at `time`); an instant vector or scalar as samples."""
        params: dict[str, Any] = {"query": expr}
        if self.time is not None:
            params["time"] = self.time
        limit, by_budget = self._limit(expr)
        started = _time.monotonic()
        try:
            with self._client.stream("POST", "/api/v1/query", data=params, timeout=limit) as resp:
                raw = bytearray()
                for chunk in resp.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_BODY_BYTES:
                        raise InfrastructureError(
                            f"Prometheus at {self.url} answered the query {_short(expr)!r} with more than "
                            f"{MAX_BODY_BYTES // (1024 * 1024)} MiB; not read further")
                    if _time.monotonic() - started > limit:
                        raise httpx.ReadTimeout("answer still arriving")
        except httpx.TimeoutException as exc:
            if by_budget:
                raise self._spent(expr) from exc
            raise InfrastructureError(
                f"Prometheus at {self.url} did not answer the query {_short(expr)!r} within "
                f"{self.timeout:g} s ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise InfrastructureError(
                f"Prometheus at {self.url} could not be queried ({_short(expr)!r}): "
                f"{type(exc).__name__}: {exc}") from exc
        self.answered += 1
        try:
            body = json.loads(bytes(raw))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise InfrastructureError(
                f"Prometheus at {self.url} answered HTTP {resp.status_code} without a Prometheus API JSON "
                f"object to the query {_short(expr)!r} (is --prometheus the Prometheus base URL?)")
        if resp.status_code != 200 or body.get("status") != "success":
            raise InfrastructureError(
                f"Prometheus at {self.url} rejected the query {expr!r}: "
                f"{body.get('errorType', resp.status_code)}: {body.get('error', '')}")
        self._note_warnings(body.get("warnings"))
        data = body.get("data")
        kind, result = (data.get("resultType"), data.get("result")) if isinstance(data, dict) else (None, None)
        try:
            if kind == "scalar":
                return [Sample({}, _float(result[1]))]   # type: ignore[index]
            if kind != "vector" or not isinstance(result, list):
                raise InfrastructureError(
                    f"Prometheus at {self.url}: expected an instant vector for {expr!r}, got {kind}")
            if len(result) > MAX_SERIES:
                raise InfrastructureError(f"query {expr!r} returned {len(result)} series (more than {MAX_SERIES})")
            return [Sample({str(k): str(v) for k, v in (r.get("metric") or {}).items()}, _float(r["value"][1]))
                        for r in result]
        except (AttributeError, KeyError, IndexError, TypeError):
            raise InfrastructureError(
                f"Prometheus at {self.url} answered the query {_short(expr)!r} with a malformed "
                f"{kind or 'result'}: {_short(json.dumps(data))}") from None

    def _note_warnings(self, warnings: Any) -> None:
        if not isinstance(warnings, list):
            return
        for w in warnings:
            text = _short(str(w), 300)
            if text not in self.warnings and len(self.warnings) < MAX_WARNINGS:
                self.warnings.append(text)

    def _limit(self, expr: str) -> tuple[float, bool]:
        """Seconds this query may take, and whether that limit is the run's remaining budget."""
        if self._deadline is None:
            return self.timeout, False
        left = self._deadline - _time.monotonic()
        if left <= 0:
            raise self._spent(expr)
        return (left, True) if left < self.timeout else (self.timeout, False)

    def _spent(self, expr: str) -> BudgetSpent:
        return BudgetSpent(
            f"the time budget of {self.budget:g} s ran out after {self.answered} answered "
            f"queries to Prometheus at {self.url}, before an answer to {_short(expr)!r}")

    def server_time(self) -> float:
        """Prometheus' clock now (Unix seconds): `time()` evaluated without a `time` parameter."""
        pinned, self.time = self.time, None
        try:
            now = self.scalar("time()")
        finally:
            self.time = pinned
        if now is None or not math.isfinite(now) or now <= 0:
            raise InfrastructureError(f"Prometheus at {self.url} answered time() with {now!r}, not a Unix time")
        return now

    def vector(self, expr: str, label: str) -> dict[str, float]:
        """`{label value: sample value}` of a query grouped by `label` (NaN samples dropped)."""
        return {s.labels.get(label, ""): s.value for s in self.query(expr) if not math.isnan(s.value)}

    def scalar(self, expr: str) -> float | None:
        """The single value of a query without grouping, None when it has no result."""
        got = [s.value for s in self.query(expr) if not math.isnan(s.value)]
        return got[0] if got else None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan
