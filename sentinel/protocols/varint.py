"""The protobuf base-128 varint, read without protobuf (or numpy): stdlib only, so the proxy can use it.

One reader for every hand-walked protobuf in the project: the gRPC wire format's decoder
(`oip_grpc`), the proxy's model-name peek (`proxy/grpc_proxy`) and the ONNX graph walk
(`verify/runtime`). Each turns `VarintError` into its own convention (DecodeError, None,
ValueError).
"""

from __future__ import annotations

MAX_VARINT_BYTES = 10   # a 64-bit value takes at most 10 bytes (7 bits each)


class VarintError(ValueError):
    """A varint cut short by the end of its buffer (`truncated`) or longer than 10 bytes."""

    def __init__(self, message: str, truncated: bool) -> None:
        super().__init__(message)
        self.truncated = truncated


def read_varint(buf: bytes | bytearray | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    """The varint at buf[pos:] (read no further than `end`, default the buffer's end) and the offset after it."""
    stop = len(buf) if end is None else end
    value = shift = 0
    for i in range(pos, min(stop, pos + MAX_VARINT_BYTES)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    if stop - pos >= MAX_VARINT_BYTES:
        raise VarintError(f"varint longer than {MAX_VARINT_BYTES} bytes at byte {pos}", truncated=False)
    raise VarintError(f"varint cut short at byte {stop}", truncated=True)
