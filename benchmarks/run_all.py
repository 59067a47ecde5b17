"""Run every benchmark in turn and print their tables (each measures its comparisons side by side).

    python benchmarks/run_all.py            # quick settings, about 10 minutes on 2 cores
    python benchmarks/run_all.py --only proxy,drift

Speed and memory targets live here, not in timed tests. Run on an otherwise idle machine:
the proxy and replay figures are load-sensitive.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name → (script, quick arguments, what it compares)
BENCHES = {
    "proxy": ("proxy_bench.py", ["--quick"], "direct vs nginx vs sentinel: added p50/p99, CPU per 1k requests, saturation"),
    "floor": ("floor_bench.py", ["--seconds", "3"], "nginx vs a bare uvloop relay vs relay+httptools vs sentinel: CPU per 1k requests in situ"),
    "grpc": ("grpc_bench.py", ["--quick"], "OIP v2 over gRPC, direct vs sentinel: added p50/p99, CPU per 1k calls"),
    "replay": ("replay_bench.py", ["--seconds", "5"], "replay client: sustained rate and its own overhead"),
    "drift": ("drift_bench.py", [], "all detectors on a 1,000×1,000-class window; embedding vs raw onnxruntime"),
    "memory": ("memory_bench.py", [], "DenseNet memory estimator vs measured peak allocations"),
    "verify": ("verify_bench.py", ["--samples", "32", "--int8"], "verify vs polygraphy (densenet121, 32 inputs); int8 agreement and speed-up"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    args = ap.parse_args()
    chosen = [b for b in args.only.split(",") if b] or list(BENCHES)
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in chosen:
        script, extra, what = BENCHES[name]
        print(f"\n## {name}: {what}\n", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script), *extra])
        print(f"\n({name}: exit {rc}, {time.perf_counter() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
