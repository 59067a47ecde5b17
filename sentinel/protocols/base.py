"""Values, limits and JSON parsing shared by the wire-format codecs."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from sentinel.errors import DecodeError
from sentinel.scores import OutputKind, output_kind, softmax

InputForm = Literal["raw", "network"]
Layout = Literal["NHW", "NHWC", "NCHW"]   # of a raw input (model.yaml preprocessing.layout)
Headers = Mapping[str, str]   # lower-case names

DecodeErrorKind = Literal[
    "malformed_json", "missing_field", "bad_shape", "bad_datatype", "truncated",
    "bad_header", "unsupported", "bad_image", "too_large", "too_deep",
    "bad_event",    # a CloudEvent envelope (sentinel.proxy.ingest)
    "nonfinite_output",   # the model answered NaN or ±Infinity scores: the model's fault, not the body's
    "unexpected",   # a decoder raised something else: a bug, reported instead of crashing the worker
]

# Bounds on what an outsider's payload may make a decoder allocate or recurse into.
MAX_JSON_DEPTH = 64            # nesting of [ and {; a 4-D tensor in nested lists is depth ~6
MAX_ELEMENTS = 1 << 28         # elements of one tensor (before allocation)
MIN_IMAGE_PIXELS_LIMIT = 1 << 24   # 16.8 Mpx: a phone photo decodes, a 13000² bitmap does not
IMAGE_PIXELS_PER_INPUT_PIXEL = 256  # a larger model input allows proportionally larger images


@dataclass(frozen=True)
class DecodeHints:
    """What the model says about its inputs, for bodies that do not say it themselves.

    raw_shape/raw_dtype: a raw `application/octet-stream` TorchServe body is a flat array of
    this dtype and (per instance) shape. input_shape: the network input (C×H×W), which sets
    the pixel bound of encoded images (`max_image_pixels`, unless given). classes: class
    names, to read answers that name classes instead of scoring them (TorchServe top-k).
    num_classes: how many classes the model scores, to tell its score output from others
    (embeddings...) in a response that carries several (default: len(classes), if given).
    raw_layout: the axis order of the raw input (model.yaml `preprocessing.layout`: NHW, NHWC
    or NCHW); decoded images are laid out so, and a raw tensor whose channel axis is on the
    other side is moved to it (`input_batch`). None: inferred from raw_shape where it can be.
    """

    raw_shape: tuple[int, ...] | None = None
    raw_dtype: str = "float32"
    input_shape: tuple[int, ...] | None = None
    max_image_pixels: int | None = None
    classes: tuple[str, ...] = ()
    num_classes: int | None = None
    raw_layout: Layout | None = None

    @property
    def layout(self) -> Layout | None:
        """The raw input's layout: as declared, else what raw_shape says unambiguously (H×W: NHW;
        a 1 or 3 at one end only of a 3-D shape: the channels there), else None."""
        if self.raw_layout is not None:
            return self.raw_layout
        raw = self.raw_shape
        if raw is not None and len(raw) == 2:
            return "NHW"
        if raw is not None and len(raw) == 3:
            last, first = raw[-1] in (1, 3), raw[0] in (1, 3)
            if last != first:
                return "NHWC" if last else "NCHW"
        return None

    @property
    def image_channels(self) -> int | None:
        """Channels the model reads from an image (1 grey, 3 colour), when its shapes say: a raw
        input H×W is grey, H×W×C or C×H×W (as its layout says) or a network input C×H×W has C;
        else None."""
        raw, net = self.raw_shape, self.input_shape
        if raw is not None and len(raw) == 2:
            return 1
        layout = self.layout
        if raw is not None and len(raw) == 3 and layout in ("NHWC", "NCHW"):
            c = raw[-1] if layout == "NHWC" else raw[0]
            if c in (1, 3):
                return c
        if raw is not None and len(raw) == 3 and raw[-1] in (1, 3) and layout is None:
            return raw[-1]
        if net is not None and len(net) == 3 and net[0] in (1, 3):
            return net[0]
        return None

    @property
    def class_count(self) -> int | None:
        return self.num_classes or (len(self.classes) or None)

    @property
    def image_pixel_limit(self) -> int:
        if self.max_image_pixels is not None:
            return self.max_image_pixels
        shape = self.raw_shape or self.input_shape
        px = 0
        if shape and len(shape) >= 2:
            dims = sorted(shape, reverse=True)[:2]   # H and W, whatever the channel position
            px = dims[0] * dims[1]
        return max(MIN_IMAGE_PIXELS_LIMIT, IMAGE_PIXELS_PER_INPUT_PIXEL * px)


NO_HINTS = DecodeHints()


@dataclass(frozen=True)
class DecodedRequest:
    """The input batch of one inference request (batch-first)."""

    inputs: np.ndarray
    form: InputForm


@dataclass(frozen=True)
class DecodedResponse:
    """The output batch of one inference response.

    outputs/kind: the scores the analysis reads (N × classes, float64) and whether they are
    logits or probabilities. Rows are as served: a row of NaN or ±Infinity scores (the model's
    fault) is kept in place, so rows still pair with the request's inputs; `finite` marks the
    rows to analyse and `nonfinite_rows` counts the others (a response with no finite row is
    refused by the decoder as `nonfinite_output`). logits/probabilities: each where the response carried it by
    name or kind (a v2 response may carry both). labels: class names per row when the
    response carried only names (TorchServe's top-k mapping); outputs is then N × 0.
    """

    outputs: np.ndarray
    kind: OutputKind
    logits: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    labels: tuple[str, ...] = ()

    @property
    def finite(self) -> np.ndarray:
        """Per row: whether every score is finite (rows of labels only: True)."""
        if self.outputs.shape[1] == 0:
            return np.ones(len(self.outputs), dtype=bool)
        ok: np.ndarray = np.isfinite(self.outputs).all(axis=1)
        return ok

    @property
    def nonfinite_rows(self) -> int:
        """How many rows hold NaN or infinite scores (counted as `nonfinite_output`, one per row)."""
        return int((~self.finite).sum())

    @property
    def top1(self) -> np.ndarray:
        """Index of the highest score per row (empty when the response carried only labels; -1 for a
        row of NaN/infinite scores)."""
        if self.outputs.shape[1] == 0:
            return np.zeros(0, dtype=np.int64)
        top: np.ndarray = self.outputs.argmax(axis=1)
        if self.nonfinite_rows:
            top = np.where(self.finite, top, -1)
        return top

    def probabilities_or_softmax(self) -> np.ndarray:
        """Probabilities as served, else the softmax of the served logits."""
        if self.probabilities is not None:
            return self.probabilities
        return softmax(self.outputs) if self.kind == "logits" else self.outputs


def input_form(arr: np.ndarray) -> InputForm:
    """`network` for float N×C×H×W tensors (already preprocessed), else `raw` (without hints)."""
    return "network" if arr.ndim == 4 and arr.dtype.kind == "f" else "raw"


def images_in_layout(images: np.ndarray, layout: Layout | None) -> np.ndarray:
    """Decoded images (N×H×W grey, N×H×W×C) laid out as a raw input of `layout` (None: as they are)."""
    if layout == "NCHW":
        return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if layout == "NHWC" and images.ndim == 3:
        return images[..., None]
    if layout == "NHW" and images.ndim == 4 and images.shape[-1] == 1:
        return images[..., 0]
    return images


def _relaid(arr: np.ndarray, shape: tuple[int, ...], channels_last: bool | None, what: str) -> np.ndarray | None:
    """`arr` (batch-first) with instances of `shape` when its instances are the same pixels in
    another layout: a size-1 axis added or dropped (the same bytes), or the channel axis at the
    other end (moved). None when they are not; DecodeError when the axes are a permutation of
    `shape` whose channel axis cannot be told (it is as long as H or W)."""
    per = tuple(arr.shape[1:])
    if [d for d in per if d != 1] == [d for d in shape if d != 1]:
        return arr.reshape((len(arr), *shape))
    if len(per) != 3 or len(shape) != 3 or sorted(per) != sorted(shape) or channels_last is None:
        return None
    c, hw = (shape[2], shape[:2]) if channels_last else (shape[0], shape[1:])
    if c not in hw:
        if channels_last and per == (c, *hw):
            return arr.transpose(0, 2, 3, 1)
        if not channels_last and per == (*hw, c):
            return arr.transpose(0, 3, 1, 2)
    order = "N×H×W×C" if channels_last else "N×C×H×W"
    why = "which axis is the channels is ambiguous" if c in hw else "not with the channels at one end"
    raise DecodeError("bad_shape", f"input shape {list(arr.shape)} holds the axes of the model's {what} "
                                   f"{list(shape)} ({order}) in another order, {why}; sentinel does not "
                                   "guess (send the declared layout)")


def input_batch(arr: np.ndarray, hints: DecodeHints = NO_HINTS, *, maybe_single: bool = False) -> DecodedRequest:
    """A decoded input tensor as the model reads it: its raw input (preprocessed by the analysis in
    the declared layout) or its network input, judged by shape as the reference server does (raw
    first). A raw input with a singleton channel axis added or dropped (N×1×8×8 or N×8×8×1 for an
    N×8×8 model), or with its channel axis at the other end (N×3×H×W for an N×H×W×3 model), is
    laid out as declared; an axis order that cannot be told is refused (bad_shape). maybe_single:
    the body may be one instance without a batch axis (TorchServe JSON), taken as a batch of one
    when only that reading fits. Without a fitting shape in the hints: `input_form`'s guess."""
    if arr.ndim == 0:
        raise DecodeError("bad_shape", "input is a scalar, expected a batch")
    if arr.size == 0:   # nothing to analyse; and a shape [2**27, 0] would count 2**27 rows of nothing
        raise DecodeError("bad_shape", f"input shape {list(arr.shape)} holds no values")
    got = fitted(arr, hints)
    if got is None and maybe_single:
        got = fitted(arr[None], hints)
    return got if got is not None else DecodedRequest(arr, input_form(arr))


def fitted(arr: np.ndarray, hints: DecodeHints) -> DecodedRequest | None:
    """`input_batch`'s reading of a batch whose instances fit the hints' raw or network shape (as they
    are, or laid out again), else None; DecodeError when only an ambiguous axis order would fit."""
    per = tuple(arr.shape[1:])
    raw, net = hints.raw_shape, hints.input_shape
    if raw is not None and raw == net and per == raw:
        # One shape for both (a model without raw_input: `hints_for` takes the network input's):
        # the shape cannot tell, `input_form` guesses (float: already preprocessed)
        return DecodedRequest(arr, input_form(arr))
    if raw is not None and per == raw:
        return DecodedRequest(arr, "raw")
    if net is not None and per == net:
        return DecodedRequest(arr, "network")
    layout = hints.layout
    candidates: list[tuple[tuple[int, ...], bool | None, InputForm]] = []
    if raw is not None and raw != net:
        candidates.append((raw, None if layout in (None, "NHW") else layout == "NHWC", "raw"))
    if net is not None:
        candidates.append((net, False, "network"))
    ambiguous: DecodeError | None = None
    for shape, channels_last, form in candidates:
        try:
            moved = _relaid(arr, shape, channels_last, "raw input" if form == "raw" else "network input")
        except DecodeError as exc:
            ambiguous = ambiguous or exc
            continue
        if moved is not None:
            return DecodedRequest(moved, input_form(moved) if raw == net else form)
    if ambiguous is not None:
        raise ambiguous
    return None


_CLASSIFICATION = re.compile(rb"-?[0-9.eE+-]+(?:nan|inf)?:[0-9]+(?::.*)?", re.DOTALL | re.IGNORECASE)


def score_matrix(arr: np.ndarray, name: str = "") -> np.ndarray:
    """Scores shaped N × classes (float64), or DecodeError saying why they are not scores."""
    if arr.dtype == object:
        items = arr.reshape(-1)[:8]
        if len(items) and all(isinstance(b, bytes) and _CLASSIFICATION.fullmatch(b) for b in items):
            raise DecodeError("unsupported", f"output {name or '(unnamed)'} holds top-k 'score:index:label' "
                                             "strings (the classification extension, class_count), not a score "
                                             "vector; request the output without class_count")
        raise DecodeError("bad_datatype", f"output {name or '(unnamed)'} is BYTES, not numeric scores")
    if arr.dtype.kind not in "fiub":
        raise DecodeError("bad_datatype", f"output {name or '(unnamed)'} is {arr.dtype}, not numeric scores")
    if arr.ndim == 0 or arr.size == 0:
        raise DecodeError("bad_shape", f"output shape {list(arr.shape)} holds no scores")
    if arr.ndim == 1:
        arr = arr[None, :]
    elif arr.ndim > 2:
        # N×C×1×1 from a conv head, N×1×C from an export that kept a length-1 axis: the size-1 axes
        # after the batch go; exactly one other axis (the classes) may remain
        if sum(d != 1 for d in arr.shape[1:]) > 1:
            raise DecodeError("bad_shape", f"output shape {list(arr.shape)} is not N × classes")
        arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[1] < 2:
        raise DecodeError("bad_shape", f"output shape {list(arr.shape)} has fewer than 2 classes "
                                       "(class labels rather than scores?)")
    out = arr.astype(np.float64, copy=False)
    if not np.isfinite(out).all() and not np.isfinite(out).all(axis=1).any():
        # Every row NaN/±Inf: nothing to analyse (a one-sample answer, as replay and the canary get).
        # Some rows only: the rows are kept as served; each consumer counts the bad rows per sample
        # (DecodedResponse.finite) and analyses the others.
        raise DecodeError("nonfinite_output", f"output {name or '(unnamed)'}: all {len(out)} rows hold NaN "
                                              "or infinite scores (what the model answered)")
    return out


def as_output_batch(arr: np.ndarray, name: str = "") -> DecodedResponse:
    """Shape scores as N × classes and tell logits from probabilities (`sentinel.scores.output_kind`,
    judged on the finite rows: one NaN row does not make probabilities read as logits)."""
    out = score_matrix(arr, name)
    finite = np.isfinite(out).all(axis=1)
    kind = output_kind(out if finite.all() else out[finite], name)
    return DecodedResponse(out, kind, logits=out if kind == "logits" else None,
                           probabilities=out if kind == "probabilities" else None)


_SCORE_NAME = re.compile(r"prob|softmax|logit|score|class|output|predict", re.IGNORECASE)
_FEATURE_NAME = re.compile(r"embed|feature|feat|hidden|pool|latent|penultimate", re.IGNORECASE)


def combine_outputs(named: list[tuple[str, np.ndarray]], hints: DecodeHints = NO_HINTS) -> DecodedResponse:
    """The response of several named outputs; a logits and a probabilities output are both kept
    when present (same shape).

    The primary output is the first with the model's class count (the hints'); among those (or
    all, without hints) one not named like features (embeddings, hidden...) before one that is,
    and one named like scores (prob, logit, score, class, output, predict) before others: an
    embeddings output listed first is not read as the class scores. An output that would rank
    strictly before every readable one but cannot be read (all NaN, top-k strings) is the
    answer's error: the embeddings beside it are not read as the scores instead.
    """
    decoded: list[DecodedResponse] = []
    names: list[str] = []
    failed: list[tuple[tuple[bool, bool, bool], DecodeError]] = []
    k = hints.class_count

    def rank(name: str, width: int) -> tuple[bool, bool, bool]:
        return (k is not None and width != k, bool(_FEATURE_NAME.search(name)), not _SCORE_NAME.search(name))

    for name, arr in named:
        try:
            decoded.append(as_output_batch(arr, name))
            names.append(name)
        except DecodeError as exc:
            width = int(np.prod(arr.shape[1:])) if arr.ndim >= 2 else (arr.shape[0] if arr.ndim == 1 else 0)
            failed.append((rank(name, width), exc))
    if not decoded:
        raise failed[-1][1] if failed else DecodeError("missing_field", "no outputs")
    order = sorted(range(len(decoded)), key=lambda i: (*rank(names[i], decoded[i].outputs.shape[1]), i))
    best = rank(names[order[0]], decoded[order[0]].outputs.shape[1])
    for key, error in failed:
        if key < best:
            raise error
    first = decoded[order[0]]
    logits = next((d.outputs for d in decoded if d.kind == "logits"
                   and d.outputs.shape == first.outputs.shape), None)
    probs = next((d.outputs for d in decoded if d.kind == "probabilities"
                  and d.outputs.shape == first.outputs.shape), None)
    return DecodedResponse(first.outputs, first.kind, logits=logits, probabilities=probs)


def _real_quotes(b: np.ndarray) -> np.ndarray:
    """Positions of the quotes that delimit JSON strings (a quote after an odd run of backslashes is escaped)."""
    q = np.flatnonzero(b == 0x22)
    bs = np.flatnonzero(b == 0x5C)
    if not len(q) or not len(bs):
        return q
    # Runs of consecutive backslashes: for the backslash just before a quote, where its run starts.
    starts = np.ones(len(bs), dtype=bool)
    starts[1:] = bs[1:] != bs[:-1] + 1
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(bs)), 0))
    j = np.searchsorted(bs, q - 1)
    j_ok = np.minimum(j, len(bs) - 1)
    preceded = (j < len(bs)) & (bs[j_ok] == q - 1)
    run = np.where(preceded, j_ok - run_start[j_ok] + 1, 0)
    kept: np.ndarray = q[run % 2 == 0]
    return kept


def _bracket_depths(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of [ { ] } outside strings, and the nesting depth after each (work ∝ brackets, not bytes)."""
    opens = np.flatnonzero((b == 0x5B) | (b == 0x7B))
    closes = np.flatnonzero((b == 0x5D) | (b == 0x7D))
    pos = np.concatenate([opens, closes])
    step = np.concatenate([np.ones(len(opens), np.int64), -np.ones(len(closes), np.int64)])
    order = np.argsort(pos, kind="stable")
    pos, step = pos[order], step[order]
    quotes = _real_quotes(b)
    if len(quotes):
        outside = np.searchsorted(quotes, pos) % 2 == 0   # an even number of quotes before: not in a string
        pos, step = pos[outside], step[outside]
    return pos, np.cumsum(step)


def json_depth(body: bytes | memoryview) -> int:
    """Maximum nesting depth of [ and { outside strings, without parsing."""
    b = np.frombuffer(body, dtype=np.uint8)
    _, depth = _bracket_depths(b)
    return int(depth.max(initial=0))


def _opens(raw: bytes, start: int = 0, end: int | None = None) -> int:
    """Count of [ and { bytes in raw[start:end], strings included: an upper bound of the nesting depth."""
    stop = len(raw) if end is None else end
    return raw.count(b"[", start, stop) + raw.count(b"{", start, stop)


_LEADING_WS = re.compile(rb"[ \t\n\r]*")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key that appears twice (ValueError).

    RFC 8259 §4 leaves duplicate names undefined, and JSON parsers differ: some keep the first
    value, some the last. Whichever this decoder kept, the sample might not be what the model
    saw, so it is refused rather than analysed.
    """
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))   # type: ignore[func-returns-value]
        raise ValueError(f"the key {dup!r} appears twice in one object, and JSON parsers differ on "
                         "which one counts (the first or the last)")
    return doc


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_PREFIX_BYTES = 1 << 16   # a large body's JSON object is first looked for in this many leading bytes


def _raw_decode(raw: bytes, start: int) -> tuple[Any, int]:
    """The JSON value at raw[start:] and where it ends, parsed from a latin-1 view (offsets = bytes).

    A large body (binary tensors after a small header) is tried on its first _PREFIX_BYTES
    only: an object that closes within them parses the same as in the whole body.
    """
    if len(raw) > 2 * _PREFIX_BYTES:
        try:
            return _DECODER.raw_decode(raw[:_PREFIX_BYTES].decode("latin-1"), start)
        except (ValueError, RecursionError):
            pass
    return _DECODER.raw_decode(raw.decode("latin-1"), start)


_BOM = b"\xef\xbb\xbf"


def _refuse_bom(raw: bytes, what: str) -> None:
    """A JSON text must not start with a byte order mark (RFC 8259 §8.1); KServe (orjson) and Triton
    refuse such a body, so the sample is refused too, saying why (json.loads(bytes) would skip it)."""
    if raw.startswith(_BOM):
        raise DecodeError("malformed_json", f"{what} starts with a UTF-8 byte order mark, which JSON forbids "
                                            "(RFC 8259; KServe and Triton refuse the body too)")


def _object_start(raw: bytes) -> int:
    """Offset of the `{` a body starts with (after JSON whitespace), or DecodeError."""
    _refuse_bom(raw, "body")
    m = _LEADING_WS.match(raw)
    start = m.end() if m else 0
    if start >= len(raw) or raw[start] != 0x7B:
        raise DecodeError("malformed_json", "body does not start with a JSON object")
    return start


def json_prefix_length(body: bytes | memoryview) -> int:
    """Length of the JSON object a body starts with (bytes after it may be binary), or DecodeError.

    Binary-tensor bodies forwarded without `Inference-Header-Content-Length` (the KServe
    logger keeps only Content-Type) are split here: the object ends where the depth of
    brackets outside strings returns to zero; bytes after that point cannot change it.
    """
    raw = body if isinstance(body, bytes) else bytes(body)
    start = _object_start(raw)
    pos, depth = _bracket_depths(np.frombuffer(raw, dtype=np.uint8)[start:])
    closed = np.flatnonzero(depth == 0)
    if len(closed) == 0:
        raise DecodeError("malformed_json", "the JSON object at the start of the body never closes")
    return start + int(pos[closed[0]]) + 1


def json_object_prefix(body: bytes | memoryview) -> tuple[int, dict[str, Any] | None]:
    """`json_prefix_length` and, when it could be had exactly on the way, the parsed object.

    The fast path parses the body's prefix once (`raw_decode` on a latin-1 view, whose
    character offsets are byte offsets, so bytes after the object may be anything). The
    object is returned only where parsing the prefix as `parse_json` would give the same
    document: an ASCII prefix whose nesting is within MAX_JSON_DEPTH. Otherwise (the prefix
    is malformed, deeper than the limit, or not ASCII) the object is None and the length is
    `json_prefix_length`'s, so callers parse the prefix the usual way and get its errors.
    """
    raw = body if isinstance(body, bytes) else bytes(body)
    start = _object_start(raw)
    try:
        doc, end = _raw_decode(raw, start)
    except (ValueError, RecursionError):   # malformed (or absurdly deep): the scan says where it ends
        return json_prefix_length(raw), None
    # A valid object ends where its brackets outside strings return to depth 0: the scan's answer.
    if not raw[start:end].isascii():
        return end, None   # strings must be decoded as UTF-8 (and invalid UTF-8 refused): parse again
    if _opens(raw, start, end) > MAX_JSON_DEPTH and json_depth(memoryview(raw)[start:end]) > MAX_JSON_DEPTH:
        return end, None   # parse_json refuses it with its depth
    return end, doc


def parse_json(body: bytes | memoryview, what: str = "body") -> Any:
    """Parse JSON (UTF-8, no byte order mark: what model servers read) after checking its nesting
    depth, or raise DecodeError saying what was wrong."""
    raw = bytes(body)
    _refuse_bom(raw, what)
    if _opens(raw) > MAX_JSON_DEPTH:   # fewer brackets than the limit cannot nest deeper: no scan
        depth = json_depth(raw)
        if depth > MAX_JSON_DEPTH:
            raise DecodeError("too_deep",
                              f"{what} nests JSON {depth} levels deep, more than the limit {MAX_JSON_DEPTH}")
    try:   # decoded as UTF-8 first: json.loads(bytes) would also read UTF-16/32, which servers refuse
        return _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError("malformed_json", f"{what} is not JSON: {exc}") from None


def load_json_object(body: bytes | memoryview, what: str = "body") -> dict[str, Any]:
    """Parse a JSON object body, or raise DecodeError("malformed_json") saying what it was instead."""
    doc = parse_json(body, what)
    if not isinstance(doc, dict):
        raise DecodeError("malformed_json", f"{what} is a JSON {type(doc).__name__}, expected an object")
    return doc


def numeric_array(data: Any, what: str) -> np.ndarray:
    """A rectangular numeric array from nested JSON lists (float → float32), or DecodeError."""
    if isinstance(data, str):
        raise DecodeError("unsupported", f"{what} are a string (text), not numbers or images")
    if isinstance(data, bool) or not isinstance(data, (list, int, float)):
        raise DecodeError("bad_datatype", f"{what} are not numbers")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nesting
        raise DecodeError("bad_shape", f"{what} are not a rectangular array: {exc}") from None
    if arr.dtype.kind in "US":   # text: a model input sentinel does not analyse, not a malformed body
        raise DecodeError("unsupported", f"{what} are strings (text), not numbers or images")
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise DecodeError("bad_datatype", f"{what} are not numbers (dtype {arr.dtype})")
    if arr.ndim == 0:
        raise DecodeError("bad_shape", f"{what} are a scalar, expected a batch")
    if arr.size > MAX_ELEMENTS:
        raise DecodeError("too_large", f"{what} have {arr.size} elements, more than the limit {MAX_ELEMENTS}")
    if arr.dtype.kind == "f":
        with np.errstate(over="ignore"):   # beyond float32 becomes inf: data the input contract judges
            arr = arr.astype(np.float32)
    return arr


def first_instance_shape(arr: np.ndarray, per_instance: tuple[int, ...] | None) -> np.ndarray:
    """A single instance (shape == per_instance) becomes a batch of one."""
    if per_instance is not None and tuple(arr.shape) == tuple(per_instance):
        return arr[None]
    return arr
