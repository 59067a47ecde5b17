"""TorchServe inference API: `POST /predictions/{name}`, an image, JSON or raw tensor bytes in, JSON out."""

from __future__ import annotations

import binascii
import io
import json
from typing import Any, Literal

import numpy as np

from sentinel.errors import DecodeError
from sentinel.protocols.base import (
    MAX_ELEMENTS,
    NO_HINTS,
    DecodedRequest,
    DecodedResponse,
    DecodeHints,
    Headers,
    as_output_batch,
    first_instance_shape,
    input_batch,
    numeric_array,
    parse_json,
)
from sentinel.protocols.images import b64_bytes, image_batch, looks_like_image
from sentinel.protocols.tensors import check_shape, numel

OCTET_STREAM = "application/octet-stream"
RAW_DTYPES = ("float32", "float16", "uint8", "int64")


MULTIPART = "multipart/form-data"
MAX_PARTS = 64   # parts of one multipart body looked at
_PART_NAMES = ("data", "body")   # the form fields TorchServe's handlers read, in that order


def _media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def decode_request(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedRequest:
    """An image file body; raw tensor bytes (octet-stream, shaped by the hints); a multipart form
    (`curl -F data=@img.png`: its `data` or `body` part, else the first); or JSON: a (batch of)
    tensors, `{"data"|"instances"|"input"|"inputs": ...}`, or a base64-encoded image string."""
    media = _media_type(headers)
    if media == MULTIPART:
        body, headers = multipart_part(body, headers)
        media = _media_type(headers)
    if body.startswith(NPY_MAGIC):
        # A NumPy .npy file (np.save; clients of handlers that np.load the body): its own header says
        # dtype and shape. Read as raw octet-stream, its header became pixels of extra instances.
        try:
            arr = npy_array(body)
        except DecodeError:
            if media != OCTET_STREAM or not _whole_instances(body, hints):
                raise
        else:
            return input_batch(first_instance_shape(arr, hints.raw_shape), hints, maybe_single=True)
    if media == OCTET_STREAM and looks_like_image(body) and _whole_instances(body, hints):
        # Raw tensor bytes can start like an image file (two pixels 66, 77 read "BM"): an image
        # only when it decodes as one, else the raw tensor its length fits.
        try:
            return image_batch([body], hints)
        except DecodeError as exc:
            if exc.kind != "bad_image":
                raise
            return DecodedRequest(*_raw_tensor(body, hints))
    if looks_like_image(body) or media.startswith("image/"):
        return image_batch([body], hints)
    if media == OCTET_STREAM:
        return DecodedRequest(*_raw_tensor(body, hints))
    if media.startswith(("audio/", "video/")):
        raise DecodeError("unsupported", f"a {media[:60]} body: sentinel reads images, raw tensors and JSON")
    doc: Any = parse_json(body, "body (neither an image nor raw tensor bytes)")
    if isinstance(doc, dict):
        for key in ("data", "instances", "input", "inputs"):
            if key in doc:
                doc = doc[key]
                break
        else:
            raise DecodeError("missing_field", "JSON object has no data, instances or input field")
    if isinstance(doc, str):   # TorchServe's vision handlers take a base64 image in JSON
        try:
            blob = b64_bytes(doc)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise DecodeError("bad_image", f"input is a string but not base64: {exc}"[:300]) from None
        if not looks_like_image(blob):
            raise DecodeError("unsupported", "input is a base64 string that is not an encoded image")
        return image_batch([blob], hints)
    arr = numeric_array(doc, "input")
    arr = first_instance_shape(arr, hints.raw_shape)
    return input_batch(arr, hints, maybe_single=True)


NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_MAX = 10000   # bytes of a .npy header read (NumPy's own default bound)


def npy_array(body: bytes) -> np.ndarray:
    """The array of a NumPy .npy file: numbers only (no pickled objects), its shape checked against
    the element bound and its data length against the shape before anything is allocated."""
    from numpy.lib import format as npy

    f = io.BytesIO(body)
    try:
        version = npy.read_magic(f)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=_NPY_HEADER_MAX)
    except (ValueError, SyntaxError, TypeError, OverflowError) as exc:
        raise DecodeError("bad_header", f".npy body with an unreadable header: {exc}"[:300]) from None
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise DecodeError("unsupported", f".npy body of dtype {str(dtype)[:60]}: sentinel reads numeric arrays")
    shape = check_shape(list(shape), ".npy")
    data = memoryview(body)[f.tell():]
    want = numel(shape) * dtype.itemsize
    if len(data) != want:
        raise DecodeError("truncated" if len(data) < want else "bad_shape",
                          f".npy body: shape {list(shape)} of {dtype} needs {want} bytes, got {len(data)}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return arr.astype(dtype.newbyteorder("="), copy=False)


def multipart_part(body: bytes, headers: Headers) -> tuple[bytes, dict[str, str]]:
    """The part of a multipart/form-data body a TorchServe handler reads (field `data`, else
    `body`, else the first), and its headers (lower-case names); DecodeError when malformed."""
    ctype = headers.get("content-type", "")
    boundary = ""
    for param in ctype.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary or len(boundary) > 200:
        raise DecodeError("bad_header", "multipart/form-data without a usable boundary parameter")
    delim = b"--" + boundary.encode("latin-1")
    chunks = body.split(delim, MAX_PARTS + 1)
    parts: list[tuple[str, dict[str, str], bytes]] = []
    for chunk in chunks[1:MAX_PARTS + 1]:
        if chunk.startswith(b"--"):   # the closing delimiter
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise DecodeError("truncated", "a multipart part has no blank line after its headers")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        phead: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                phead[name.strip().lower()] = value.strip()
        field = ""
        for param in phead.get("content-disposition", "").split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "name":
                field = value.strip().strip('"')
        parts.append((field, phead, content))
    if not parts:
        raise DecodeError("missing_field", "multipart/form-data body has no parts (wrong boundary?)")
    for wanted in _PART_NAMES:
        for field, phead, content in parts:
            if field == wanted:
                return content, phead
    return parts[0][2], parts[0][1]


def _whole_instances(body: bytes, hints: DecodeHints) -> bool:
    """Whether the body's length is a whole number of the hints' raw instances."""
    if hints.raw_shape is None or hints.raw_dtype not in RAW_DTYPES:
        return False
    per = numel(hints.raw_shape) * np.dtype(hints.raw_dtype).itemsize
    return per > 0 and len(body) > 0 and len(body) % per == 0


def _raw_tensor(body: bytes, hints: DecodeHints) -> tuple[np.ndarray, Literal["raw", "network"]]:
    """A flat little-endian array of the hints' raw dtype, shaped N × raw_shape."""
    if hints.raw_shape is None:
        raise DecodeError("unsupported", "raw application/octet-stream tensor, but the model's raw input "
                                         "shape is not configured (model.yaml raw_input or the config's "
                                         "models[].raw_input)")
    if hints.raw_dtype not in RAW_DTYPES:
        raise DecodeError("bad_datatype", f"raw input dtype {hints.raw_dtype!r} is not one of {', '.join(RAW_DTYPES)}")
    dt = np.dtype(hints.raw_dtype).newbyteorder("<")
    per = numel(hints.raw_shape) * dt.itemsize
    if per == 0 or len(body) == 0 or len(body) % per:
        raise DecodeError("bad_shape", f"raw tensor of {len(body)} bytes is not a whole number of "
                                       f"{hints.raw_dtype} instances of shape {list(hints.raw_shape)} ({per} bytes each)")
    if len(body) // dt.itemsize > MAX_ELEMENTS:
        raise DecodeError("too_large", f"raw tensor holds more than {MAX_ELEMENTS} elements")
    arr = np.frombuffer(body, dtype=dt).reshape((-1, *hints.raw_shape))
    return arr, "raw"


def decode_response(body: bytes, headers: Headers, hints: DecodeHints = NO_HINTS) -> DecodedResponse:
    """Scores as a list (one request) or a list of lists (a batch).

    The stock image classifier answers its top-k as `{class: probability}`: with the hints'
    classes given (replay), that answer is read as the top-1 class name (`labels`, outputs N × 0);
    without (analysis) it is refused, since it is not a score vector.
    """
    doc: Any = parse_json(body)
    if isinstance(doc, list) and doc and all(isinstance(d, dict) for d in doc):
        rows = doc
    elif isinstance(doc, dict):
        rows = [doc]
    else:
        return as_output_batch(numeric_array(doc, "response scores"))
    classes = hints.classes
    if not classes:
        raise DecodeError("unsupported", "response is a {class: score} mapping (top-k), not a score vector")
    labels = []
    for row in rows:
        try:
            scored = {str(k): float(v) for k, v in row.items()}
        except (TypeError, ValueError):
            raise DecodeError("bad_datatype", f"cannot read class scores from keys {sorted(map(str, row))[:5]}") from None
        if not scored:
            raise DecodeError("missing_field", "empty {class: score} mapping")
        if not all(np.isfinite(v) for v in scored.values()):   # max() over NaN answers whichever came first
            raise DecodeError("nonfinite_output", "the {class: score} mapping holds NaN or infinite scores")
        best = max(scored, key=scored.__getitem__)
        if best not in classes:
            raise DecodeError("unsupported", f"class {best[:80]!r} in the response is not among the model's classes")
        labels.append(best)
    return DecodedResponse(np.zeros((len(rows), 0)), "probabilities", labels=tuple(labels))


def encode_request(x: np.ndarray, *, raw: bool = False) -> tuple[bytes, dict[str, str]]:
    """JSON instance(s), or (raw=True) the array's little-endian bytes as application/octet-stream."""
    x = np.asarray(x)
    if raw:
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes(), {"content-type": OCTET_STREAM}
    return json.dumps(x.tolist(), separators=(",", ":")).encode(), {"content-type": "application/json"}


def encode_response(scores: np.ndarray, *, single: bool = False) -> tuple[bytes, dict[str, str]]:
    """Scores as JSON: one row for a single instance, else a list of rows."""
    s = np.asarray(scores)
    body = json.dumps((s[0] if single else s).tolist(), separators=(",", ":")).encode()
    return body, {"content-type": "application/json"}
