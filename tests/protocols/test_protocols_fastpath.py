"""The decoders' fast paths give exactly what the full scans give: same split, same document, same error kind.

The references here are the scan-everything algorithms (`json_prefix_length`'s bracket scan,
`json_depth` before every parse, `flatten` before every conversion); the fast paths skip
them only where the outcome cannot differ, and these tests try to find a body where it does.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sentinel.errors import DecodeError
from sentinel.protocols import oip_v2, tensors
from sentinel.protocols.base import (
    MAX_JSON_DEPTH,
    json_depth,
    json_object_prefix,
    json_prefix_length,
    load_json_object,
    parse_json,
)
from sentinel.protocols.fuzz import bodies, json_docs, mutated

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def outcome(fn, *args) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except DecodeError as exc:
        return "error", exc.kind


def slow_parse(raw: bytes) -> Any:
    """parse_json as it was: always scan the depth, then parse (UTF-8 without a byte order mark, no key twice)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DecodeError("malformed_json", "BOM")
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise DecodeError("too_deep", f"{depth}")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_once_each)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DecodeError("malformed_json", "x") from None


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key twice in one object is refused (parsers differ on which value counts)."""
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key")
    return dict(pairs)


def slow_object(raw: bytes) -> Any:
    doc = slow_parse(raw)
    if not isinstance(doc, dict):
        raise DecodeError("malformed_json", "not an object")
    return doc


def slow_split_doc(body: bytes) -> tuple[int, Any]:
    """The old v2 path without the header: scan for the end, then parse the head (or the whole
    body when only a little whitespace follows)."""
    hlen = json_prefix_length(body)
    rest = body[hlen:]
    head = body if len(rest) < 64 and not rest.strip(b" \t\r\n") else body[:hlen]
    return hlen, slow_object(head)


def fast_split_doc(body: bytes) -> tuple[int, Any]:
    hlen, doc = json_object_prefix(body)
    if doc is None:
        rest = body[hlen:]
        doc = load_json_object(body if len(rest) < 64 and not rest.strip(b" \t\r\n") else body[:hlen])
    return hlen, doc


def same(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    return repr(a) == repr(b)   # repr: NaN equals NaN, dict order and float bits compared


# Strings that trip naive scanners: escaped quotes and backslashes, brackets, non-ASCII, controls.
tricky_text = st.text(alphabet=st.sampled_from(['"', "\\", "[", "]", "{", "}", "a", "é", "€", "\U0001f600",
                                                "\n", "\x00", " "]), max_size=12)
tricky_docs = st.recursive(
    st.one_of(tricky_text, st.floats(allow_nan=True), st.integers(-10, 10), st.none(), st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(tricky_text, inner, max_size=4)),
    max_leaves=30)
tails = st.one_of(st.just(b""), st.binary(max_size=80),
                  st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b" ", b"\x00", b"\xff", b"\xc3"]),
                           max_size=40).map(b"".join),
                  st.integers(0, 130).map(lambda n: b" " * n))


@st.composite
def prefixed_bodies(draw: st.DrawFn) -> bytes:
    doc = {"inputs": draw(tricky_docs), draw(tricky_text): draw(json_docs)}
    ensure_ascii = draw(st.booleans())
    head = json.dumps(doc, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    lead = draw(st.sampled_from([b"", b" ", b"\n\t ", b"\r\n"]))
    return lead + head + draw(tails)


@pytest.mark.slow
@SETTINGS
@given(st.one_of(prefixed_bodies(), bodies, mutated()))
@example(b"{}\x0b")   # found by a CI run: a vertical tab is not JSON whitespace
def test_split_and_document_match_the_full_scan(body):
    assert same(outcome(fast_split_doc, body), outcome(slow_split_doc, body))


@pytest.mark.slow
@SETTINGS
@given(st.one_of(prefixed_bodies(), bodies, tricky_docs.map(lambda d: json.dumps(d, ensure_ascii=False).encode())))
def test_parse_json_matches_the_full_scan(body):
    assert same(outcome(parse_json, body), outcome(slow_parse, body))


ADVERSARIAL = [
    b'{"a":"\\"{[["}',                                        # escaped quote, brackets in a string
    b'{"a":"\\\\"}' + b'{"x"',                                 # an escaped backslash ends the string
    b'{"a":"}"}\x00{"\\',                                      # binary tail with { " and backslash
    b'{"a":1}' + b"\xff" * 10,
    b'{"a":"\xe9"}',                                          # latin-1 byte: not UTF-8
    '{"a":"é€"}'.encode(),
    b'{"a":[' + b"[" * (MAX_JSON_DEPTH - 2) + b"]" * (MAX_JSON_DEPTH - 2) + b"]}",   # exactly the limit
    b'{"a":[' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"]}",   # one over
    b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",               # past Python's recursion limit
    b'{"s":"' + b"[" * 100 + b'"}',                            # many brackets, all in a string
    b'{"a":1}' + b" " * 63,
    b'{"a":1}' + b" " * 64,
    b' \r\n{"a":1}',
    b"\xef\xbb\xbf{}",                                         # a BOM is not JSON whitespace
    b'{"a":NaN,"b":-Infinity}',
    b'{"a":1',
    b'{"a":1]}',
    b"{}",
    b"",
    b"   ",
    b'{"a":"\\ud800"}',                                        # a lone surrogate escape
    b'{"k":1,"k":2}',
]


@pytest.mark.unit
@pytest.mark.parametrize("body", ADVERSARIAL)
def test_adversarial_bodies(body):
    assert same(outcome(fast_split_doc, body), outcome(slow_split_doc, body))
    assert same(outcome(parse_json, body), outcome(slow_parse, body))


@pytest.mark.unit
@pytest.mark.parametrize("head_kb,tail_kb", [(1, 300), (70, 200), (200, 0), (63, 100)])
def test_large_bodies_split_the_same(head_kb, tail_kb):
    """Bodies past the prefix the fast path tries first: heads that close inside it and ones that do not."""
    rng = np.random.default_rng(head_kb)
    head = json.dumps({"inputs": [{"name": "x", "pad": "[{\\\"" * (head_kb * 200), "data": [0.5] * 10}]}).encode()
    tail = rng.integers(0, 256, tail_kb * 1024, dtype=np.uint8).tobytes() + b'{"x":"\\'
    for body in (head + tail, head, head[:-1] + tail):
        assert same(outcome(fast_split_doc, body), outcome(slow_split_doc, body))


@pytest.mark.unit
def test_depth_errors_keep_their_kind_on_both_paths():
    over = b'{"a":' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}"
    assert outcome(fast_split_doc, over) == ("error", "too_deep")
    assert outcome(fast_split_doc, over + b"\x00binary{") == ("error", "too_deep")
    assert outcome(parse_json, over) == ("error", "too_deep")
    assert outcome(fast_split_doc, b'{"a":' + b"[" * 5000) == ("error", "malformed_json")


@pytest.mark.unit
def test_v2_split_without_the_header_matches_with_it():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    body, hdrs = oip_v2.encode([("in\"{[\\", x)])
    hlen = int(hdrs[oip_v2.HEADER_LENGTH])
    head, rest = oip_v2.split_body(body, {})
    assert len(head) == hlen and bytes(rest) == body[hlen:]
    a = oip_v2.decode_request(body, {})
    b = oip_v2.decode_request(body, hdrs)
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.inputs, x)


def slow_from_json(data: Any, shape: tuple[int, ...], datatype: str) -> np.ndarray:
    """from_json's rules applied value by value: no container; whole numbers (and 0/1 for BOOL), never
    strings or null, in integer and BOOL tensors; then numpy's conversion of the whole list (null: NaN)."""
    flat = tensors.flatten(data)
    if len(flat) != tensors.numel(shape):
        raise DecodeError("bad_shape", "count")
    dt = tensors.numpy_dtype(datatype)
    values = []
    for v in flat:
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise DecodeError("bad_datatype", "not a number")
        if dt.kind in "iub":
            if v is None:
                raise DecodeError("bad_datatype", "null")
            if isinstance(v, str) or (isinstance(v, float) and not v.is_integer()):
                raise DecodeError("bad_datatype", "not an integer")
            v = int(v)
            if dt.kind == "b" and v not in (0, 1):
                raise DecodeError("bad_datatype", "not 0/1")
        values.append(v)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.asarray(values, dtype=dt)
    except (ValueError, TypeError, OverflowError):
        raise DecodeError("bad_datatype", "x") from None
    return arr.reshape(shape)


def array_outcome(fn, *args) -> tuple[str, Any]:
    kind, val = outcome(fn, *args)
    if kind == "ok":
        return kind, (val.dtype.str, val.shape, val.tobytes())
    return kind, val


def _leaves(data: Any) -> int:
    return sum(_leaves(d) for d in data) if isinstance(data, list) else 1


leaf = st.one_of(st.floats(allow_nan=True), st.integers(-2**40, 2**40), st.booleans(), st.none(),
                 st.sampled_from(["1.5", "x", "", "nan"]), st.just({}))
data_lists = st.one_of(st.lists(leaf, min_size=1, max_size=8),
                       st.recursive(leaf, lambda inner: st.lists(inner, min_size=1, max_size=4), max_leaves=12))


@pytest.mark.unit
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data_lists, st.sampled_from(["FP32", "FP16", "FP64", "INT8", "INT64", "UINT8", "BOOL"]),
       st.sampled_from([None, (1, -1), (-1, 1)]))
def test_from_json_fast_path_matches_flatten(data, datatype, layout):
    n = _leaves(data)   # ragged data too: both sides must refuse it
    shape = (n,) if layout is None else ((1, n) if layout == (1, -1) else (n, 1))
    fast = array_outcome(tensors.from_json, data, shape, datatype, "t")
    slow = array_outcome(slow_from_json, data, shape, datatype)
    assert fast == slow
