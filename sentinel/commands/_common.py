"""Small helpers shared by command modules."""

from __future__ import annotations

import sys
from pathlib import Path


def write_json_report(doc: dict, json_out: Path | None) -> None:
    """Write a report as JSON to a file, or to stdout when the path is `-`."""
    import json

    if json_out is None:
        return
    text = json.dumps(doc, indent=2) + "\n"
    if str(json_out) == "-":
        sys.stdout.write(text)
    else:
        json_out.parent.mkdir(parents=True, exist_ok=True)  # the folder the user named, nothing else
        json_out.write_text(text, encoding="utf-8")
