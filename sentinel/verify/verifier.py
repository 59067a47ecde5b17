"""`sentinel verify`: compare an export with the reference on a golden set, localize divergence."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sentinel.errors import UsageError
from sentinel.golden import GoldenSet
from sentinel.registry import ModelEntry, sha256_file
from sentinel.scores import is_distribution
from sentinel.verify.localize import (
    LayerError,
    capture_reference,
    checkpoint_names,
    first_divergence,
    layer_error,
    onnx_values,
)
from sentinel.verify.policy import Policy, policy_for
from sentinel.verify.runtime import PRECISIONS, OnnxExport, open_export
from sentinel.verify.stats import error_stats, softmax, topk_agreement

Localize = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class VerifyReport:
    """The verification document (fields in docs/replay_verify.md) and its verdict."""

    doc: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.doc["passed"])

    @property
    def failures(self) -> list[str]:
        return list(self.doc["failures"])


def recorded_precision(entry: ModelEntry, path: Path) -> str | None:
    """The precision model.yaml records for this exact file (by sha256), if any."""
    digest = None
    for e in entry.manifest.exports:
        if digest is None:
            digest = sha256_file(path)
        if e.sha256 == digest:
            return e.precision
    return None


def verify_export(path: Path, entry: ModelEntry, golden: GoldenSet, *, precision: str | None = None,
                  atol: float | None = None, rtol: float | None = None, min_top1: float | None = None,
                  localize: Localize = "auto", localize_samples: int = 4, worst: int = 10,
                  threads: int | None = None) -> VerifyReport:
    """Run the export on the golden inputs, compare with the reference outputs under the policy."""
    t0 = time.perf_counter()
    # Sessions without spinning workers: verify shares the machine (a failing run loads the
    # reference on a thread beside onnxruntime), and spinning burnt CPU without making it faster.
    export = open_export(path, threads, spin=False)
    inputs = golden.inputs
    want = tuple(entry.manifest.input.shape)
    if tuple(inputs.shape[1:]) != want:
        raise UsageError(f"{golden.path}: inputs are {list(inputs.shape[1:])} per sample; {entry.spec} takes {list(want)}")
    feed = inputs   # what the export is given; the reference's checkpoints always see network inputs
    raw_spec = entry.manifest.raw_input
    if isinstance(export, OnnxExport):
        got_shape = tuple(export.input_shape[1:])
        raw_shape = tuple(raw_spec.shape) if raw_spec is not None else None
        if (got_shape != want and got_shape == raw_shape and golden.raw is not None
                and tuple(golden.raw.shape[1:]) == raw_shape):
            # preprocessing baked into the export: it takes what the server receives (model.yaml's
            # raw_input), and the golden set keeps those inputs too
            feed = np.asarray(golden.raw, np.float32)
        elif all(isinstance(d, int) for d in got_shape) and got_shape != want:
            why = ("a channels-last (NHWC) export? verify feeds N×C×H×W as the reference takes it"
                   if sorted(got_shape) == sorted(want) else "is this an export of another model?")
            raise UsageError(f"{path}: takes inputs {list(got_shape)} per sample, but {entry.spec} takes {list(want)}; {why}")
    detected = export.precision
    prec = precision or recorded_precision(entry, path) or detected
    if prec not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {prec!r}")
    policy = policy_for(prec, atol=atol, rtol=rtol, min_top1=min_top1)
    ref_logits, ref_probs = golden.logits, golden.probabilities   # stored, digest-checked: no reference run
    localizer: _Localizer | None = None
    reference: _Reference | None = None
    on_chunk = None
    if localize == "always" and isinstance(export, OnnxExport):
        # The torch reference loads on a thread while one instrumented session serves the
        # plain run and the localization.
        reference = _Reference(entry)
        localizer = _Localizer(export, entry)
    elif localize == "auto" and isinstance(export, OnnxExport):
        doomed = _failure_watch(policy, ref_logits)

        def on_chunk(start: int, chunk: dict[str, np.ndarray]) -> None:
            nonlocal reference
            if reference is None and doomed(start, chunk):
                # the instrumented session builds and torch imports while the remaining chunks run
                reference = _Reference(entry, export)
    t_load = time.perf_counter()

    outs = export.run(feed, on_chunk=on_chunk) if on_chunk else export.run(feed)
    t_run = time.perf_counter()
    name = _scores_output(path, outs, export.output_names, ref_logits.shape)
    out = outs[name]
    # An output named `logits` by the export is taken at its word; TorchScript's bare tensor is
    # named so by verify, not by its author, and may hold a softmax.
    named_logits = name == "logits" and export.names_outputs
    served = "logits" if named_logits else _served_kind(out)
    if served == "probabilities":
        got_probs = out.astype(np.float64)
    elif served == "log_probabilities":
        got_probs = np.exp(out.astype(np.float64))
    else:
        got_probs = softmax(out.astype(np.float64))
    served_probs = served != "logits"
    stats: dict[str, Any] = {}
    if not served_probs:
        stats["logits"] = error_stats(out, ref_logits, policy.atol, policy.rtol)
    stats["probabilities"] = error_stats(got_probs, ref_probs, policy.atol, policy.rtol)
    top1 = topk_agreement(got_probs, ref_logits, 1)
    top5 = topk_agreement(got_probs, ref_logits, 5)
    failures = _judge(policy, stats, top1, got_probs, ref_probs, served)
    nonfinite = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if len(nonfinite):
        failures.insert(0, f"{name} holds NaN or infinite values for {len(nonfinite)} of {len(out)} samples "
                           f"(e.g. id {int(golden.ids[nonfinite[0]])})")

    per_sample = np.max(np.abs((out if not served_probs else got_probs).astype(np.float64)
                               - (ref_logits if not served_probs else ref_probs)), axis=1)
    order = np.argsort(-per_sample, kind="stable")
    ids = golden.ids
    worst_rows = [{"index": int(i), "id": int(ids[i]), "max_abs": float(f"{per_sample[i]:.6g}"),
                   "expected": int(ref_logits[i].argmax()), "got": int(got_probs[i].argmax()),
                   "prob_max_abs": float(f"{np.max(np.abs(got_probs[i] - ref_probs[i])):.6g}")}
                  for i in order[:worst]]

    layers: list[dict[str, Any]] = []
    first = None
    note = None
    run_localize = localize == "always" or (localize == "auto" and failures)
    if run_localize:
        if isinstance(export, OnnxExport):
            sel = np.sort(order[:max(1, localize_samples)])
            reference = reference or _Reference(entry, export)
            localizer = localizer or reference.localizer()
            layer_errors = localizer.compare(inputs[sel], policy, reference.model, feed=feed[sel],
                                             stop_at_divergence=localize == "auto")
            layers = [l.as_dict() for l in layer_errors]
            first = first_divergence(layer_errors)
            if first is None:
                note = (f"no module's output differs by more than {policy.layer_rel:g} of its largest "
                        "reference value" + ("; the error accumulates across layers" if failures else ""))
            elif localizer.skipped:
                note = (f"the reference stopped at the first divergence; the {localizer.skipped} later "
                        "checkpoints were not compared (--localize always compares every one)")
            if not any(l.value for l in layer_errors):
                note = "the graph carries no module scopes (not exported by torch.onnx?); cannot localize"
        else:
            note = "localization needs an ONNX export"
    if reference is not None:
        reference.wait()   # a prefetch that turned out unneeded must not outlive the call
    t_end = time.perf_counter()
    doc = {
        "export": str(path),
        "format": export.format,
        "precision": prec,
        "output": name,
        # other outputs the scores could be in: a failing verdict on `output` may be the wrong guess
        "same_shape_outputs": [n for n in export.output_names if n != name and outs[n].shape == out.shape],
        "detected_precision": detected,
        "model": entry.spec,
        "golden": str(golden.path),
        "samples": int(len(inputs)),
        "fed": "raw" if feed is not inputs else "network",   # raw: the export takes model.yaml's raw_input
        "policy": policy.as_dict(),
        "passed": not failures,
        "failures": failures,
        "nonfinite_samples": int(len(nonfinite)),
        "top1_agreement": round(top1, 6),
        "top5_agreement": round(top5, 6),
        "outputs": {k: v.as_dict() for k, v in stats.items()},
        "worst_samples": worst_rows,
        "first_divergence": first,
        "localization_note": note,
        "layers": layers,
        "timings_s": {"load": round(t_load - t0, 3), "run": round(t_run - t_load, 3),
                      "localize": round(t_end - t_run, 3), "total": round(t_end - t0, 3)},
    }
    return VerifyReport(doc)


def _scores_output(path: Path, outs: dict[str, np.ndarray], order: list[str], want: tuple[int, ...]) -> str:
    """The output holding the class scores: `logits` by name, else the first of the reference's shape.

    Exports with more than one output (embeddings first, then scores) and other names are
    common; the first output is only a guess, so the shape decides."""
    if "logits" in outs and outs["logits"].shape == want:
        return "logits"
    fits = [n for n in order if outs[n].shape == want]
    if fits:
        return fits[0]
    shapes = ", ".join(f"{n!r} {list(outs[n].shape)}" for n in order)
    raise UsageError(f"{path}: no output has the reference's shape {list(want)} (outputs: {shapes}); "
                     "is this an export of another model?")


def _served_kind(out: np.ndarray) -> str:
    """What an export's score output holds when its name does not say: probabilities (rows in [0, 1]
    summing to one), log-probabilities (rows ≤ 0 whose exponentials sum to one) or logits."""
    if is_distribution(out):
        return "probabilities"
    o = np.asarray(out, np.float64)
    if o.size and np.isfinite(o).all() and o.max() <= 1e-6:
        with np.errstate(under="ignore"):
            if bool((np.abs(np.exp(o).sum(axis=1) - 1.0) <= 1e-3).all()):
                return "log_probabilities"
    return "logits"


def _judge(policy: Policy, stats: dict[str, Any], top1: float, got_probs: np.ndarray,
           ref_probs: np.ndarray, served: str = "logits") -> list[str]:
    """One sentence per requirement the export misses.

    An export that serves probabilities (or log-probabilities) has no logits to compare: its
    probabilities are held to the policy's elementwise tolerance instead (softmax moves no
    probability by more than half the largest logit change, so this is no looser). Before, only
    top-1 was judged, and a corrupted layer behind a softmax passed with |Δp| up to 0.09.
    """
    out = []
    if top1 < policy.min_top1:
        out.append(f"top-1 agreement {top1:.2%} is below {policy.min_top1:.2%}")
    lg = stats.get("logits")
    if policy.elementwise and lg is not None and not lg.passed:
        out.append(f"logits differ by up to {lg.max_abs:.3g} (needs atol {lg.min_atol:.3g} at rtol {policy.rtol:g}; "
                   f"policy atol {policy.atol:g})")
    pr = stats.get("probabilities")
    if policy.elementwise and lg is None and pr is not None and not pr.passed:
        what = "log-probabilities, compared as probabilities" if served == "log_probabilities" else "probabilities"
        out.append(f"probabilities differ by up to {pr.max_abs:.3g} (the export serves {what}; needs atol "
                   f"{pr.min_atol:.3g} at rtol {policy.rtol:g}; policy atol {policy.atol:g})")
    if policy.prob_p99_abs is not None:
        p99 = stats["probabilities"].p99_abs
        if p99 > policy.prob_p99_abs:
            out.append(f"99th percentile of |Δp| is {p99:.3g}, above {policy.prob_p99_abs:g}")
    return out


def _failure_watch(policy: Policy, ref_logits: np.ndarray):
    """A per-chunk check that is true once the run is certain to fail, before all samples are in.

    Certain means: a logit already outside atol + rtol·|ref| (the policy requires every one
    within), or more top-1 disagreements than the policy allows over the whole set.
    """
    total = len(ref_logits)
    allowed = (1.0 - policy.min_top1) * total
    state = {"top1_misses": 0}

    def doomed(start: int, chunk: dict[str, np.ndarray]) -> bool:
        out = chunk.get("logits")
        if out is None:
            return False
        ref = ref_logits[start:start + len(out)]
        if out.shape != ref.shape:
            return False   # reported after the run
        ref64 = ref.astype(np.float64)
        if policy.elementwise and np.any(np.abs(out.astype(np.float64) - ref64) - policy.rtol * np.abs(ref64) > policy.atol):
            return True
        state["top1_misses"] += int(np.sum(out.argmax(1) != ref.argmax(1)))
        return state["top1_misses"] > allowed + 1e-9

    return doomed


def _import_torch() -> None:
    """`import torch` for the reference, set up for a short run on a shared machine.

    - OpenMP workers wait passively (`OMP_WAIT_POLICY=PASSIVE` while torch's libgomp loads;
      it reads the variable once, then the environment is restored): with the default
      spinning, a forward pass of 4 images on 2 busy cores took 2-4 CPU s instead of 0.7.
    - The cyclic garbage collector is paused during the import and torch's objects frozen
      after it: the import creates some 250,000 long-lived objects, which otherwise cost
      full collections during the import and another walk at interpreter exit (0.5-1 s of
      a failing verify's wall time on this project's 2-core machine).

    Only done when this call is the one importing torch: a process that already has it (or
    whose user set OMP_WAIT_POLICY) keeps its own settings.
    """
    import gc
    import os
    import sys

    if "torch" in sys.modules:
        return
    set_policy = "OMP_WAIT_POLICY" not in os.environ
    if set_policy:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        if enabled:
            gc.enable()
        if set_policy:
            os.environ.pop("OMP_WAIT_POLICY", None)
    gc.freeze()


def _build_reference(entry: ModelEntry) -> Any:
    _import_torch()
    return entry.build_model()


class _Reference:
    """The torch reference model (and, given `export`, the instrumented session), built on a thread.

    Building the instrumented session, `import torch` and building the model take seconds of
    mostly single-threaded work; on a thread they overlap onnxruntime's runs (which release
    the GIL)."""

    def __init__(self, entry: ModelEntry, export: OnnxExport | None = None):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="sentinel-reference")
        self._localizer = pool.submit(_Localizer, export, entry) if export is not None else None
        self._model = pool.submit(_build_reference, entry)
        pool.shutdown(wait=False)

    def localizer(self) -> _Localizer:
        assert self._localizer is not None
        return self._localizer.result()

    def model(self) -> Any:
        return self._model.result()

    def wait(self) -> None:
        from concurrent.futures import wait

        wait([f for f in (self._localizer, self._model) if f is not None])


class _Localizer:
    """Checkpoint values exposed in the export's (one) session, and the same modules in the reference."""

    def __init__(self, export: OnnxExport, entry: ModelEntry):
        self.export = export
        self.modules = checkpoint_names(entry.densenet_config())   # no torch needed for the names
        self.values = onnx_values(export.model.graph, self.modules)
        self.outputs = export.instrument(sorted(set(self.values.values())), spin=False)
        self.skipped = 0

    def compare(self, x: np.ndarray, policy: Policy, reference_model: Callable[[], Any],
                stop_at_divergence: bool = False, feed: np.ndarray | None = None):
        """Per-checkpoint errors on inputs x (exported values cast to float32, whatever the graph's type).

        With `stop_at_divergence` the reference's forward pass ends at the first diverging
        checkpoint; later ones are reported unmeasured and counted in `skipped`."""
        names = sorted(set(self.outputs.values()))
        got = self.export.run(x if feed is None else feed, names=names)   # `feed`: the export's own inputs (raw)
        exported = {v: got[out] for v, out in self.outputs.items()}
        model = reference_model()   # waits for the thread building it

        errors: dict[str, LayerError] = {}

        def measure(module: str, ref: np.ndarray) -> bool:
            # each checkpoint is measured once, as its hook fires
            v = self.values.get(module)
            errors[module] = layer_error(module, v, exported.get(v) if v else None, ref, policy.layer_rel)
            return stop_at_divergence and errors[module].diverges

        reference = capture_reference(model, self.modules, x, measure)
        self.skipped = sum(1 for m in self.modules if m not in reference)
        return [errors.get(m) or layer_error(m, self.values.get(m), None, None, policy.layer_rel)
                for m in self.modules]


def render_text(report: VerifyReport) -> str:
    d = report.doc
    fed = " (their raw inputs: the export takes model.yaml's raw_input)" if d.get("fed") == "raw" else ""
    lines = [f"verify {d['export']} ({d['format']} {d['precision']}) against {d['model']} on {d['samples']} golden samples"
             + fed,
             f"top-1 agreement {d['top1_agreement']:.2%}, top-5 {d['top5_agreement']:.2%}"]
    lines.append(f"{'output':<14}{'max abs':>11}{'mean abs':>11}{'p99 abs':>11}{'max rel':>11}{'min atol':>11}{'min rtol':>11}")
    for name, s in d["outputs"].items():
        lines.append(f"{name:<14}" + "".join(f"{s[k]:>11.3g}" for k in
                                             ("max_abs", "mean_abs", "p99_abs", "max_rel", "min_atol", "min_rtol")))
    if d["worst_samples"]:
        w = d["worst_samples"][:3]
        lines.append("worst samples: " + "; ".join(f"id {r['id']} |Δ| {r['max_abs']:.3g} ({r['expected']}→{r['got']})"
                                                  for r in w))
    if d["first_divergence"]:
        row = next(l for l in d["layers"] if l["module"] == d["first_divergence"])
        how = (row.get("problem") if row["max_abs"] is None else
               f"max |Δ| {row['max_abs']:.3g} = {row['rel']:.2g} of its largest reference value")
        lines.append(f"first divergence: {d['first_divergence']} (ONNX value {row['onnx_value']!r}, {how})")
    elif d["localization_note"]:
        lines.append(f"localization: {d['localization_note']}")
    if d.get("same_shape_outputs"):
        lines.append(f"compared output {d['output']!r}; also of the reference's shape: "
                     + ", ".join(repr(n) for n in d["same_shape_outputs"])
                     + " (verify compares `logits` by name, else the first output of that shape)")
    lines.append("PASSED" if d["passed"] else "FAILED: " + "; ".join(d["failures"]))
    return "\n".join(lines)
