"""Fuzz every wire decoder (and the CloudEvents parser) for a fixed time each; exit 1 on any error outside the tree.

    python scripts/fuzz_decoders.py --seconds 60

Hypothesis drives hostile bodies and headers (sentinel.protocols.fuzz); every exception that
is not a DecodeError/IngestError (the project's error tree) is printed with its input.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings

from hypothesis import HealthCheck, given, settings

from sentinel.errors import SentinelError
from sentinel.protocols import DecodeHints, kserve_v1, oip_v2, torchserve
from sentinel.protocols.fuzz import bodies, headers

HINTS = DecodeHints(raw_shape=(1, 8, 8), input_shape=(1, 8, 8), classes=("a", "b"))


def targets() -> dict:
    out = {
        "v2.request": lambda b, h: oip_v2.decode_request(b, h, HINTS),
        "v2.response": lambda b, h: oip_v2.decode_response(b, h, HINTS),
        "v1.request": lambda b, h: kserve_v1.decode_request(b, h, HINTS),
        "v1.response": lambda b, h: kserve_v1.decode_response(b, h, HINTS),
        "torchserve.request": lambda b, h: torchserve.decode_request(b, h, HINTS),
        "torchserve.response": lambda b, h: torchserve.decode_response(b, h, HINTS),
    }
    try:
        from sentinel.proxy import ingest

        out["ingest.parse_event"] = lambda b, h: ingest.parse_event(
            {"ce-id": "1", "ce-type": ingest.REQUEST_TYPE, **h}, b)
        out["ingest.structured"] = lambda b, h: ingest.parse_event(
            {"content-type": "application/cloudevents+json"}, b)
    except ImportError:
        pass
    return out


def fuzz(name: str, fn, seconds: float) -> tuple[int, list[str]]:
    """Run hypothesis rounds (fresh random inputs each) until `seconds` have passed."""
    found: list[str] = []
    count = 0

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=False)
    @given(bodies, headers)
    def run(body, hdrs):
        nonlocal count
        count += 1
        try:
            fn(body, hdrs)
        except SentinelError:
            pass
        except Exception as exc:  # noqa: BLE001 - what we are hunting for
            found.append(f"{name}: {type(exc).__name__}: {exc}\n  body={body[:200]!r} headers={hdrs}\n"
                         + traceback.format_exc(limit=4))

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run()
    return count, found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    warnings.simplefilter("error", RuntimeWarning)   # as the test suite does: a numpy warning is a finding
    bad = 0
    for name, fn in targets().items():
        n, found = fuzz(name, fn, args.seconds)
        print(f"{name}: {n} inputs in {args.seconds:g} s, {len(found)} outside the error tree", flush=True)
        for f in found[:5]:
            print(f)
        bad += len(found)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
