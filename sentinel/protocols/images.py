"""Encoded images (PNG, JPEG, ...) carried as bytes, decoded to uint8 arrays."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from sentinel.protocols.base import DecodeError

_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


def looks_like_image(data: bytes) -> bool:
    """True when the bytes start with a common image file signature."""
    return any(data.startswith(m) for m in _MAGIC)


def decode_images(items: Sequence[bytes]) -> np.ndarray:
    """N encoded images of one size → uint8 array N×H×W (grey) or N×H×W×C."""
    try:
        from PIL import Image  # lazy: only the analysis worker decodes images
    except ImportError:
        raise DecodeError("unsupported", "encoded images need Pillow, which is not installed") from None
    arrays = []
    for i, data in enumerate(items):
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                grey = im.mode in ("1", "L", "LA", "I", "I;16")
                arrays.append(np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8))
        except Exception as exc:  # PIL raises many types for corrupt input
            raise DecodeError("bad_image", f"image {i}: cannot decode: {exc}") from None
    if not arrays:
        raise DecodeError("bad_shape", "no images in payload")
    if any(a.shape != arrays[0].shape for a in arrays):
        raise DecodeError("bad_shape", "images in one batch differ in size: "
                                       + ", ".join(str(a.shape) for a in arrays[:4]))
    return np.stack(arrays)
