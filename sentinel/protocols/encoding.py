"""HTTP content codings (RFC 9110 §8.4) of sampled bodies: gzip, deflate, identity.

Triton's HTTP client compresses requests and asks for compressed responses when told to
(`request_compression_algorithm="gzip"`), and proxies in front of model servers may do the
same; the proxy forwards such bodies untouched, and the decoders need the bytes under the
coding. `decoded(body, headers)` undoes the codings named in `Content-Encoding` (last
applied first) and returns headers without it.

Bounded: at most MAX_INFLATED_BYTES come out of one body (a 1 MiB gzip bomb inflates to
1 GiB), checked while inflating, never after. A coding sentinel cannot undo (br, zstd, ...)
is a DecodeError of kind "unsupported" naming it, so the sample is counted as rejected
instead of being read as malformed JSON.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from sentinel.errors import DecodeError

MAX_INFLATED_BYTES = 64 << 20   # one decoded body; larger is DecodeError("too_large")
MAX_GZIP_MEMBERS = 1024         # gzip members in one body (each costs a decompressor); more is "too_large"
_CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decoded(body: bytes, headers: Mapping[str, str],
            limit: int = MAX_INFLATED_BYTES) -> tuple[bytes, Mapping[str, str]]:
    """`body` with its content codings undone, and `headers` without `content-encoding`."""
    value = headers.get("content-encoding")
    if value is None:
        return body, headers
    codings = [c.strip().lower() for c in value.split(",") if c.strip()]
    rest = {k: v for k, v in headers.items() if k != "content-encoding"}
    for coding in reversed(codings):   # listed in the order they were applied
        if coding == "identity":
            continue
        wbits = _WBITS.get(coding)
        if wbits is None:
            raise DecodeError("unsupported", f"content-encoding {coding!r} (sentinel reads gzip and deflate)")
        body = _inflate(body, wbits, coding, limit)
    return body, rest


def _inflate(data: bytes, wbits: int, coding: str, limit: int) -> bytes:
    """The bytes under one coding. gzip may be several members one after the other (RFC 1952 §2.2;
    `pigz`, appended logs), all inflated as model servers' readers do; bytes after the last
    stream that start no member, or a body that does not start like the coding, are
    DecodeError("bad_header"): the header names a coding the body is not in."""
    gzip = wbits == 16 + zlib.MAX_WBITS
    if gzip and not data.startswith(_GZIP_MAGIC):
        raise DecodeError("bad_header", f"content-encoding {coding} but the body does not start like gzip "
                                        f"(first bytes {data[:4].hex() or 'none'})")
    if coding == "deflate" and not _zlib_header(data):
        wbits = -zlib.MAX_WBITS   # "deflate" sent as a raw DEFLATE stream (no zlib header), as some servers do
    out: list[bytes] = []
    size = 0
    members = 1
    pending = data
    while True:
        d = zlib.decompressobj(wbits)
        try:
            while True:
                chunk = d.decompress(pending, _CHUNK)
                size += len(chunk)
                if size > limit:
                    raise DecodeError("too_large", f"{coding} body inflates past {limit} bytes")
                out.append(chunk)
                pending = d.unconsumed_tail
                if not pending:
                    break
            tail = d.flush()
        except zlib.error as exc:
            raise DecodeError("truncated", f"{coding} body does not inflate: {exc}") from None
        size += len(tail)
        if size > limit:
            raise DecodeError("too_large", f"{coding} body inflates past {limit} bytes")
        if not d.eof:
            raise DecodeError("truncated", f"{coding} body ends before its compressed stream does")
        out.append(tail)
        rest = d.unused_data
        if not rest:
            return b"".join(out)
        if not (gzip and rest.startswith(_GZIP_MAGIC)):
            raise DecodeError("bad_header", f"{len(rest)} bytes follow the {coding} stream that are not "
                                            f"{'another gzip member' if gzip else coding}")
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise DecodeError("too_large", f"gzip body of more than {MAX_GZIP_MEMBERS} members")
        pending = rest


def _zlib_header(data: bytes) -> bool:
    """Whether `data` starts with a zlib header (RFC 1950: method 8, check bits)."""
    return len(data) >= 2 and (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
