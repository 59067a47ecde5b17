"""Every decoder raises only DecodeError, whatever the body and headers (hypothesis, bounded examples).

The longer run is `python scripts/fuzz_decoders.py --seconds 60` (every decoder and the CloudEvents parser).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from sentinel.errors import DecodeError
from sentinel.protocols import DecodeHints, kserve_v1, oip_v2, torchserve
from sentinel.protocols.fuzz import bodies, headers
from sentinel.proxy import ingest

pytestmark = pytest.mark.slow

DECODERS = {
    "v2.request": oip_v2.decode_request, "v2.response": oip_v2.decode_response,
    "v1.request": kserve_v1.decode_request, "v1.response": kserve_v1.decode_response,
    "torchserve.request": torchserve.decode_request, "torchserve.response": torchserve.decode_response,
    "ingest.binary": lambda b, h, _: ingest.parse_event({"ce-id": "1", "ce-type": ingest.REQUEST_TYPE, **h}, b),
    "ingest.structured": lambda b, h, _: ingest.parse_event({"content-type": ingest.STRUCTURED}, b),
}
HINTS = DecodeHints(raw_shape=(1, 8, 8), input_shape=(1, 8, 8), classes=("a", "b"))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoders_raise_only_decode_error_fuzzed(name):
    fn = DECODERS[name]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(bodies, headers)
    def run(body, hdrs):
        try:
            fn(body, hdrs, HINTS)
        except DecodeError:
            pass

    run()


