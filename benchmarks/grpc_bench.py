"""Sidecar overhead for OIP v2 over gRPC: direct vs through sentinel's gRPC listener (5% sampling).

Open-loop, fixed-rate ModelInfer calls measured from each call's intended send time (a
stalled path cannot hide its tail), at 200 and 1,000 rps, with a ~1 kB request (1×200 FP32
in raw_input_contents) and a 602,112-byte one (one 3×224×224 FP32 image). The upstream is a
static gRPC server in its own process answering a fixed ModelInferResponse (10 logits);
the sidecar runs as `sentinel run` does, with the built-in monitor. Loopback only.

    python benchmarks/grpc_bench.py --quick      # about a minute
    python benchmarks/grpc_bench.py              # longer runs, steadier numbers

Columns: direct p50/p99 (ms); sentinel's added p50/p99 (ms, sidecar minus direct); the
sidecar's CPU seconds (main process + analysis worker) per 1,000 calls; failed calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The HTTP benchmark's process helpers (this folder is on sys.path when run as a script).
from proxy_bench import cpu_seconds, free_port, serve_sidecar, stop_processes, wait_port  # noqa: E402

from sentinel.protocols import oip_grpc  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
ROUNDS = 2          # each cell is split into this many slices, direct and sentinel taking turns
MAX_INFLIGHT = 512  # calls in flight before the generator waits (that wait counts in the latency)




# --- child modes ---------------------------------------------------------------------------

def serve_upstream(port: int) -> None:
    """A static OIP gRPC server: every ModelInfer gets the same ModelInferResponse."""
    import grpc
    import uvloop
    from grpc import aio

    answer = oip_grpc.encode([("logits", np.linspace(-1, 1, 10, dtype=np.float32)[None])], "response",
                             model_name="bench", id="1")

    async def infer(request: bytes, context) -> bytes:
        return answer

    async def main() -> None:
        server = aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0)

    uvloop.run(main())


def start_sidecar(tmp: Path, http_port: int, admin: int, grpc_port: int, up: int, rate: float) -> subprocess.Popen:
    cfg = tmp / "sentinel.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{http_port}\nadmin: 127.0.0.1:{admin}\nupstream: http://127.0.0.1:{up}\n"
                   f"grpc_listen: 127.0.0.1:{grpc_port}\ngrpc_upstream: 127.0.0.1:{up}\n"
                   f"log_level: warning\nreplay: {{canary_interval_s: 0}}\n"
                   f"models:\n  - {{name: bench, version: v1, protocol: v2}}\n"
                   f"sampling: {{rate: {rate}, max_per_second: 100, max_bytes: 8388608}}\n")
    return subprocess.Popen([sys.executable, __file__, "--serve-sidecar", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)




# --- open-loop load --------------------------------------------------------------------------

async def _open_loop(port: int, request: bytes, rate: float, seconds: float) -> tuple[np.ndarray, int]:
    from grpc import aio

    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter   # not loop.time(): uvloop's clock has millisecond resolution
    async with aio.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary(INFER)
        await call(request, timeout=10)   # connection up before the clock starts
        slots = asyncio.Semaphore(MAX_INFLIGHT)
        tasks: set[asyncio.Task] = set()

        async def one(intended: float) -> None:
            nonlocal errors
            try:
                await call(request, timeout=10)
                latencies.append(clock() - intended)
            except aio.AioRpcError:
                errors += 1
            finally:
                slots.release()

        n = int(rate * seconds)
        t0 = clock() + 0.05
        for i in range(n):
            intended = t0 + i / rate
            delay = intended - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            t = asyncio.ensure_future(one(intended))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return np.asarray(latencies) * 1000.0, errors


def open_loop(port: int, request: bytes, rate: float, seconds: float) -> tuple[np.ndarray, int]:
    import uvloop

    return uvloop.run(_open_loop(port, request, rate, seconds))


@dataclass
class Row:
    target: str
    size: str
    rate: int
    p50: float
    p99: float
    cpu_per_1k: float | None
    errors: int


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    ap.add_argument("--seconds", type=float, help="seconds per fixed-rate cell")
    ap.add_argument("--rates", default="200,1000")
    ap.add_argument("--sample-rate", type=float, default=0.05)
    ap.add_argument("--serve-sidecar", help=argparse.SUPPRESS)
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_sidecar:
        serve_sidecar(args.serve_sidecar)
        return
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    rates = [int(r) for r in args.rates.split(",")]
    rng = np.random.default_rng(0)
    bodies = {
        "1 kB": oip_grpc.encode([("input-0", rng.random((1, 200), dtype=np.float32))], model_name="bench"),
        "602,112 B": oip_grpc.encode([("input-0", rng.random((1, 3, 224, 224), dtype=np.float32))],
                                     model_name="bench"),
    }
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-grpc-bench-"))
    up, http_port, admin, grpc_port = free_port(), free_port(), free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = start_sidecar(tmp, http_port, admin, grpc_port, up, args.sample_rate)
    procs = [upstream, sidecar]
    rows: list[Row] = []
    try:
        for p in (up, grpc_port):
            wait_port(p, timeout=30.0)
        targets = {"direct": (up, None), "sentinel": (grpc_port, sidecar.pid)}
        for body in bodies.values():   # warm up: channels, caches, the analysis worker
            for port, _ in targets.values():
                open_loop(port, body, 100, 1.0)
        for size, body in bodies.items():
            for rate in rates:
                lats: dict[str, list[np.ndarray]] = {t: [] for t in targets}
                errs = dict.fromkeys(targets, 0)
                cpu = dict.fromkeys(targets, 0.0)
                for _ in range(ROUNDS):
                    for name, (port, pid) in targets.items():
                        c0 = cpu_seconds(pid) if pid else 0.0
                        lat, errors = open_loop(port, body, rate, seconds / ROUNDS)
                        cpu[name] += (cpu_seconds(pid) - c0) if pid else 0.0
                        lats[name].append(lat)
                        errs[name] += errors
                for name, (_port, pid) in targets.items():
                    lat = np.concatenate(lats[name])
                    n = max(len(lat) + errs[name], 1)
                    rows.append(Row(name, size, rate, float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                                    float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                                    cpu[name] / n * 1000.0 if pid else None, errs[name]))
        scrape = subprocess.run(["curl", "-s", f"http://127.0.0.1:{admin}/metrics"], capture_output=True,
                                text=True).stdout
    finally:
        stop_processes(procs)

    print(f"\ngRPC ModelInfer, open-loop fixed rate, {seconds:g} s per cell in {ROUNDS} interleaved slices; latency "
          f"from intended send time (ms); sentinel sampling {args.sample_rate:.0%}; {os.cpu_count()} CPUs shared "
          f"by client, sidecar, upstream\n")
    hdr = (f"{'body':>10} {'rps':>5} | {'direct p50':>10} {'p99':>7} | {'sentinel +p50':>13} {'+p99':>7} "
           f"{'cpu s/1k':>8} | {'errors':>6}")
    print(hdr)
    print("-" * len(hdr))
    for size in bodies:
        for rate in rates:
            d, s = (next(r for r in rows if r.target == t and r.size == size and r.rate == rate)
                    for t in ("direct", "sentinel"))
            print(f"{size:>10} {rate:>5} | {d.p50:>10.3f} {d.p99:>7.3f} | {s.p50 - d.p50:>+13.3f} "
                  f"{s.p99 - d.p99:>+7.3f} {s.cpu_per_1k:>8.3f} | {d.errors + s.errors:>6}")
    counted = [ln for ln in scrape.splitlines() if ln.startswith("sentinel_requests_total") and 'protocol="grpc"' in ln]
    samples = [ln for ln in scrape.splitlines() if ln.startswith("sentinel_samples_total")]
    print("\nsentinel counted: " + ", ".join(ln.split("{", 1)[1] for ln in counted))
    print("sentinel samples: " + ", ".join(ln.split("{", 1)[1] for ln in samples))


if __name__ == "__main__":
    main()
