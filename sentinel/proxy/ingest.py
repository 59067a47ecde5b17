"""KServe logger CloudEvents (binary mode): join request and response events by `Ce-Id`."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
Half = Literal["request", "response"]


class IngestError(ValueError):
    """An event that cannot be used; the message says which header is wrong."""


@dataclass(frozen=True)
class Event:
    """One CloudEvent: its id, which half of an exchange it is, the model it names, its payload."""

    id: str
    half: Half
    service: str
    headers: dict[str, str]   # payload headers a decoder reads (content-type...)
    body: bytes


def parse_event(headers: dict[str, str], body: bytes) -> Event:
    """An Event from binary-mode CloudEvent headers (lower-case names) and body."""
    ce_id = headers.get("ce-id")
    if not ce_id:
        raise IngestError("missing Ce-Id header (binary-mode CloudEvents required)")
    ce_type = headers.get("ce-type", "")
    if ce_type == REQUEST_TYPE:
        half: Half = "request"
    elif ce_type == RESPONSE_TYPE:
        half = "response"
    else:
        raise IngestError(f"Ce-Type must be {REQUEST_TYPE} or {RESPONSE_TYPE}, got {ce_type!r}")
    service = headers.get("ce-inferenceservicename", "")
    payload = {k: v for k, v in headers.items() if k in ("content-type", "inference-header-content-length")}
    return Event(ce_id, half, service, payload, body)


class JoinTable:
    """Pending halves by Ce-Id, bounded in count and age; evictions are orphans."""

    def __init__(self, ttl_s: float, max_pending: int):
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self._pending: OrderedDict[str, tuple[float, Event]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, ev: Event, now: float) -> tuple[tuple[Event, Event] | None, int]:
        """((request, response) when `ev` completes a pair, else None), and how many were orphaned."""
        orphans = self.expire(now)
        other = self._pending.get(ev.id)
        if other is not None and other[1].half != ev.half:
            del self._pending[ev.id]
            req, resp = (ev, other[1]) if ev.half == "request" else (other[1], ev)
            return (req, resp), orphans
        if other is not None:   # the same half twice: keep the newer one
            orphans += 1
            del self._pending[ev.id]
        self._pending[ev.id] = (now, ev)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            orphans += 1
        return None, orphans

    def expire(self, now: float) -> int:
        """Drop halves older than the TTL; returns how many."""
        n = 0
        while self._pending:
            first = next(iter(self._pending.values()))
            if now - first[0] < self.ttl_s:
                break
            self._pending.popitem(last=False)
            n += 1
        return n
