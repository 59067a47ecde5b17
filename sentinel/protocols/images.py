"""Encoded images (PNG, JPEG, ...) carried as bytes, decoded to uint8 arrays within a pixel bound."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from sentinel.errors import DecodeError
from sentinel.protocols.base import DecodedRequest, DecodeHints, images_in_layout

_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
BATCH_PIXEL_FACTOR = 8   # a batch may hold this many images of the per-image limit
MAX_IMAGES = 4096        # encoded images in one batch: 1×1 PNGs (67 bytes) pass the pixel bound, and a
                         # 64 MiB body of them (a million) would take minutes of the worker to open


_WS = re.compile(r"[ \t\r\n]+")


def b64_bytes(text: Any) -> bytes:
    """Base64 text as clients write it: standard or URL-safe alphabet, maybe wrapped in lines
    (MIME style); anything else is binascii.Error/TypeError, as b64decode's own."""
    if not isinstance(text, str):
        raise TypeError(f"b64 value is a {type(text).__name__}, not a string")
    text = _WS.sub("", text)
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text, validate=True)


def b64_images(items: Sequence[bytes]) -> list[bytes] | None:
    """The encoded images that base64 text items hold (KServe's v2 image clients send BYTES that
    way), or None when any item is not base64 of an image."""
    out = []
    for item in items:
        try:
            blob = b64_bytes(item.decode("ascii"))
        except (binascii.Error, TypeError, ValueError):
            return None
        if not looks_like_image(blob):
            return None
        out.append(blob)
    return out


def looks_like_image(data: bytes) -> bool:
    """True when the bytes start with a common image file signature (RIFF only when WebP: a RIFF
    WAVE is audio)."""
    return any(data.startswith(m) for m in _MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _pixels(im: Any, i: int, channels: int | None) -> np.ndarray:
    """One decoded image as uint8 H×W (grey) or H×W×3, for a model reading `channels` (1 or 3; None:
    as the image is, grey images and grey palettes grey). Alpha is dropped, palettes expanded, and
    16-bit grey scaled to 8 bits (65535 → 255), never clipped (Pillow's convert("L") clips)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        wide = np.asarray(im).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise DecodeError("unsupported", f"image {i}: 32-bit integer pixels beyond 16 bits")
        eight: np.ndarray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(eight[..., None], 3, axis=2) if channels == 3 else eight
    if mode == "F":
        raise DecodeError("unsupported", f"image {i}: floating-point pixels (mode F) have no 8-bit reading")
    if channels is None:
        grey = mode in ("1", "L", "LA", "La") or (mode in ("P", "PA") and _grey_palette(im))
    else:
        grey = channels == 1
    return np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)


def _grey_palette(im: Any) -> bool:
    """Whether every colour of a palette image's palette is a grey (r = g = b)."""
    pal = im.getpalette() or []
    rgb = np.asarray(pal[:len(pal) - len(pal) % 3], dtype=np.int64).reshape(-1, 3)
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def decode_images(items: Sequence[bytes], max_pixels: int, channels: int | None = None) -> np.ndarray:
    """N encoded images of one size → uint8 array N×H×W (grey) or N×H×W×3.

    `channels` (1 or 3) is what the model reads (`DecodeHints.image_channels`): every image is
    converted to it, as a server's preprocessing would (a colour photo for a grey model, a
    grey scan for a colour one); None keeps each image's own.

    Each image's dimensions are read from its header (Pillow opens lazily) and checked
    against `max_pixels` before its bitmap is decoded, so a small file that claims a huge
    bitmap costs nothing.
    """
    try:
        from PIL import Image  # lazy: only the analysis worker decodes images
    except ImportError:
        raise DecodeError("unsupported", "encoded images need Pillow, which is not installed") from None
    if len(items) > MAX_IMAGES:
        raise DecodeError("too_large", f"{len(items)} encoded images in one batch, more than the limit {MAX_IMAGES}")
    arrays = []
    total = 0
    for i, data in enumerate(items):
        try:
            with warnings.catch_warnings():
                # Our own bound below is tighter and relative to the model; Pillow's global one only warns.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                    if w * h > max_pixels:
                        raise DecodeError("too_large", f"image {i}: {w}×{h} pixels, more than the limit "
                                                       f"{max_pixels} for this model's input size")
                    total += w * h
                    if total > BATCH_PIXEL_FACTOR * max_pixels:
                        raise DecodeError("too_large", f"images 0..{i}: {total} pixels in one batch, more than "
                                                       f"{BATCH_PIXEL_FACTOR * max_pixels}")
                    im.load()
                    arrays.append(_pixels(im, i, channels))
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise DecodeError("too_large", f"image {i}: {exc}"[:300]) from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt input
            raise DecodeError("bad_image", f"image {i}: cannot decode: {exc}"[:300]) from None
    if not arrays:
        raise DecodeError("bad_shape", "no images in payload")
    if any(a.shape != arrays[0].shape for a in arrays):
        # A valid request (a server resizes each image on its own), which the analysis cannot stack:
        # unsupported, not the client's bad_shape
        raise DecodeError("unsupported", "images in one batch differ in size ("
                                         + ", ".join("×".join(map(str, a.shape[:2])) for a in arrays[:4])
                                         + "); sentinel analyses a batch of images of one size")
    return np.stack(arrays)


def image_batch(items: Sequence[bytes], hints: DecodeHints) -> DecodedRequest:
    """Encoded images as the model's raw input batch: decoded within the hints' pixel bound, converted
    to the channels it reads and laid out as its raw input is (N×H×W, N×H×W×C or N×C×H×W)."""
    images = decode_images(items, hints.image_pixel_limit, hints.image_channels)
    return DecodedRequest(images_in_layout(images, hints.layout), "raw")
