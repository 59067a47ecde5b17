"""`sentinel drift eval`: the Failing Loudly protocol for sentinel's detectors on non-training digits.

Data: the digits the model never trained on (the recorded golden ∪ holdout splits). Reference
model outputs are computed once for every such image, clean and under each shift (one shifted
copy per image and shift, fixed by the seed). Then, per run:
- marginal protocol: a reference of `reference_size` images and windows are drawn afresh and
  disjoint from those digits; for each shift, fraction of shifted samples and window size, a
  window is tested by plain BBSD+KS and by the combined verdict;
- no-shift windows measure false-alarm rates, marginally (fresh reference each time) and with
  the one fixed golden set (windows from `holdout` against `golden`), where a finite reference
  raises the rate; persistence (two consecutive disjoint windows must both alarm) is measured
  as the remedy.
Accuracy estimates (ATC, average confidence) are scored by absolute error against the true
accuracy of each shifted window.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

FRACTIONS = (0.1, 0.5, 1.0)


@dataclass(frozen=True)
class EvalPlan:
    sizes: tuple[int, ...] = (10, 20, 50, 100, 200)
    runs: int = 5               # marginal runs: each draws a new reference and one window per shift/fraction/size
    null_runs: int = 500        # no-shift windows per size, for each false-alarm protocol
    reference_size: int = 300   # reference drawn in the marginal protocol (the golden set's size)
    mae_size: int = 100         # window size the accuracy-estimate errors are reported at
    seed: int = 0


@dataclass
class _Data:
    labels: np.ndarray          # all non-training digits
    in_golden: np.ndarray       # bool: belongs to the recorded golden split
    logits: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    emb: dict[str, np.ndarray]


def _prepare(entry, seed: int, log: Callable[[str], None]) -> _Data:
    from sentinel.analysis.shadow import ReferenceRunner
    from sentinel.drift.features import input_statistics
    from sentinel.drift.shifts import DIGITS_SHIFTS
    from sentinel.errors import UsageError
    from sentinel.training.digits import load_split

    split = entry.manifest.split
    if split is None or not split.golden or not split.holdout:
        raise UsageError(f"{entry.manifest_path}: split: drift eval needs the recorded golden and holdout splits")
    images, labels, _ = load_split()
    golden, holdout = np.asarray(split.golden), np.asarray(split.holdout)
    ids = np.concatenate([golden, holdout])
    if set(ids) & set(split.train):
        raise UsageError(f"{entry.manifest_path}: golden/holdout overlap the training split")
    raw = images[ids]
    runner = ReferenceRunner(entry, check_inputs=entry.manifest.preprocessing.apply(raw[:32]))
    log(f"reference outputs for {len(ids)} non-training digits × {len(DIGITS_SHIFTS)} shifts "
        f"({runner.backend})")
    rng = np.random.default_rng(seed)
    logits, stats, emb = {}, {}, {}
    for shift in (None, *DIGITS_SHIFTS):
        if shift is not None and shift.apply is None:
            continue
        name = "clean" if shift is None else shift.name
        x = entry.manifest.preprocessing.apply(raw if shift is None else shift.apply(raw, rng))
        out = runner.run(x)
        logits[name], stats[name], emb[name] = out.logits.astype(np.float64), input_statistics(x), out.embeddings
    return _Data(labels[ids], np.arange(len(ids)) < len(golden), logits, stats, emb)


def _window(data: _Data, suite, idx: np.ndarray, shifted: np.ndarray, shift_name: str):
    from sentinel.drift import Window

    lg = data.logits["clean"][idx].copy()
    st = data.stats["clean"][idx].copy()
    em = data.emb["clean"][idx].copy()
    if shifted.any():
        s = idx[shifted]
        lg[shifted], st[shifted], em[shifted] = data.logits[shift_name][s], data.stats[shift_name][s], \
            data.emb[shift_name][s]
    return Window(lg, st, suite.project(em), data.labels[idx])


def _suite(data: _Data, idx: np.ndarray, settings):
    from sentinel.drift import Reference, Suite

    return Suite(Reference(data.logits["clean"][idx], data.labels[idx], embeddings=data.emb["clean"][idx],
                           input_stats=data.stats["clean"][idx]), settings)


def run_eval(entry, plan: EvalPlan, settings, *, golden_root: Any = "golden_sets",
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole protocol; returns a JSON-ready report."""
    from sentinel.drift.shifts import DIGITS_SHIFTS, knockout_weights

    t0 = time.perf_counter()
    data = _prepare(entry, plan.seed, log)
    n_all = len(data.labels)
    rng = np.random.default_rng(plan.seed + 1)
    det: dict[tuple[str, int], list[int]] = defaultdict(list)      # (method, size) → alarms on shifted windows
    by_shift: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    per_detector: dict[tuple[str, int], list[int]] = defaultdict(list)
    err: dict[tuple[str, str], list[float]] = defaultdict(list)     # (family or shift, method) → |estimate − truth|
    max_size = max(plan.sizes)
    if plan.reference_size + max_size > n_all:
        raise ValueError(f"reference {plan.reference_size} + window {max_size} exceed {n_all} non-training digits")
    log(f"marginal protocol: {plan.runs} runs × {len(DIGITS_SHIFTS)} shifts × {len(FRACTIONS)} fractions × "
        f"{len(plan.sizes)} sizes")
    for run in range(plan.runs):
        perm = rng.permutation(n_all)
        ref_idx, pool = perm[:plan.reference_size], perm[plan.reference_size:]
        suite = _suite(data, ref_idx, settings)
        for shift in DIGITS_SHIFTS:
            for frac in FRACTIONS:
                for size in plan.sizes:
                    if shift.apply is None:
                        cls = int(rng.integers(0, 10))
                        idx = rng.choice(pool, size, replace=False, p=knockout_weights(data.labels[pool], cls, frac))
                        shifted = np.zeros(size, bool)
                    else:
                        idx = rng.choice(pool, size, replace=False)
                        shifted = np.zeros(size, bool)
                        shifted[rng.choice(size, max(1, int(round(frac * size))), replace=False)] = True
                    v = suite.evaluate(_window(data, suite, idx, shifted, shift.name))
                    bb = v.result("bbsd")
                    det[("bbsd_ks", size)].append(int(bb.alarm))
                    det[("combined", size)].append(int(v.combined.alarm))
                    by_shift[(shift.name, "bbsd_ks", size)].append(int(bb.alarm))
                    by_shift[(shift.name, "combined", size)].append(int(v.combined.alarm))
                    for r in v.detectors:
                        per_detector[(r.name, size)].append(int(r.alarm))
                    if size == plan.mae_size and v.accuracy is not None:
                        group = shift.name if shift.family == "noise" else shift.family
                        for method in ("atc", "avg_conf"):
                            e = abs(v.estimated_accuracy[method] - v.accuracy)
                            err[(group, method)].append(e)
                            if shift.family != "confidently_wrong":
                                err[("all_but_confidently_wrong", method)].append(e)
                            if shift.family == "noise":
                                err[("noise", method)].append(e)
        log(f"  run {run + 1}/{plan.runs} done ({time.perf_counter() - t0:.0f} s)")

    log(f"no-shift windows: {plan.null_runs} per size, marginal and fixed golden set")
    far: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    null_err: dict[str, list[float]] = defaultdict(list)
    for _ in range(plan.null_runs):
        perm = rng.permutation(n_all)
        suite = _suite(data, perm[:plan.reference_size], settings)
        rest = perm[plan.reference_size:]
        for size in plan.sizes:
            idx = rng.choice(rest, size, replace=False)
            v = suite.evaluate(_window(data, suite, idx, np.zeros(size, bool), "clean"))
            far[("marginal", "bbsd_ks", size)].append(int(v.result("bbsd").alarm))
            far[("marginal", "combined", size)].append(int(v.combined.alarm))
            if size == plan.mae_size and v.accuracy is not None:
                for method in ("atc", "avg_conf"):
                    null_err[method].append(abs(v.estimated_accuracy[method] - v.accuracy))
    golden_idx = np.flatnonzero(data.in_golden)
    holdout_idx = np.flatnonzero(~data.in_golden)
    fixed = _suite(data, golden_idx, settings)
    for _ in range(plan.null_runs):
        for size in plan.sizes:
            pair = rng.choice(holdout_idx, min(2 * size, len(holdout_idx)), replace=False)
            alarms = []
            for half in (pair[:size], pair[size:2 * size]):
                if len(half) < size:
                    break
                v = fixed.evaluate(_window(data, fixed, half, np.zeros(len(half), bool), "clean"))
                alarms.append((int(v.result("bbsd").alarm), int(v.combined.alarm)))
            far[("fixed", "bbsd_ks", size)].append(alarms[0][0])
            far[("fixed", "combined", size)].append(alarms[0][1])
            if len(alarms) == 2:
                far[("fixed_persist2", "combined", size)].append(int(alarms[0][1] and alarms[1][1]))

    def mean(v: list) -> float | None:
        return float(np.mean(v)) if v else None

    report: dict[str, Any] = {
        "model": entry.spec, "alpha": settings.alpha, "detectors": list(settings.detectors),
        "combination": settings.combination.value, "univariate": settings.univariate.value,
        "atc_score": settings.atc_score.value,
        "data": {"non_training_digits": int(n_all), "golden": int(data.in_golden.sum()),
                 "holdout": int((~data.in_golden).sum()), "reference_size": plan.reference_size,
                 "note": "marginal protocol re-splits golden ∪ holdout afresh each run; fixed protocol uses "
                         "the recorded golden split as reference and holdout windows"},
        "runs": plan.runs, "null_runs": plan.null_runs, "sizes": list(plan.sizes),
        "shifts": [{"name": s.name, "family": s.family} for s in DIGITS_SHIFTS], "fractions": list(FRACTIONS),
        "detection": {str(n): {"bbsd_ks": mean(det[("bbsd_ks", n)]), "combined": mean(det[("combined", n)])}
                      for n in plan.sizes},
        "detection_by_detector": {str(n): {d: mean(per_detector[(d, n)]) for d in settings.detectors}
                                  for n in plan.sizes},
        "detection_by_shift": {s.name: {str(n): {"bbsd_ks": mean(by_shift[(s.name, "bbsd_ks", n)]),
                                                 "combined": mean(by_shift[(s.name, "combined", n)])}
                                        for n in plan.sizes} for s in DIGITS_SHIFTS},
        "false_alarm": {str(n): {f"{proto}_{m}": mean(far[(proto, m, n)])
                                 for proto, m in (("marginal", "bbsd_ks"), ("marginal", "combined"),
                                                  ("fixed", "bbsd_ks"), ("fixed", "combined"),
                                                  ("fixed_persist2", "combined"))}
                        for n in plan.sizes},
        "accuracy_mae": {"window_size": plan.mae_size,
                         "groups": {g: {"atc": mean(err[(g, "atc")]), "avg_conf": mean(err[(g, "avg_conf")]),
                                        "windows": len(err[(g, "atc")])}
                                    for g in sorted({k[0] for k in err})},
                         "no_shift": {m: mean(v) for m, v in null_err.items()}},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return report


def format_report(r: dict[str, Any]) -> str:
    """The eval report as plain-text tables."""
    def f(x: float | None) -> str:
        return "   -  " if x is None else f"{x:6.3f}"

    lines = [f"drift eval {r['model']}: alpha={r['alpha']}, combined = {r['combination']} over "
             f"{', '.join(r['detectors'])} ({r['univariate']}); {r['runs']} runs, {r['null_runs']} no-shift "
             f"windows per size; {r['data']['non_training_digits']} non-training digits "
             f"(reference {r['data']['reference_size']}); {r['seconds']} s", "",
             "Detection accuracy on shifted windows (all shifts × fractions 10/50/100%), marginal protocol",
             "  size   BBSD+KS  combined"]
    for n in r["sizes"]:
        d = r["detection"][str(n)]
        lines.append(f"  {n:>4}   {f(d['bbsd_ks'])}  {f(d['combined'])}")
    lines += ["", "Detection by detector (each at its own corrected p < alpha)",
              "  size   " + "  ".join(f"{d:>11}" for d in r["detectors"])]
    for n in r["sizes"]:
        d = r["detection_by_detector"][str(n)]
        lines.append(f"  {n:>4}   " + "  ".join(f"{f(d[k]):>11}" for k in r["detectors"]))
    big = str(max(r["sizes"]))
    lines += ["", f"Detection by shift at size {big} and {r['sizes'][len(r['sizes']) // 2]} (BBSD+KS / combined)"]
    mid = str(r["sizes"][len(r["sizes"]) // 2])
    for s in r["shifts"]:
        a, b = r["detection_by_shift"][s["name"]][big], r["detection_by_shift"][s["name"]][mid]
        lines.append(f"  {s['name']:<16} {s['family']:<18} n={mid}: {f(b['bbsd_ks'])} / {f(b['combined'])}   "
                     f"n={big}: {f(a['bbsd_ks'])} / {f(a['combined'])}")
    lines += ["", "False-alarm rate under no shift",
              "  size   marginal BBSD  marginal comb.  fixed-golden BBSD  fixed-golden comb.  fixed comb. 2 in a row"]
    for n in r["sizes"]:
        d = r["false_alarm"][str(n)]
        lines.append(f"  {n:>4}   {f(d['marginal_bbsd_ks']):>13}  {f(d['marginal_combined']):>14}  "
                     f"{f(d['fixed_bbsd_ks']):>17}  {f(d['fixed_combined']):>18}  "
                     f"{f(d['fixed_persist2_combined']):>21}")
    m = r["accuracy_mae"]
    lines += ["", f"Accuracy estimate mean absolute error, windows of {m['window_size']} "
                  f"(ATC on {r['atc_score']} after temperature scaling; avg_conf after the same scaling)",
              "  group                        ATC   avg_conf  windows"]
    for g, d in m["groups"].items():
        lines.append(f"  {g:<26} {f(d['atc'])}   {f(d['avg_conf'])}  {d['windows']:>7}")
    ns = m["no_shift"]
    lines.append(f"  {'no shift':<26} {f(ns.get('atc'))}   {f(ns.get('avg_conf'))}")
    return "\n".join(lines)
