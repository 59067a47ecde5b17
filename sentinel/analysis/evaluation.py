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
    from sentinel.errors import UsageError

    t0 = time.perf_counter()
    split = getattr(getattr(entry, "manifest", None), "split", None)
    if split is not None and split.golden and split.holdout:
        n_split = len(split.golden) + len(split.holdout)
        if plan.reference_size + max(plan.sizes) > n_split:   # said before a minute of inference, not after
            raise UsageError(f"--samples {max(plan.sizes)}: the marginal protocol draws a reference of "
                             f"{plan.reference_size} and a window from {n_split} non-training digits; windows "
                             f"of at most {n_split - plan.reference_size} fit")
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


@dataclass(frozen=True)
class SignalsPlan:
    """The deployed setting: the recorded golden set as reference, windows from the holdout split."""

    sizes: tuple[int, ...] = (50, 200)
    fractions: tuple[float, ...] = (0.1, 1.0)     # share of each window shifted (partial contamination < 1)
    windows: int = 30                              # windows per shift, fraction and size
    null_windows: int = 300                        # no-shift windows per size and ordering
    seed: int = 0


def sample_columns(suite, runner, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample columns of network inputs `x` through the reference runner: logits, input
    statistics, projected embeddings, signatures, contract violations and ATC verdict codes."""
    from sentinel.drift.features import input_statistics

    out = runner.run(x)
    proj = suite.project(out.embeddings)
    smp = suite.samples(x, out.logits, proj, dtype_kind="f")
    return {"logits": out.logits.astype(np.float64), "stats": input_statistics(x), "emb": proj,
            "sig": smp.signatures, "viol": smp.violations.any(axis=1), "codes": smp.verdicts}


def mixed_window(per: dict[str, dict[str, np.ndarray]], labels: np.ndarray, idx: np.ndarray,
                 shifted: np.ndarray, name: str):
    """The window of samples `idx`: clean columns, with the `shifted` positions taken from `per[name]`."""
    from sentinel.drift import Window

    cols = {k: v[idx].copy() for k, v in per["clean"].items()}
    if shifted.any():
        for k in cols:
            cols[k][shifted] = per[name][k][idx[shifted]]
    return Window(cols["logits"], cols["stats"], cols["emb"], labels[idx], cols["sig"], cols["viol"], cols["codes"])


def run_signals_eval(entry, plan: SignalsPlan, settings, *, golden_root: Any = "golden_sets",
                     persistence: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Diagnosis accuracy, accuracy-estimate error (ATC and its lower bound), knock-out power and
    false alarms on exchangeable and writer-grouped windows, against the recorded golden set."""
    from sentinel.analysis.shadow import ReferenceRunner
    from sentinel.drift import Reference, Suite, Window
    from sentinel.drift.shifts import DIGITS_SHIFTS, MISMATCH_SHIFTS
    from sentinel.golden import golden_for
    from sentinel.training.digits import load_split

    t0 = time.perf_counter()
    golden = golden_for(entry, golden_root)
    suite = Suite(Reference.from_golden(golden), settings)
    images, labels, _ = load_split()
    hold = np.asarray(entry.manifest.split.holdout)          # load_digits order = writer-grouped order
    raw, y = images[hold], labels[hold]
    runner = ReferenceRunner(entry, check_inputs=golden.inputs[:16])
    rng = np.random.default_rng(plan.seed)
    shifts = [s for s in (*MISMATCH_SHIFTS, *DIGITS_SHIFTS) if s.apply is not None]
    per: dict[str, dict[str, np.ndarray]] = {}
    for s in (None, *shifts):
        name = "clean" if s is None else s.name
        x = entry.manifest.preprocessing.apply(raw if s is None else s.apply(raw, rng))
        per[name] = sample_columns(suite, runner, x)
    log(f"signals eval: per-sample outputs for {len(y)} holdout digits × {len(shifts) + 1} conditions "
        f"({time.perf_counter() - t0:.0f} s)")

    def window(idx: np.ndarray, shifted: np.ndarray, name: str) -> Window:
        return mixed_window(per, y, idx, shifted, name)

    rows = []
    for s in shifts:
        for frac in plan.fractions:
            for size in plan.sizes:
                alarms, right, kinds, err_atc, err_lb, n_alarm = 0, 0, defaultdict(int), [], [], 0
                for _ in range(plan.windows):
                    idx = rng.choice(len(y), size, replace=False)
                    sh = np.zeros(size, bool)
                    sh[rng.choice(size, max(1, int(round(frac * size))), replace=False)] = True
                    v = suite.evaluate(window(idx, sh, s.name))
                    if v.accuracy is not None:
                        err_atc.append(v.estimated_accuracy["atc"] - v.accuracy)
                        err_lb.append(v.estimated_accuracy["atc_lower"] - v.accuracy)
                    if v.combined.alarm:
                        n_alarm += 1
                        d = v.diagnosis
                        kinds[d.kind] += 1
                        if s.expected is not None and d.transform == s.expected:
                            right += 1
                alarms = n_alarm
                rows.append({"shift": s.name, "family": s.family, "expected": s.expected, "fraction": frac,
                             "size": size, "detection": alarms / plan.windows,
                             "transform_right": (right / n_alarm) if n_alarm and s.expected else None,
                             "kinds": dict(kinds),
                             "atc_error": float(np.mean(err_atc)) if err_atc else None,
                             "lower_error": float(np.mean(err_lb)) if err_lb else None,
                             "lower_above_truth": float(np.mean(np.asarray(err_lb) > 0.03)) if err_lb else None})
        log(f"  {s.name} done ({time.perf_counter() - t0:.0f} s)")

    # class knock-out (whole class removed from the traffic) and class-share change
    ko = []
    for size in plan.sizes:
        det, prior = 0, 0
        for _ in range(plan.windows):
            cls = int(rng.integers(0, 10))
            pool = np.flatnonzero(y != cls)
            idx = rng.choice(pool, size, replace=False)
            v = suite.evaluate(window(idx, np.zeros(size, bool), "clean"))
            det += int(v.combined.alarm)
            prior += int(v.combined.alarm and v.diagnosis.kind == "prior_shift")
        ko.append({"size": size, "detection": det / plan.windows, "prior_shift": (prior / det) if det else None})

    # false alarms and the accuracy lower bound on unshifted traffic
    far = []
    for size in plan.sizes:
        ex, grp, grp_p, lb_err, lb_abs = [], [], [], [], []
        for _ in range(plan.null_windows):
            idx = rng.choice(len(y), size, replace=False)
            v = suite.evaluate(window(idx, np.zeros(size, bool), "clean"))
            ex.append(int(v.combined.alarm))
            if v.accuracy is not None:
                lb_err.append(v.estimated_accuracy["atc_lower"] - v.accuracy)
        # writer-grouped: consecutive holdout digits (load_digits order), windows every size/4 samples
        step = max(1, size // 4)
        starts = list(range(0, len(y) - size + 1, step))
        alarms = []
        for st in starts:
            v = suite.evaluate(window(np.arange(st, st + size), np.zeros(size, bool), "clean"))
            alarms.append(int(v.combined.alarm))
            grp.append(int(v.combined.alarm))
        # persistence: an alarm counts only when the window `size` samples earlier alarmed too
        lag = size // step
        for i in range(len(alarms)):
            ok = all(i - j * lag >= 0 and alarms[i - j * lag] for j in range(persistence))
            grp_p.append(int(ok))
        lb_abs = [abs(e) for e in lb_err]
        far.append({"size": size, "exchangeable": float(np.mean(ex)), "grouped": float(np.mean(grp)),
                    f"grouped_persist{persistence}": float(np.mean(grp_p)), "grouped_windows": len(grp),
                    "lower_bound_error_mean": float(np.mean(lb_err)) if lb_err else None,
                    "lower_bound_abs_error_mean": float(np.mean(lb_abs)) if lb_abs else None,
                    "lower_bound_within_0.03": float(np.mean(np.asarray(lb_abs) <= 0.03)) if lb_abs else None})
    return {"model": entry.spec, "alpha": settings.alpha, "holdout": int(len(y)), "golden": int(len(golden)),
            "windows": plan.windows, "null_windows": plan.null_windows, "persistence": persistence,
            "shifts": rows, "knockout": ko, "no_shift": far, "seconds": round(time.perf_counter() - t0, 1)}


def format_signals(r: dict[str, Any]) -> str:
    """The signals report as plain-text tables."""
    def f(x: float | None) -> str:
        return "   -  " if x is None else f"{x:6.3f}"

    lines = [f"signals eval {r['model']}: recorded golden set ({r['golden']}) vs holdout ({r['holdout']}), "
             f"alpha={r['alpha']}, {r['windows']} windows per cell; {r['seconds']} s", "",
             "shift               frac  size  detect  transform_ok  ATC err  lower err  kinds (alarming windows)"]
    for row in r["shifts"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(row["kinds"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{row['shift']:<18} {row['fraction']:>5} {row['size']:>5}  {f(row['detection'])}  "
                     f"{f(row['transform_right'])}      {f(row['atc_error'])}  {f(row['lower_error'])}  {kinds}")
    lines += ["", "class knock-out (one class removed)", "  size  detection  called prior_shift"]
    for k in r["knockout"]:
        lines.append(f"  {k['size']:>4}  {f(k['detection'])}     {f(k['prior_shift'])}")
    lines += ["", "no shift: combined false-alarm rate and ATC lower bound", "  size  exchangeable  grouped  "
              f"grouped+persist{r['persistence']}  lower-bound mean err  |err| <= 0.03"]
    for k in r["no_shift"]:
        lines.append(f"  {k['size']:>4}  {f(k['exchangeable'])}        {f(k['grouped'])}   "
                     f"{f(k['grouped_persist' + str(r['persistence'])])}           {f(k['lower_bound_error_mean'])}"
                     f"          {f(k['lower_bound_within_0.03'])}")
    return "\n".join(lines)
