"""Estimator against measurement: a Markdown table of predicted vs measured peak bytes.

    python benchmarks/memory_bench.py                       # CPU, profiler allocator events
    python benchmarks/memory_bench.py --device cuda --res 224 --batches 1,16,64

CPU runs use one intra-op thread, which is what fixes ATen's choice of conv kernel
(the estimate is told the same). On CUDA the measure is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import sys
import time

from sentinel.gpu.memory import estimate, format_bytes, relative_error
from sentinel.reference.densenet import ARCHS

DEFAULT_CPU = "densenet121@64,densenet169@64,densenet_digits@32"
MODES = {"inference": (False, False), "training": (True, False), "training-me": (True, True)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--archs", default=None, help=f"arch@resolution list (default {DEFAULT_CPU})")
    ap.add_argument("--res", type=int, default=None, help="one resolution for every arch (overrides @res)")
    ap.add_argument("--batches", default="1,2,4,16")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tolerance", type=float, default=0.10)
    args = ap.parse_args(argv)

    import torch

    from sentinel.gpu.measure import measure_cpu, measure_cuda

    if args.device == "cpu":
        torch.set_num_threads(1)
    specs = []
    for item in (args.archs or (DEFAULT_CPU if args.device == "cpu" else "densenet121@224")).split(","):
        arch, _, res = item.partition("@")
        specs.append((arch, args.res or int(res or 224)))
    batches = [int(b) for b in args.batches.split(",")]
    print(f"device {args.device} ({torch.__version__}, {torch.backends.cpu.get_cpu_capability()}), "
          f"dtype {args.dtype}, tolerance ±{args.tolerance:.0%}\n")
    print("| arch | res | mode | batch | predicted | measured | error | peak predicted in |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for arch, res in specs:
        cfg = ARCHS[arch]
        for mode in args.modes.split(","):
            training, me = MODES[mode]
            for b in batches:
                t0 = time.monotonic()
                if args.device == "cpu":
                    got = measure_cpu(cfg, batch=b, resolution=res, dtype=args.dtype, training=training,
                                      memory_efficient=me)
                    est = estimate(cfg, batch=b, resolution=res, dtype=args.dtype, training=training,
                                   memory_efficient=me, backend="cpu", threads=1)
                else:
                    got = measure_cuda(cfg, batch=b, resolution=res, dtype=args.dtype, training=training,
                                       memory_efficient=me)
                    est = estimate(cfg, batch=b, resolution=res, dtype=args.dtype, training=training,
                                   memory_efficient=me, backend="cuda")
                err = relative_error(est.activation_peak_bytes, got.peak_bytes)
                worst = max(worst, abs(err))
                print(f"| {arch} | {res} | {mode} | {b} | {format_bytes(est.activation_peak_bytes)} | "
                      f"{format_bytes(got.peak_bytes)} | {err:+.2%} | {est.peak_at} |", flush=True)
                del t0
    print(f"\nworst |error| {worst:.2%}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
