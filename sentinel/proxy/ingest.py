"""KServe logger CloudEvents on /ingest: parse (binary or structured mode), join request and response by id.

Binary mode (what the KServe logger sends): `Ce-Id`, `Ce-Type:
org.kubeflow.serving.inference.request|response`, `Ce-Inferenceservicename`, the payload as
the body with its `Content-Type`. Structured mode (`Content-Type:
application/cloudevents+json`): the same attributes in a JSON envelope, the payload in
`data` (JSON) or `data_base64`. Batch mode (`application/cloudevents-batch+json`): a JSON
array of such envelopes, each event taken and answered on its own. Halves pair by
InferenceService, logger origin (`component`, `endpoint`) and id. Events carry no protocol
and the logger forwards no `Inference-Header-Content-Length`, so joined pairs go to analysis
as protocol "auto": the worker sniffs v1, v2 JSON and v2 binary-tensor bodies
(`sentinel.protocols.sniff`).

This runs in the proxy process: it parses only the envelope (never a tensor), and the
join table is bounded in count, bytes and age; every drop is counted. A structured or batch
envelope sent with `Content-Encoding: gzip|deflate` is inflated (bounded) before it is parsed;
a binary-mode payload keeps its coding for the worker. An event whose body the admin listener
refused unread (413, over its body limit) still reaches `handle`, its head only
(`admin.RefusedBody`): counted `oversize` by its Ce-* headers, or `rejected` when they cannot
name it (structured or batch mode).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sentinel.errors import DecodeError
from sentinel.protocols.encoding import decoded
from sentinel.protocols.names import AUTO
from sentinel.proxy.admin import RefusedBody

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
MAX_BATCH_EVENTS = 1024   # events in one batched request (the body itself is bounded by the admin listener)
# Structured and batch envelopes are JSON parsed (and `data` re-encoded) on the proxy's event
# loop, about 50 ms per MiB: above this they are refused, naming binary mode, which carries the
# payload as the body and is never parsed here (KServe's logger sends binary mode).
STRUCTURED_MAX_BYTES = 256 * 1024
Half = Literal["request", "response"]

# Outcomes of sentinel_ingest_events_total (the HELP text in metricnames lists them all).
OUTCOMES = ("accepted", "joined", "orphaned", "rejected", "oversize")

JSON = b"application/json"
Response = tuple[int, bytes, bytes]


class IngestError(DecodeError):
    """An event that cannot be used; the message says which attribute or header is wrong.

    events: how many events it stands for (a refused batch counts every event it held)."""

    def __init__(self, message: str, kind: str = "bad_event", events: int = 1):
        super().__init__(kind, message)
        self.events = events


@dataclass(frozen=True)
class Event:
    """One CloudEvent: its id, which half of an exchange it is, the model it names, its payload.

    origin: the logger's `component` and `endpoint` extensions (predictor or transformer,
    default or canary): halves pair only within one service and origin, since a transformer's
    and its predictor's loggers can log one request id (a client's `Ce-Id` is reused).
    """

    id: str
    half: Half
    service: str
    headers: dict[str, str]   # payload headers a decoder reads (content-type...)
    body: bytes
    origin: str = ""

    @property
    def size(self) -> int:
        return len(self.body) + len(self.id) + len(self.origin) + 64

    @property
    def key(self) -> str:
        """What pairs a request with its response: service, origin and id."""
        return f"{self.service}\x1f{self.origin}\x1f{self.id}"


def _half(ce_type: str) -> Half:
    if ce_type == REQUEST_TYPE:
        return "request"
    if ce_type == RESPONSE_TYPE:
        return "response"
    raise IngestError(f"Ce-Type must be {REQUEST_TYPE} or {RESPONSE_TYPE}, got {ce_type[:100]!r}")


def parse_event(headers: dict[str, str], body: bytes) -> Event:
    """An Event from CloudEvent headers (lower-case names) and body, binary or structured mode."""
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype in (STRUCTURED, BATCH):
        body = _envelope_bytes(headers, body, ctype)
    if ctype == STRUCTURED:
        return _parse_structured(body)
    if ctype == BATCH:
        raise IngestError("a batch of CloudEvents (application/cloudevents-batch+json) holds several events: "
                          "parse it with parse_events")
    ce_id = headers.get("ce-id")
    if not ce_id:
        raise IngestError("missing Ce-Id header (a binary-mode CloudEvent, or structured mode with "
                          f"Content-Type: {STRUCTURED})")
    half = _half(headers.get("ce-type", ""))
    service = headers.get("ce-inferenceservicename", "")
    payload = {k: v for k, v in headers.items()
               if k in ("content-type", "inference-header-content-length", "content-encoding")}
    if body.lstrip()[:1] == b'"' and _is_json(ctype) and len(body) <= STRUCTURED_MAX_BYTES:
        body = _unquoted(body)   # (a larger one is left for the worker to refuse: not parsed on the loop)
    origin = f"{headers.get('ce-component', '')[:128]}/{headers.get('ce-endpoint', '')[:128]}"
    return Event(ce_id[:256], half, service[:256], payload, body, origin)


def _bounded_envelope(body: bytes, ctype: str) -> None:
    """IngestError when a structured or batch body is too large to parse on the event loop."""
    if len(body) > STRUCTURED_MAX_BYTES:
        raise IngestError(f"{ctype}: {len(body)} bytes, more than the {STRUCTURED_MAX_BYTES >> 10} KiB a JSON "
                          "envelope may hold (it is parsed on the proxy's event loop); send large payloads as "
                          "binary-mode CloudEvents (Ce-* headers, the payload as the body), as KServe's logger does",
                          "too_large")


def _envelope_bytes(headers: dict[str, str], body: bytes, ctype: str) -> bytes:
    """A structured or batch body, bounded, with its HTTP Content-Encoding (gzip, deflate) undone:
    the coding is the envelope's, and it was parsed as JSON as sent ("not JSON: 'utf-8' codec
    can't decode byte 0x8b"). Inflated at most to STRUCTURED_MAX_BYTES."""
    _bounded_envelope(body, ctype)
    if "content-encoding" not in headers:
        return body
    try:
        body, _ = decoded(body, headers, STRUCTURED_MAX_BYTES)
    except DecodeError as exc:
        kind = "too_large" if exc.kind == "too_large" else "bad_event"
        raise IngestError(f"{ctype} with Content-Encoding {headers['content-encoding'][:64]!r}: {exc}"[:300]
                          + (f" (at most {STRUCTURED_MAX_BYTES >> 10} KiB of JSON envelope; send large payloads "
                             "as binary-mode CloudEvents)" if kind == "too_large" else ""), kind) from None
    return body


def _is_json(ctype: str) -> bool:
    """Whether a media type (parameters allowed) is JSON: application/json, text/json, anything+json."""
    return ctype.split(";", 1)[0].strip().lower().endswith("json")


def _unquoted(body: bytes) -> bytes:
    """A JSON payload that arrived as a JSON string holding JSON text (the Python cloudevents SDK
    sends `str` data that way, in binary mode too) → that text; anything else unchanged.
    No inference body is a bare JSON string, so nothing decodable is altered."""
    try:
        text = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if isinstance(text, str) and text.lstrip()[:1] in ("{", "["):
        return text.encode()
    return body


def parse_events(headers: dict[str, str], body: bytes) -> list[Event | IngestError]:
    """The events of one POST: one (binary or structured mode), or each of a batch
    (`application/cloudevents-batch+json`: a JSON array of structured-mode envelopes), an
    IngestError in place of each event of a batch that cannot be used. IngestError when the
    request as a whole cannot be read."""
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != BATCH:
        return [parse_event(headers, body)]
    body = _envelope_bytes(headers, body, ctype)
    try:
        docs = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise IngestError(f"batch mode: the body is not JSON: {exc}"[:300]) from None
    if not isinstance(docs, list) or not docs:
        raise IngestError("batch mode: the body is not a non-empty JSON array of events")
    if len(docs) > MAX_BATCH_EVENTS:
        raise IngestError(f"batch mode: {len(docs)} events in one request, more than {MAX_BATCH_EVENTS}", "too_large",
                          events=len(docs))
    out: list[Event | IngestError] = []
    for doc in docs:
        try:
            out.append(_structured_event(doc, "batch mode"))
        except IngestError as exc:
            out.append(exc)
    return out


def _parse_structured(body: bytes) -> Event:
    """A structured-mode event: attributes and payload in one JSON envelope."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise IngestError(f"structured mode: the envelope is not JSON: {exc}"[:300]) from None
    return _structured_event(doc, "structured mode")


def _structured_event(doc: Any, mode: str) -> Event:
    """An event from its parsed structured-mode envelope (`mode` names where it came from in errors)."""
    if not isinstance(doc, dict):
        raise IngestError(f"{mode}: the envelope is not a JSON object")
    ce_id = doc.get("id")
    if not isinstance(ce_id, str) or not ce_id:
        raise IngestError(f"{mode}: the envelope has no string 'id'")
    ce_type = doc.get("type")
    half = _half(ce_type if isinstance(ce_type, str) else "")
    service = doc.get("inferenceservicename", "")
    dctype = doc.get("datacontenttype", "application/json")
    if not isinstance(dctype, str):
        dctype = "application/json"
    if "data_base64" in doc:
        try:
            data = base64.b64decode(doc["data_base64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise IngestError(f"{mode}: data_base64 is not base64: {exc}"[:300]) from None
    elif "data" in doc:
        raw = doc["data"]
        if isinstance(raw, str) and (not _is_json(dctype) or raw.lstrip()[:1] in ("{", "[")):
            data = raw.encode()   # text, or JSON text given as a string (the SDKs' str data)
        else:
            try:
                data = json.dumps(raw, separators=(",", ":")).encode()
            except (ValueError, TypeError, RecursionError) as exc:
                raise IngestError(f"{mode}: data cannot be re-encoded: {exc}"[:300]) from None
    else:
        raise IngestError(f"{mode}: the envelope has neither 'data' nor 'data_base64'")
    origin = f"{str(doc.get('component', ''))[:128]}/{str(doc.get('endpoint', ''))[:128]}"
    return Event(ce_id[:256], half, str(service)[:256], {"content-type": dctype[:200]}, data, origin)


class JoinTable:
    """Pending halves by key (service, origin, id), bounded in count, total bytes and age; what falls out is counted.

    `add` returns the pair an event completes, plus how many halves became orphans: too old,
    pushed out (oldest first) to stay within `max_pending` and `max_bytes`, or replaced by a
    second copy of the same half; `expire` drops halves older than the TTL.

    A half that is never analysed (over the sampling cap, or the sidecar's own canary request)
    is never kept: `skip` drops its other half if that is waiting, else remembers its key (no
    body; as many keys as `max_pending`, for the TTL) so that `partner_skipped` turns the other
    half away when it comes, instead of keeping it until the TTL and counting it an orphan.
    """

    def __init__(self, ttl_s: float, max_pending: int, max_bytes: int = 64 * 1024 * 1024):
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.bytes = 0
        self._pending: OrderedDict[str, tuple[float, Event]] = OrderedDict()
        self._skipped: OrderedDict[str, tuple[float, Half, str]] = OrderedDict()   # key → (when, which half, why)

    def __len__(self) -> int:
        return len(self._pending)

    def _drop(self, key: str | None = None) -> None:
        if key is None:
            _, (_, ev) = self._pending.popitem(last=False)
        else:
            _, ev = self._pending.pop(key)
        self.bytes -= ev.size

    def add(self, ev: Event, now: float) -> tuple[tuple[Event, Event] | None, int]:
        """((request, response) when `ev` completes a pair, else None), and how many halves were pushed out."""
        dropped = self.expire(now)
        other = self._pending.get(ev.key)
        if other is not None and other[1].half != ev.half:
            self._drop(ev.key)
            req, resp = (ev, other[1]) if ev.half == "request" else (other[1], ev)
            return (req, resp), dropped
        if other is not None:   # the same half twice: keep the newer one
            dropped += 1
            self._drop(ev.key)
        if ev.size > self.max_bytes:
            return None, dropped + 1   # can never be joined within the budget
        self._pending[ev.key] = (now, ev)
        self.bytes += ev.size
        while len(self._pending) > self.max_pending or self.bytes > self.max_bytes:
            self._drop()
            dropped += 1
        return None, dropped

    def skip(self, ev: Event, now: float, why: str) -> int:
        """`ev`'s pair is never analysed (`why`: "oversize", "canary"): drop its other half if it is
        waiting (returns 1, that orphan), else remember the key for `partner_skipped`."""
        self._expire_skipped(now)
        other = self._pending.get(ev.key)
        if other is not None and other[1].half != ev.half:
            self._drop(ev.key)
            return 1
        seen = self._skipped.pop(ev.key, None)
        if seen is not None and seen[1] != ev.half:
            return 0   # both halves over the cap: nothing is waiting for either
        self._skipped[ev.key] = (now, ev.half, why)
        while len(self._skipped) > self.max_pending:
            self._skipped.popitem(last=False)
        return 0

    def partner_skipped(self, ev: Event, now: float) -> str | None:
        """Why `ev`'s other half was not analysed (over the sampling cap, a canary request), when it
        came within the TTL, else None; forgets it."""
        self._expire_skipped(now)
        seen = self._skipped.get(ev.key)
        if seen is None or seen[1] == ev.half:
            return None
        del self._skipped[ev.key]
        return seen[2]

    def _expire_skipped(self, now: float) -> None:
        while self._skipped:
            if now - next(iter(self._skipped.values()))[0] < self.ttl_s:
                break
            self._skipped.popitem(last=False)

    def expire(self, now: float) -> int:
        """Drop halves older than the TTL (and skipped keys, which are not counted); returns how many halves."""
        self._expire_skipped(now)   # else kept until the next skip or lookup: with no more ingest traffic, for good
        n = 0
        while self._pending:
            first = next(iter(self._pending.values()))
            if now - first[0] < self.ttl_s:
                break
            self._drop()
            n += 1
        return n


def _reply(status: int, doc: dict[str, Any]) -> Response:
    return status, JSON, json.dumps(doc).encode()


def handle(headers: dict[str, str], body: bytes, *, join: JoinTable, count: Callable[[str, int], None],
           route: Callable[[str], tuple[str, Any] | None], submit: Callable[[Any], Any],
           known_models: str, now: float | None = None,
           canary: Callable[[str, bytes], bool] | None = None) -> Response:
    """Answer one POST /ingest: 200 for an event accepted or joined (what the KServe logger expects),
    400 naming the problem otherwise. `route(service)` gives (model, sampler) or None; `submit`
    takes the joined Sample; `count(outcome, n)` counts sentinel_ingest_events_total;
    `canary(model, body)` says whether a request body is one the sidecar's own canary sends (the
    model server's logger reports canary traffic too): such a pair is counted `canary`, never
    analysed.

    A batch (`application/cloudevents-batch+json`) is answered once for all its events: 200
    when every event was accepted or joined, else 400; either way `events` lists, in order, each
    event's own HTTP `code` and answer, and every usable event of the batch was taken."""
    now = time.monotonic() if now is None else now
    if isinstance(headers, RefusedBody):
        return _refused(headers, join, count, route, known_models, now)
    try:
        events = parse_events(headers, body)
    except IngestError as exc:
        count("rejected", exc.events)
        return _reply(400, {"error": str(exc)})
    answers = [_one(ev, join, count, route, submit, known_models, now, canary) for ev in events]
    if headers.get("content-type", "").split(";", 1)[0].strip().lower() != BATCH:
        status, doc = answers[0]
        return _reply(status, doc)
    status = 200 if all(a[0] == 200 for a in answers) else 400
    return _reply(status, {"events": [{"code": a[0], **a[1]} for a in answers]})


def _refused(headers: RefusedBody, join: JoinTable, count: Callable[[str, int], None],
             route: Callable[[str], tuple[str, Any] | None], known_models: str, now: float) -> Response:
    """Count an event whose body the admin listener refused unread (over its body limit; it answers
    413 itself): a binary-mode event is known by its Ce-* headers and counted `oversize` like one
    over sampling.max_bytes (its other half is dropped or turned away, not kept until the TTL); a
    structured or batch envelope cannot be read, so it is `rejected`."""
    size = f"{'more than ' if headers.chunked else ''}{headers.size} bytes"
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype in (STRUCTURED, BATCH):
        count("rejected", 1)
        return _reply(413, {"error": f"{ctype}: a body of {size}, over the admin listener's limit of {headers.limit}, "
                                     "is refused unread, so its event cannot be identified or paired; send large "
                                     "payloads as binary-mode CloudEvents (Ce-* headers), as KServe's logger does"})
    try:
        ev = parse_event(headers, b"")
    except IngestError as exc:
        count("rejected", 1)
        return _reply(413, {"error": f"body of {size} refused unread, and {exc}"})
    status, doc = _one(ev, join, count, route, lambda sample: None, known_models, now, refused=size)
    return _reply(413 if status == 200 else status, doc)


def _one(ev: Event | IngestError, join: JoinTable, count: Callable[[str, int], None],
         route: Callable[[str], tuple[str, Any] | None], submit: Callable[[Any], Any],
         known_models: str, now: float, canary: Callable[[str, bytes], bool] | None = None,
         refused: str | None = None) -> tuple[int, dict[str, Any]]:
    """The answer (status, document) to one event, counted. `refused`: its body (of that size) was
    refused unread by the admin listener, `ev` holds its headers only."""
    from sentinel.proxy.sampling import Sample

    if isinstance(ev, IngestError):
        count("rejected", 1)
        return 400, {"error": str(ev)}
    model = route(ev.service)
    if model is None:
        count("rejected", 1)
        return 400, {"error": f"Ce-Inferenceservicename {ev.service!r} matches no configured model ({known_models})"}
    name, sampler = model

    def skipped(why: str, answer: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        count(why, 1)
        orphans = join.skip(ev, now, why)   # its other half, if waiting, will never be joined
        if orphans:
            count("orphaned", orphans)
        return 200, answer

    if refused is not None:
        return skipped("oversize", {"status": f"not analysed: a body of {refused} is over the admin listener's "
                                              "limit (and sampling.max_bytes)", "max_bytes": sampler.max_bytes})
    if len(ev.body) > sampler.max_bytes:
        return skipped("oversize", {"status": "not analysed: body over sampling.max_bytes",
                                    "max_bytes": sampler.max_bytes})
    if ev.half == "request" and canary is not None and canary(name, ev.body):
        # golden samples the sidecar's canary sent: in drift windows and the accuracy estimate they
        # would dilute a shift and raise the estimate (they are the easy, known-good inputs)
        return skipped("canary", {"status": "not analysed: the sidecar's own canary request"})
    why = join.partner_skipped(ev, now)
    if why == "canary":
        count("canary", 1)
        return 200, {"status": "not analysed: the answer to the sidecar's own canary request"}
    if why is not None:
        count("oversize", 1)
        return 200, {"status": "not analysed: the other half's body was over sampling.max_bytes",
                     "max_bytes": sampler.max_bytes}
    pair, dropped = join.add(ev, now)
    if dropped:
        count("orphaned", dropped)
    if pair is None:
        count("accepted", 1)
        return 200, {"status": "waiting for the other half"}
    count("joined", 1)
    req_ev, resp_ev = pair
    submit(Sample(name, AUTO, req_ev.headers, req_ev.body, resp_ev.headers, resp_ev.body, "ingest", ev.id,
                  time.time()))
    return 200, {"status": "joined"}
