"""Small helpers shared by command modules."""

from __future__ import annotations

import sys
from pathlib import Path


def write_json_report(doc: dict, json_out: Path | None) -> None:
    """Write a report as JSON to a file, or to stdout when the path is `-`."""
    import json

    if json_out is None:
        return
    # NaN and infinities are not JSON (json.dumps writes bare NaN tokens other parsers refuse):
    # a statistic that has no finite value is written as null.
    text = json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n"
    if str(json_out) == "-":
        sys.stdout.write(text)
    else:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)  # the folder the user named, nothing else
            json_out.write_text(text, encoding="utf-8")
        except OSError as exc:
            from sentinel.errors import InfrastructureError

            raise InfrastructureError(f"--json {json_out}: cannot write the report ({exc.strerror or exc})") from None


def check_json_target(json_out: Path | None) -> None:
    """Refuse a --json path that cannot be written, before a run whose report would be lost.

    Nothing is created: the path must not be a directory, and its nearest existing ancestor
    must be a writable directory (the missing folders are made when the report is written)."""
    import os

    from sentinel.errors import UsageError

    if json_out is None or str(json_out) == "-":
        return
    if json_out.is_dir():
        raise UsageError(f"--json {json_out}: is a directory; name a file")
    parent = json_out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--json {json_out}: cannot be written ({parent} is not a writable directory)")


def json_safe(v: object) -> object:
    """`v` with every non-finite float (NaN, ±inf) replaced by None, recursively."""
    import math

    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v
