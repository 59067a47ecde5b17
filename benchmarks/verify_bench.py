"""`sentinel verify` against Polygraphy on the same ONNX files and inputs, and int8 speed-up.

    pip install -e '.[torch,bench]'                    # polygraphy lives in the bench extra only
    sentinel models init densenet121 --seed 0          # random weights, models/densenet121/seed-0
    python benchmarks/verify_bench.py [--samples 32] [--repeats 3] [--int8]

Builds a golden set of N random 224×224 RGB images under benchmarks/results/ (never
committed), exports fp32 ONNX (dynamic batch) and a copy with one convolution in
denseblock3 perturbed. Then times, as subprocesses and wall clock including interpreter
start-up, runs interleaved so the machine's load hits every row alike:

- `sentinel verify fp32.onnx` (passes; compares with the golden set's stored reference outputs),
- `sentinel verify perturbed.onnx` (fails and localizes the first diverging layer; the
  benchmark checks the answer is the perturbed module),
- `polygraphy run X.onnx --onnxrt --load-inputs inputs.json --load-outputs reference.json
  --atol 1e-4 --rtol 1e-3` on both files: the same inputs (one batch of N) and the same
  stored reference logits, written in Polygraphy's JSON formats, at sentinel's fp32 tolerances.

One table shows each round side by side: sentinel pass, sentinel fail+localize, their ratio,
Polygraphy pass and fail, sentinel pass / Polygraphy pass; then medians and spread (with
--repeats > 1), CPU seconds, and sentinel's in-process phases (load, run, localize) from its
--json report. Goals (issue 15): sentinel pass ≤ Polygraphy pass; fail+localize ≤ 2× pass.
With --int8, also quantizes to int8 three ways and reports agreement and latency against fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "verify"
PASS, FAIL = "sentinel pass", "sentinel fail+localize"
PG_PASS, PG_FAIL = "polygraphy pass", "polygraphy fail"


def _timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


def _setup(args):
    """Golden set, fp32 export and its perturbed copy (reused from benchmarks/results when present)."""
    from sentinel.golden import build_golden, golden_for
    from sentinel.registry import Registry

    entry = Registry(REPO / "models").resolve(args.model)
    root = OUT / f"golden-{args.samples}"
    gdir = root / entry.name / entry.version
    try:
        golden = golden_for(entry, root)
        if len(golden) != args.samples:
            raise ValueError
        t_golden = 0.0
    except Exception:  # noqa: BLE001 - (re)build when missing, stale or of another size
        shutil.rmtree(gdir, ignore_errors=True)
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, size=(args.samples, *entry.manifest.raw_input.shape), dtype=np.uint8)
        golden, t_golden = _timed(build_golden, entry, gdir, ids=np.arange(args.samples), raw=raw,
                                  source="benchmarks/verify_bench.py: uniform random uint8 images, seed 0")
    fp32 = OUT / f"{entry.name}.{entry.version}.fp32.onnx"
    t_export = 0.0
    if not fp32.exists():
        from sentinel.export.exporters import export_onnx

        _, t_export = _timed(export_onnx, entry, fp32, dynamic_batch=True, exporter=args.exporter)
    bad = OUT / f"{entry.name}.{entry.version}.perturbed.onnx"
    perturbed = _perturb(fp32, bad)
    print(f"golden set built in {t_golden:.1f} s, fp32 export ({args.exporter}) in {t_export:.1f} s "
          f"(0 = reused from {OUT}); perturbed: {perturbed}")
    return entry, golden, gdir, fp32, bad, perturbed


def _perturb(src: Path, dst: Path) -> str:
    """Noise on the weight of the middle convolution of denseblock3; returns its module path."""
    import onnx
    from onnx import numpy_helper

    from sentinel.verify.localize import node_scope

    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits
             and (node_scope(n) or "").startswith("features.denseblock3.")]
    node = convs[len(convs) // 2]
    if not dst.exists():
        w = numpy_helper.to_array(inits[node.input[1]]).copy()
        w += np.random.default_rng(1).normal(0, float(w.std()) * 0.5, w.shape).astype(w.dtype)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
        onnx.save(m, str(dst))
    return node_scope(node) or ""


def _polygraphy_files(golden, fp32: Path) -> tuple[Path, Path] | None:
    """inputs.json and reference.json in Polygraphy's formats, from the golden set; None without polygraphy."""
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json
    except ImportError:
        return None
    import onnx

    m = onnx.load(str(fp32), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    inp = next(i.name for i in m.graph.input if i.name not in inits)
    outs = [o.name for o in m.graph.output]
    ref_arrays = {"logits": golden.logits, "probabilities": golden.probabilities}
    inputs_json, ref_json = OUT / f"polygraphy-inputs-{len(golden)}.json", OUT / f"polygraphy-reference-{len(golden)}.json"
    save_json([{inp: np.ascontiguousarray(golden.inputs, dtype=np.float32)}], str(inputs_json))
    ref = RunResults()
    ref.add([{o: ref_arrays[o] for o in outs if o in ref_arrays}], runner_name="golden-reference")
    ref.save(str(ref_json))
    return inputs_json, ref_json


def _run(cmd: list[str], want_rc: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, all threads) of one subprocess."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != want_rc:
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}, expected {want_rc}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _table(times: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    """One table, every round's figures side by side: sentinel plain and localizing, their ratio
    (goal ≤ 2), Polygraphy on the same files, and sentinel's pass over Polygraphy's (goal ≤ 1)."""
    cols = [PASS, FAIL, "localize/plain", PG_PASS, PG_FAIL, "pass/polygraphy"]
    width = [max(len(c), 8) + 2 for c in cols]
    print("\nwall seconds per command (subprocess, interpreter start-up and exit included)")
    print(f"{'':<13}" + "".join(f"{c:>{w}}" for c, w in zip(cols, width, strict=True)))

    def line(label: str, f: dict[str, float | None]) -> None:
        cells = []
        for c, w in zip(cols, width, strict=True):
            v = f.get(c)
            text = "-" if v is None else (f"{v:.2f}×" if "/" in c else f"{v:.2f}")
            cells.append(f"{text:>{w}}")
        print(f"{label:<13}" + "".join(cells))

    def ratios(f: dict[str, float | None]) -> dict[str, float | None]:
        f = dict(f)
        f["localize/plain"] = f[FAIL] / f[PASS] if f.get(FAIL) and f.get(PASS) else None
        f["pass/polygraphy"] = f[PASS] / f[PG_PASS] if f.get(PASS) and f.get(PG_PASS) else None
        return f

    rounds = len(times[PASS])
    for i in range(rounds):
        line(f"round {i + 1}", ratios({k: v[i] for k, v in times.items()}))
    if rounds > 1:
        line("median", ratios({k: statistics.median(v) for k, v in times.items()}))
        line("min", ratios({k: min(v) for k, v in times.items()}))
        line("max", ratios({k: max(v) for k, v in times.items()}))
    line("CPU s median", ratios({k: statistics.median(v) for k, v in cpu.items()}))
    print(f"{'goal':<13}" + "".join(f"{g:>{w}}" for g, w in zip(["", "", "≤ 2×", "", "", "≤ 1×"], width, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="densenet121:seed-0")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table shows the median")
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    ap.add_argument("--int8", action="store_true", help="also the int8 agreement and latency table")
    ap.add_argument("--calibration", type=int, default=64, help="golden inputs used to calibrate int8")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    import onnxruntime

    print(f"verify benchmark: {args.model}, {args.samples} golden inputs, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, onnxruntime {onnxruntime.__version__}")
    entry, golden, gdir, fp32, bad, perturbed = _setup(args)

    py = sys.executable
    common = ["--model", entry.spec, "--registry", str(REPO / "models"), "--golden", str(gdir)]
    reports = {PASS: OUT / "verify-pass.json", FAIL: OUT / "verify-fail.json"}
    rows: list[tuple[str, list[str], int]] = [
        (PASS, [py, "-m", "sentinel", "verify", str(fp32), *common, "--json", str(reports[PASS])], 0),
        (FAIL, [py, "-m", "sentinel", "verify", str(bad), *common, "--json", str(reports[FAIL])], 1),
    ]
    files = _polygraphy_files(golden, fp32)
    if files is None:
        print("polygraphy is not installed (pip install -e '.[bench]'): its columns are empty")
    else:
        exe = shutil.which("polygraphy", path=str(Path(py).parent)) or shutil.which("polygraphy")
        base = [py, exe] if exe else [py, "-m", "polygraphy"]
        pg = ["--onnxrt", "--load-inputs", str(files[0]), "--load-outputs", str(files[1]),
              "--atol", "1e-4", "--rtol", "1e-3"]
        rows += [(PG_PASS, [*base, "run", str(fp32), *pg], 0), (PG_FAIL, [*base, "run", str(bad), *pg], 1)]

    times: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    inner: dict[str, list[dict[str, float]]] = {PASS: [], FAIL: []}
    for _ in range(args.repeats):
        for label, cmd, rc in rows:
            wall, used = _run(cmd, rc)
            times[label].append(wall)
            cpu[label].append(used)
            if label in reports:
                inner[label].append(json.loads(reports[label].read_text())["timings_s"])
    _table(times, cpu)
    first = json.loads(reports[FAIL].read_text())["first_divergence"]
    print("\nin-process phases of sentinel verify (median s; the rest of the wall time is interpreter start-up, "
          "imports and exit):")
    for label in (PASS, FAIL):
        phases = {k: statistics.median(t[k] for t in inner[label]) for k in ("load", "run", "localize", "total")}
        print(f"  {label:<24}" + "  ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"perturbed {perturbed}; localized to {first} "
          f"({'right' if first and perturbed.startswith(first) else 'WRONG'} module)")
    print(f"load average after: {os.getloadavg()[0]:.1f}; {args.repeats} interleaved round(s)")
    print("command: " + " ".join(rows[0][1][1:]))

    if args.int8:
        _int8(entry, golden, fp32, args)


def _int8(entry, golden, fp32: Path, args) -> None:
    from sentinel.export.quantize import quantize_int8
    from sentinel.verify.verifier import verify_export

    variants = [("QDQ S8S8 (default)", "s8", "qdq"), ("QDQ U8S8", "u8", "qdq"), ("QOperator U8S8", "u8", "qoperator")]
    paths: dict[str, Path] = {"fp32": fp32}
    print(f"\nint8 (per-channel weights, MinMax calibration on {args.calibration} golden inputs), "
          f"onnxruntime CPU, {os.cpu_count()} threads")
    print(f"{'variant':<20}{'quantize s':>11}{'verify s':>9}{'result':>8}{'top-1':>9}{'top-5':>9}{'p99 |Δp|':>10}")
    for label, act, fmt in variants:
        q = OUT / f"{entry.name}.int8.{act}.{fmt}.onnx"
        _, t_q = _timed(quantize_int8, fp32, q, golden.inputs[:args.calibration], activations=act, fmt=fmt)
        rep, t_v = _timed(verify_export, q, entry, golden, localize="never")
        d = rep.doc
        print(f"{label:<20}{t_q:>11.1f}{t_v:>9.1f}{'pass' if rep.passed else 'FAIL':>8}{d['top1_agreement']:>9.2%}"
              f"{d['top5_agreement']:>9.2%}{d['outputs']['probabilities']['p99_abs']:>10.3g}")
        paths[label] = q
    x = golden.inputs
    print(f"\n{'batch':>6}" + "".join(f"{k[:18]:>20}" for k in paths))
    for batch, repeats in ((1, 15), (32, 3)):
        med = _interleaved(paths, x, batch, repeats)
        base = med["fp32"]
        print(f"{batch:>6}" + "".join(f"{med[k] * 1e3:>10.1f} ms {base / med[k]:>4.2f}×" for k in paths))
    print("median latency per batch, runs interleaved across variants to share the machine's noise; "
          "× is the speed-up over fp32.")


def _interleaved(paths: dict[str, Path], x: np.ndarray, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per batch of each model, runs interleaved so load changes hit all alike."""
    from sentinel.verify.runtime import OnnxExport

    sessions = {k: OnnxExport(p) for k, p in paths.items()}
    xb = np.ascontiguousarray(x[:batch])
    for e in sessions.values():
        e.session.run(None, {e.input_name: xb})  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, e in sessions.items():
            t = time.perf_counter()
            e.session.run(None, {e.input_name: xb})
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


if __name__ == "__main__":
    main()
