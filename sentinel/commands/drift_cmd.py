"""`sentinel drift check|eval|sample`: drift detectors and accuracy estimates on files, their evaluation,
and example windows to try them on."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import typer

drift_app = typer.Typer(help="Drift detection and label-free accuracy on files; evaluate the detectors.",
                        no_args_is_help=True)


def _settings(config: Path | None):
    """Drift settings from the config file when there is one, else the defaults."""
    from sentinel.config import DriftConfig, load_config

    cfg_file = config or Path("sentinel.yaml")
    if cfg_file.is_file():
        cfg = load_config(cfg_file)
        return cfg.drift, str(cfg.resolve(cfg.golden_sets))
    return DriftConfig(), None


def _suite_settings(drift, detectors: tuple[str, ...] | None = None):
    from sentinel.drift import Combination, Score, Settings, Univariate

    return Settings(alpha=drift.alpha, detectors=tuple(detectors or drift.detectors),
                    univariate=Univariate(drift.univariate), combination=Combination(drift.combination),
                    pca_components=drift.pca_components, atc_score=Score(drift.atc_score))


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def verdict_json(v) -> dict:
    """The JSON object `drift check` prints for one window."""
    return {
        "n": v.n,
        "drift": bool(v.drift),
        "detectors": [{"name": r.name, "statistic": _num(r.statistic), "p_value": _num(r.p_value),
                       "threshold": r.threshold, "alarm": bool(r.alarm)} for r in (*v.detectors, v.combined)],
        "estimated_accuracy": {"atc": _num(v.estimated_accuracy.get("atc")),
                               "avg_conf": _num(v.estimated_accuracy.get("avg_conf")),
                               "atc_lower": _num(v.estimated_accuracy.get("atc_lower"))},
        "accuracy_verdicts": dict(v.accuracy_verdicts),
        "accuracy_estimate_reliable": v.reliable,
        "unknown_share": _num(v.unknown_share),
        "outside_share": _num(v.outside_share),
        "inconsistent_share": _num(v.inconsistent_share),
        "samples": v.samples,
        "unreliable_reason": v.unreliable_reason,
        "diagnosis": None if v.diagnosis is None else v.diagnosis.to_dict(),
        "accuracy": _num(v.accuracy),
    }


@drift_app.command("check")
def check(
    model: str = typer.Option(..., "--model", "-m", help="Model spec: v3, digits:v3 or digits."),
    input_file: Path = typer.Option(..., "--input", "-i",
                                    help="An .npz with 'raw' (server-side inputs) or 'inputs' (N×C×H×W float32), "
                                         "optionally 'labels'."),
    window_size: int | None = typer.Option(None, "--window-size", "-w", min=1,
                                              help="Evaluate consecutive windows of N samples "
                                                   "(default: the whole file is one window)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per window."),
    fail_on_drift: bool = typer.Option(False, "--fail-on-drift", help="Exit 1 when any window drifts or violates the input contract."),
    golden_root: Path | None = typer.Option(None, "--golden-root", help="Default: the config's golden_sets."),
    registry: Path | None = typer.Option(None, "--registry"),
    config: Path | None = typer.Option(None, "--config", "-c"),
    timings: bool = typer.Option(False, "--timings",
                                 help="Print on stderr where the time went: start-up phases, then per window "
                                      "inference, features, per-sample checks and detectors."),
) -> None:
    """Run the drift detectors and accuracy estimators on a file against the model's golden set."""
    import numpy as np

    from sentinel.drift import Reference, Suite, Window
    from sentinel.drift.features import input_statistics
    from sentinel.errors import UsageError
    from sentinel.golden import (
        MAX_ARRAY_FILE_BYTES,
        class_labels,
        golden_for,
        numeric_samples,
        read_arrays,
    )
    from sentinel.registry import open_registry

    started = time.perf_counter()
    first = 0.0
    phases: dict[str, float] = {}
    mark = started

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - mark
        mark = now

    drift, cfg_golden = _settings(config)
    entry = open_registry(config, registry).resolve(model)
    golden = golden_for(entry, golden_root or cfg_golden or "golden_sets")
    if input_file.suffix != ".npz" or not input_file.is_file():
        raise UsageError(f"--input {input_file}: expected an existing .npz file")
    what = f"--input {input_file}"
    arrays = read_arrays(input_file, what)
    expected = tuple(entry.manifest.input.shape)
    for name in ("inputs", "raw"):
        # the network sees float32 N×C×H×W: bounded like the file, before converting or preprocessing
        # (8×8 raw digits become 32×32 inputs, 16 times the bytes)
        if name in arrays and np.asarray(arrays[name]).ndim:
            need = len(arrays[name]) * math.prod(expected) * 4
            if need > MAX_ARRAY_FILE_BYTES:
                raise UsageError(f"{what}: array '{name}' makes {need / 2**30:.1f} GiB of network inputs for "
                                 f"{entry.spec}, more than the {MAX_ARRAY_FILE_BYTES >> 30} GiB a run may hold; "
                                 "split it")
            break
    if "inputs" in arrays:
        x = np.asarray(numeric_samples(arrays["inputs"], "inputs", what), np.float32)
    elif "raw" in arrays:
        raw = numeric_samples(arrays["raw"], "raw", what)
        pre = entry.manifest.preprocessing
        dims = 3 if pre.layout == "NHW" else 4
        if raw.ndim != dims:
            # the preprocessing takes one image without its batch axis too: a file of 64-value rows
            # would be read as one 5×64 image, resized; a file is a batch, so say what it must be
            raise UsageError(f"{what}: array 'raw' has shape {tuple(raw.shape)}; {entry.spec} takes "
                             f"{'×'.join(pre.layout)} raw inputs ({dims} axes, the first one samples)")
        try:
            x = pre.apply(raw)
        except ValueError as exc:
            raise UsageError(f"{what}: array 'raw' of shape {tuple(raw.shape)} cannot be preprocessed for "
                             f"{entry.spec}: {exc}") from None
    else:
        raise UsageError(f"{what}: needs an array named 'raw' or 'inputs' (has {sorted(arrays)})")
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise UsageError(f"--input {input_file}: inputs have shape {tuple(x.shape[1:])} per sample; "
                         f"{entry.spec} expects {expected}")
    labels = arrays.get("labels")
    lap("golden set and input")
    suite = Suite(Reference.from_golden(golden), _suite_settings(drift))
    if labels is not None:
        labels = class_labels(labels, len(x), suite.num_classes, what)
    lap("detectors fitted")
    from sentinel.analysis.shadow import ReferenceRunner

    cache = drift.shadow_cache_dir          # relative to the working directory here
    # loaded once per run; a CLI run may use a few cores (the sidecar keeps one)
    runner = ReferenceRunner(entry, cache_dir=cache, check_inputs=golden.inputs[:32],
                             threads=max(1, min(4, os.cpu_count() or 1)))
    lap("reference model loaded")
    # the dtype the server received is known only for raw inputs: 'inputs' are network tensors,
    # float32 whatever the wire carried (uint8 RGB images), so the contract's dtype check is skipped
    wire_kind = None if "inputs" in arrays else np.asarray(arrays["raw"]).dtype.kind
    batch = 64                               # ReferenceRunner.run's batch: the warm-up allocates for this shape
    size = window_size or max(len(x), 1)

    def window_verdict(xs: np.ndarray, ys: np.ndarray | None, kind: str | None, clock: bool):
        outs = runner.run(xs, batch_size=batch)
        if clock:
            lap("inference")
        proj = suite.project(outs.embeddings)
        stats = input_statistics(xs)
        if clock:
            lap("features")
        smp = suite.samples(xs, outs.logits, proj, dtype_kind=kind)
        if clock:
            lap("per-sample checks")
        v = suite.evaluate(Window(outs.logits, stats, proj, ys, smp.signatures,
                                  None if smp.violations is None else smp.violations.any(axis=1), smp.verdicts))
        if clock:
            lap("detectors")
        return v

    # Warm-up on golden inputs through the whole path, at the window's batch shape: the runtime's
    # first-call allocations, scipy's lazily imported tests and the p-value cache are paid here,
    # so the first window costs what every later one does.
    window_verdict(golden.inputs[:min(batch, size)], None, None, clock=False)
    lap("warm-up")
    start_up = dict(phases)
    loaded = time.perf_counter()
    verdicts = []
    per_window: list[dict[str, float]] = []
    for i in range(0, max(len(x), 1), size):
        # window by window: the first verdict is ready after one window's inference, not the file's
        sl = slice(i, i + size)
        phases = {}                          # lap() now fills this window's
        verdicts.append(window_verdict(x[sl], None if labels is None else labels[sl], wire_kind, clock=True))
        per_window.append(phases)
        if len(verdicts) == 1:
            first = time.perf_counter() - loaded
    if timings:
        typer.echo("timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in start_up.items()), err=True)
        for i, w in enumerate(per_window):
            typer.echo(f"  window {i + 1} (n={verdicts[i].n}): " + ", ".join(f"{k} {v:.3f}" for k, v in w.items())
                       + f", total {sum(w.values()):.3f}", err=True)
    if not as_json:
        typer.echo(f"start-up {loaded - started:.2f} s (golden set, detectors, reference model); first window "
                   f"{first:.3f} s after the model was loaded", err=True)
    if as_json:
        typer.echo(json.dumps([verdict_json(v) for v in verdicts], indent=2))
    else:
        for i, v in enumerate(verdicts):
            acc = "" if v.accuracy is None else f", true accuracy {v.accuracy:.3f}"
            est = v.estimated_accuracy
            usable = "" if not v.samples or v.samples == v.n else f" of {v.samples} (the rest non-finite)"
            drifted = "YES" if v.drift else ("unknown" if v.combined.abstained else "no")
            typer.echo(f"window {i + 1}: n={v.n}{usable} drift={drifted} "
                       f"(combined p={_fmt(v.combined.p_value)}), estimated accuracy atc={_fmt(est.get('atc'))} "
                       f"avg_conf={_fmt(est.get('avg_conf'))} lower_bound={_fmt(est.get('atc_lower'))}"
                       f"{'' if v.reliable is None or v.reliable else f' (UNRELIABLE: {_unreliable_why(v)})'}"
                       f"{acc}")
            d = v.diagnosis
            if d is not None and d.kind != "none":
                part = "" if d.transformed_share is None or d.transformed_share >= 0.95 else \
                    f" on ~{d.transformed_share:.0%} of the window"
                typer.echo(f"  diagnosis: {d.kind}" + (f" ({d.transform}" + (
                    f" {d.parameter:.3g}" if d.parameter is not None else "") + part + ")" if d.transform else "")
                    + f" — {d.reason}")
                if d.input_effects:
                    typer.echo("    inputs (window − golden median): " + ", ".join(
                        f"{k} {val:+.3g}" for k, val in d.input_effects.items()))
                if d.class_shift:
                    typer.echo("    predicted-class share shift: " + ", ".join(
                        f"class {k} {val:+.3f}" for k, val in d.class_shift.items()))
            for r in v.detectors:
                state = "ALARM" if r.alarm else ("abstained: " + r.reason if r.abstained else "ok")
                typer.echo(f"  {r.name:<12} statistic={_fmt(r.statistic):>8} p={_fmt(r.p_value):>8} "
                           f"alpha={r.threshold:g} {state}" + (f" (top: {r.feature})" if r.alarm and r.feature else ""))
    if fail_on_drift and any(v.drift or (v.diagnosis is not None and v.diagnosis.kind == "input_contract")
                             for v in verdicts):
        raise typer.Exit(1)


@drift_app.command("sample")
def sample(
    model: str = typer.Option("digits:v3", "--model", "-m", help="A digits model version (its held-out split)."),
    shift: str = typer.Option(..., "--shift", "-s",
                              help="none, or a shift from `drift eval`: noise_small, noise_medium, noise_large, "
                                   "rotation_40, zoom_0.7, shear_0.4, brightness_+3, contrast_x0.7, contrast_x0.5+6."),
    n: int = typer.Option(200, "--samples", "-n", min=1, help="Samples in the file."),
    clean: int | None = typer.Option(None, "--clean", min=0,
                                     help="Unshifted samples first, shifted after (default: half of -n)."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--output", "-o", help="The .npz to write (raw, labels, shifted)."),
    registry: Path | None = typer.Option(None, "--registry"),
    config: Path | None = typer.Option(None, "--config", "-c"),
) -> None:
    """Write a drift window for `drift check --input`: shuffled held-out digits, the last ones shifted.

    The file holds `raw` (N×8×8 float32 on the 0–16 scale, as the model server receives them),
    `labels` and `shifted` (a bool per sample). Digits come from the model's held-out split
    (model.yaml `split.holdout`), never its training or golden data.
    """
    import numpy as np

    from sentinel.drift.shifts import DIGITS_SHIFTS
    from sentinel.errors import UsageError
    from sentinel.registry import open_registry

    shifts = {s.name: s for s in DIGITS_SHIFTS if s.apply is not None}
    if shift != "none" and shift not in shifts:
        raise UsageError(f"--shift {shift!r}: expected none or one of {', '.join(shifts)} (knockout changes "
                         f"sampling, not images, and is only in `drift eval`)")
    n_clean = n // 2 if clean is None else clean
    if n_clean > n:
        raise UsageError(f"--clean {n_clean} is more than --samples {n}")
    if out.suffix != ".npz":
        raise UsageError(f"--output {out}: expected a .npz file name")
    entry = open_registry(config, registry).resolve(model)
    split = entry.manifest.split
    holdout = None if split is None else getattr(split, "holdout", None)
    if entry.name != "digits" or not holdout:
        raise UsageError(f"{entry.spec}: drift sample needs a digits model with a held-out split in model.yaml")
    try:
        from sentinel.training.digits import load_split
    except ImportError as exc:
        raise UsageError(f"drift sample reads scikit-learn's digits and needs scikit-learn ({exc})") from None
    images, labels, _ = load_split()
    rng = np.random.default_rng(seed)
    idx = rng.choice(np.asarray(holdout, np.int64), size=n, replace=n > len(holdout))
    raw = images[idx].astype(np.float32)
    mask = np.zeros(n, dtype=bool)
    mask[n_clean:] = shift != "none"
    if mask.any():
        raw[mask] = shifts[shift].apply(raw[mask], rng)  # type: ignore[misc]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, raw=raw, labels=labels[idx].astype(np.int64), shifted=mask)
    typer.echo(f"wrote {out}: {n} held-out digits of {entry.spec}, "
               f"{int(mask.sum())} shifted by {shift} (samples {n_clean + 1}–{n})" if mask.any() else
               f"wrote {out}: {n} held-out digits of {entry.spec}, none shifted")


def _unreliable_why(v) -> str:
    """Why a window's accuracy estimate is flagged unreliable, in words (the suite's reason)."""
    return v.unreliable_reason or "flagged by the estimator"


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4g}"


@drift_app.command("eval")
def evaluate(
    model: str = typer.Option("digits:v3", "--model", "-m", help="A digits model version (sklearn digits data)."),
    samples: str = typer.Option("10,20,50,100,200", "--samples", help="Window sizes, comma-separated."),
    runs: int = typer.Option(5, "--runs", min=1, help="Windows per shift, fraction and size (cost grows linearly)."),
    null_runs: int = typer.Option(500, "--null-runs", min=10,
                                  help="No-shift windows per size for the false-alarm rates."),
    seed: int = typer.Option(0, "--seed"),
    signal_windows: int = typer.Option(30, "--signal-windows", min=0,
                                       help="Windows per shift, fraction and size in the signals protocol "
                                            "(recorded golden set vs holdout: diagnosis, accuracy lower bound, "
                                            "knock-out, grouped false alarms); 0 skips it."),
    runs_marginal: bool = typer.Option(True, "--marginal/--no-marginal",
                                       help="Run the marginal (Failing Loudly) protocol."),
    as_json: bool = typer.Option(False, "--json"),
    golden_root: Path | None = typer.Option(None, "--golden-root"),
    registry: Path | None = typer.Option(None, "--registry"),
    config: Path | None = typer.Option(None, "--config", "-c"),
) -> None:
    """Failing Loudly protocol on non-training digits: detection accuracy, false alarms, accuracy-estimate error."""
    from sentinel.analysis.evaluation import EvalPlan, format_report, run_eval
    from sentinel.errors import UsageError
    from sentinel.registry import open_registry

    try:
        sizes = tuple(int(s) for s in samples.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--samples {samples!r}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--samples {samples!r}: sizes must be positive")
    drift, cfg_golden = _settings(config)
    entry = open_registry(config, registry).resolve(model)
    _single_threaded_blas()
    from sentinel.analysis.evaluation import SignalsPlan, format_signals, run_signals_eval

    root = golden_root or cfg_golden or "golden_sets"
    report: dict = {}
    if runs_marginal:
        report = run_eval(entry, EvalPlan(sizes=sizes, runs=runs, null_runs=null_runs, seed=seed),
                          _suite_settings(drift), golden_root=root, log=lambda s: typer.echo(s, err=True))
    if signal_windows:
        report["signals"] = run_signals_eval(
            entry, SignalsPlan(windows=signal_windows, null_windows=max(10 * signal_windows, 100), seed=seed),
            _suite_settings(drift), golden_root=root, persistence=max(2, drift.persistence),
            log=lambda s: typer.echo(s, err=True))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        text = [format_report(report)] if runs_marginal else []
        if signal_windows:
            text.append(format_signals(report["signals"]))
        typer.echo("\n\n".join(text))


def _single_threaded_blas() -> None:
    """Small matrices only: multi-threaded BLAS spins and slows down on a shared host."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(drift_app, name="drift")
