"""Verification speed on densenet121, localization included, and int8 speed-up and agreement.

    sentinel models init densenet121 --seed 0          # random weights, models/densenet121/seed-0
    python benchmarks/verify_bench.py [--samples 256] [--exporter dynamo] [--skip-int8]

Builds a golden set of N random 224×224 RGB images under benchmarks/results/ (never
committed), exports fp32 ONNX, and times `verify` on it: once as exported (passes), once
with one convolution in denseblock3 perturbed (fails and localizes). Then quantizes to
int8 three ways (QDQ S8S8, the default; QDQ U8S8; QOperator U8S8), calibrated on golden
inputs, and reports each one's top-1 agreement with the reference and its onnxruntime
latency at batch 1 and batch 32 against fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "verify"


def _timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="densenet121:seed-0")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--calibration", type=int, default=64, help="golden inputs used to calibrate int8")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))

    import torch

    from sentinel.export.exporters import export_onnx
    from sentinel.golden import build_golden, golden_for
    from sentinel.registry import Registry
    from sentinel.verify.verifier import verify_export

    torch.set_num_threads(os.cpu_count() or 1)
    entry = Registry(REPO / "models").resolve(args.model)
    gdir = OUT / "golden" / entry.name / entry.version
    print(f"verify benchmark: {entry.spec}, {args.samples} golden inputs, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    try:
        golden = golden_for(entry, OUT / "golden")
        if len(golden) != args.samples:
            raise ValueError
        t_golden = 0.0
    except Exception:  # noqa: BLE001 - (re)build when missing or of another size
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, size=(args.samples, *entry.manifest.raw_input.shape), dtype=np.uint8)
        golden, t_golden = _timed(build_golden, entry, gdir, ids=np.arange(args.samples), raw=raw,
                                  source="benchmarks/verify_bench.py: uniform random uint8 images, seed 0")
    fp32 = OUT / f"{entry.name}.fp32.onnx"
    if not fp32.exists():
        _, t_export = _timed(export_onnx, entry, fp32, dynamic_batch=True, exporter=args.exporter)
    else:
        t_export = 0.0
    print(f"golden set built in {t_golden:.1f} s, fp32 export ({args.exporter}) in {t_export:.1f} s "
          f"(0 = reused from {OUT})")

    rep, t_ok = _timed(verify_export, fp32, entry, golden)
    d = rep.doc
    print(f"\n{'verify':<34}{'result':>8}{'total s':>9}{'load':>7}{'run':>7}{'localize':>10}  first divergence")
    print(f"{'fp32 as exported':<34}{'pass' if rep.passed else 'FAIL':>8}{t_ok:>9.1f}{d['timings_s']['load']:>7.1f}"
          f"{d['timings_s']['run']:>7.1f}{d['timings_s']['localize']:>10.1f}  {d['first_divergence']}")

    import onnx
    from onnx import numpy_helper

    from sentinel.verify.localize import node_scope

    m = onnx.load(str(fp32))
    inits = {i.name: i for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits
             and (node_scope(n) or "").startswith("features.denseblock3.")]
    node = convs[len(convs) // 2]
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    w += np.random.default_rng(1).normal(0, float(w.std()) * 0.5, w.shape).astype(w.dtype)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    bad = OUT / f"{entry.name}.perturbed.onnx"
    onnx.save(m, str(bad))
    rep, t_bad = _timed(verify_export, bad, entry, golden)
    d = rep.doc
    print(f"{'fp32, one denseblock3 conv perturbed':<34}{'pass' if rep.passed else 'FAIL':>8}{t_bad:>9.1f}"
          f"{d['timings_s']['load']:>7.1f}{d['timings_s']['run']:>7.1f}{d['timings_s']['localize']:>10.1f}  "
          f"{d['first_divergence']} (perturbed: {node_scope(node)})")

    if args.skip_int8:
        return
    from sentinel.export.quantize import quantize_int8

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
