"""The analysis worker process: decode sampled pairs, feed the model's monitor, report back.

Runs in a spawned process so decoding and analysis never hold the proxy's GIL. It reads
pickled `Sample`s from one pipe and writes one plain tuple per sample to another:

    ("sample", model, outcome, decode_error_kind | None, [(metric, labels, op, value)...], payload_bytes)
    ("error", kind, message)                  an exception in a monitor
    ("status", model, dict)                   a monitor's status, at most once a second
    ("buckets", {metric: bounds})             histogram bounds a monitor asks for
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

DEFAULT_FACTORY = "sentinel.analysis.monitor:build_monitor"
STATUS_EVERY_S = 1.0

log = logging.getLogger("sentinel.analysis.worker")


def load_factory(spec: str) -> Callable[[Any, Any], Any]:
    """`module:function` → the function; the built-in monitor when the default module is absent."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if spec == DEFAULT_FACTORY and exc.name in (mod_name, "sentinel.analysis.monitor"):
            from sentinel.proxy.builtin_monitor import build_builtin
            return build_builtin
        raise
    return getattr(mod, fn_name)


def decode(sample: Any, model: str, hints: Any = None):
    """A DecodedBatch from a Sample, and the kind of the first decode error (or None).

    `hints` (sentinel.protocols.DecodeHints) say what the model's inputs look like: raw
    tensor shape and dtype, the pixel bound of encoded images.
    """
    from sentinel.analysis.contract import DecodedBatch
    from sentinel.protocols import DecodeError, DecodeHints, decode_request, decode_response

    hints = hints or DecodeHints()
    inputs = form = outputs = kind = None
    err: str | None = None
    try:
        req = decode_request(sample.protocol, sample.request_body, sample.request_headers, hints)
        inputs, form = req.inputs, req.form
    except DecodeError as exc:
        err = exc.kind
    try:
        resp = decode_response(sample.protocol, sample.response_body, sample.response_headers, hints)
        outputs, kind = resp.outputs, resp.kind
    except DecodeError as exc:
        err = err or exc.kind
    batch = DecodedBatch(model=model, inputs=inputs, input_form=form, outputs=outputs, output_kind=kind,
                         source=sample.source, request_id=sample.request_id, timestamp=sample.timestamp)
    return batch, err


def main(config: Any, factory_spec: str, samples: Any, results: Any) -> None:
    """Worker entry point (spawned): loop until `samples` is closed (or a None arrives)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides when we stop
    factory = load_factory(factory_spec)
    monitors: dict[str, Any] = {}
    last_status: dict[str, float] = {}
    last_windows: dict[str, Any] = {}
    models = {m.name: m for m in config.models}
    hints: dict[str, Any] = {}
    while True:
        try:
            sample = samples.recv()
        except (EOFError, OSError):   # the daemon closed the pipe (stopping) or is gone
            break
        if sample is None:
            break
        model = sample.model
        if model not in hints:
            from sentinel.protocols.hints import hints_for

            hints[model] = hints_for(config, models[model]) if model in models else None
        batch, err = decode(sample, model, hints[model])
        updates: list[tuple] = []
        if batch.inputs is not None or batch.outputs is not None:
            try:
                mon = monitors.get(model)
                if mon is None:
                    mon = monitors[model] = factory(config, models[model])
                    buckets = getattr(mon, "buckets", None)
                    if callable(buckets):
                        results.send(("buckets", dict(buckets())))
                updates = [(u.metric, dict(u.labels), u.op, float(u.value)) for u in mon.observe(batch)]
            except Exception as exc:  # any monitor failure is reported, never fatal
                results.send(("error", type(exc).__name__, f"{model}: {exc}"))
        try:
            size = len(sample.request_body) + len(sample.response_body)
            results.send(("sample", model, "rejected" if err else "decoded", err, updates, size))
        except (BrokenPipeError, OSError):
            break
        now = time.monotonic()
        mon = monitors.get(model)
        evaluated = getattr(mon, "windows", None)       # a new evaluation: /status follows it at once
        if mon is not None and (now - last_status.get(model, 0.0) >= STATUS_EVERY_S
                                or evaluated != last_windows.get(model)):
            last_status[model] = now
            last_windows[model] = evaluated
            try:
                results.send(("status", model, mon.status()))
            except Exception as exc:
                results.send(("error", type(exc).__name__, f"{model} status: {exc}"))
