"""Content codings of sampled bodies: undone before decoding, bounded, refused by name."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest

from sentinel.errors import DecodeError
from sentinel.protocols import decode_request, decode_response, oip_v2
from sentinel.protocols.encoding import decoded

BODY = b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}'


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)   # no timestamp: the same bytes in every xdist worker


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("coding, packed", [
    ("gzip", _gz(BODY)),
    ("x-gzip", _gz(BODY)),
    ("GZIP", _gz(BODY)),
    ("deflate", zlib.compress(BODY)),          # RFC 9110: zlib format (what tritonclient sends)
    ("deflate", _raw_deflate(BODY)),           # ... and the raw stream some servers send instead
    ("identity", BODY),
    ("gzip, deflate", zlib.compress(_gz(BODY))),   # applied in order: gzip first
], ids=["gzip", "x-gzip", "GZIP", "deflate-zlib", "deflate-raw", "identity", "gzip-then-deflate"])
def test_codings_are_undone_and_the_header_dropped(coding, packed):
    body, headers = decoded(packed, {"content-encoding": coding, "content-type": "application/json"})
    assert body == BODY and headers == {"content-type": "application/json"}


def test_a_body_without_a_coding_is_untouched():
    headers = {"content-type": "application/json"}
    body, out = decoded(BODY, headers)
    assert body is BODY and out is headers


def test_binary_extension_request_under_gzip_decodes_like_the_plain_one():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    plain, headers = oip_v2.encode([("x", x)])
    packed = dict(headers, **{"content-encoding": "gzip"})
    a = decode_request("v2", plain, headers).inputs
    b = decode_request("auto", gzip.compress(plain), packed).inputs
    np.testing.assert_array_equal(a, b)
    resp, rh = oip_v2.encode([("logits", np.eye(3, dtype=np.float32)[:1])], "outputs", binary=False)
    out = decode_response("v2", zlib.compress(resp), dict(rh, **{"content-encoding": "deflate"}))
    np.testing.assert_array_equal(out.outputs, np.eye(3, dtype=np.float32)[:1])


@pytest.mark.parametrize("coding, packed, kind, words", [
    ("br", b"\x0b\x02\x80", "unsupported", "content-encoding 'br'"),
    ("gzip", _gz(BODY)[:-12], "truncated", "ends before"),
    ("gzip", b"not gzip at all", "bad_header", "does not start like gzip"),   # the header lies; nothing is cut
    ("deflate", b"\x78\x9c garbage", "truncated", "does not inflate"),
    ("gzip", _gz(BODY) + b"\n", "bad_header", "1 bytes follow the gzip stream"),   # were ignored
    ("deflate", zlib.compress(BODY) + b"{}", "bad_header", "2 bytes follow the deflate stream"),
    ("gzip", b"".join(_gz(b"") for _ in range(1025)) + _gz(BODY), "too_large", "more than 1024 members"),
], ids=["br", "gzip-truncated", "not-gzip", "deflate-garbage", "gzip-trailing", "deflate-trailing",
        "gzip-members"])
def test_bad_or_unknown_codings_are_decode_errors(coding, packed, kind, words):
    with pytest.raises(DecodeError) as info:
        decode_request("v2", packed, {"content-encoding": coding})
    assert info.value.kind == kind and words in str(info.value)


def test_a_gzip_bomb_stops_at_the_bound_not_after_inflating():
    bomb = gzip.compress(b"\0" * (8 << 20), 9, mtime=0)     # 8 MiB of zeros in ~8 kB
    assert len(bomb) < 64 << 10
    with pytest.raises(DecodeError) as info:
        decoded(bomb, {"content-encoding": "gzip"}, limit=1 << 20)
    assert info.value.kind == "too_large" and "inflates past 1048576 bytes" in str(info.value)
    body, _ = decoded(bomb, {"content-encoding": "gzip"}, limit=8 << 20)   # exactly at the bound: fine
    assert len(body) == 8 << 20


def test_a_multi_member_gzip_body_is_inflated_whole():
    # RFC 1952 §2.2: members one after another (pigz, concatenated files); only the first was read,
    # and the sample came out malformed_json (or a shorter tensor)
    body = _gz(BODY[:20]) + _gz(BODY[20:41]) + _gz(BODY[41:])
    got = decode_request("v2", body, {"content-encoding": "gzip"}).inputs
    np.testing.assert_array_equal(got, decode_request("v2", BODY, {}).inputs)
