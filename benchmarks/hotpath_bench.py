"""The proxy's per-request Python, counted without the network: µs and opcodes per request.

One 1 kB OIP v2 JSON POST and a 10-class JSON answer (the headers nginx sends) are driven
through the real `ClientConnection`, `Exchange` and `UpstreamConnection` with in-memory
transports: no sockets, no event loop, no wake-ups. Two figures per code version:

- **µs per request**: best of 5 runs of `--requests` requests (about ±1 µs between runs on an
  idle machine; in situ the same work costs about twice as much, see benchmarks/proxy.md);
- **opcodes per request**: Python bytecodes executed (`sys.settrace` opcode events), with the
  functions that run the most of them. Deterministic, so it shows a change of a few percent
  that no in-situ run can (benchmarks/proxy.md, "Eighth session": in situ a request costs about
  30 µs plus about 20 ns per opcode at 1,000 rps on this machine).

    python benchmarks/hotpath_bench.py                   # this checkout
    python benchmarks/hotpath_bench.py --before HEAD~3   # a git revision beside it
    python benchmarks/hotpath_bench.py --sample-rate 1   # every request captured for analysis
    python benchmarks/hotpath_bench.py --top 60          # every function on the path, not the first 12
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb  # noqa: E402
import worker_bench  # noqa: E402

REQUEST = pb.request_bytes("/v2/models/bench/infer", pb.SMALL_JSON, pb.JSON_HEADERS)
_ANSWER = pb.UPSTREAM_BODY.encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 14:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
            % len(_ANSWER)) + _ANSWER


class MemoryTransport:
    """What the proxy calls on an asyncio transport; writes are counted, not kept."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, data) -> None:
        self.writes += 1

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return default

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def child(requests: int, sample_rate: float, top: int) -> None:
    """Child mode: measure the `sentinel` package on PYTHONPATH; print one JSON line."""
    import asyncio

    from sentinel.config import SamplingConfig
    from sentinel.proxy.context import ProxyContext
    from sentinel.proxy.metrics import ProxyMetrics
    from sentinel.proxy.sampling import Sampler
    from sentinel.proxy.server import ClientConnection
    from sentinel.proxy.upstream import UpstreamConnection, UpstreamPool

    loop = asyncio.new_event_loop()
    pool = UpstreamPool("127.0.0.1", 1, 1.0, 8)
    samplers = {}
    if sample_rate > 0:
        cfg = SamplingConfig(rate=sample_rate, max_per_second=1e9, max_bytes=1 << 23)
        samplers = {"bench": ("bench", Sampler(cfg))}
    ctx = ProxyContext(loop=loop, pool=pool, metrics=ProxyMetrics({"bench": "bench"}, 50), max_body=1 << 27,
                       samplers=samplers, submit=lambda sample: None)
    up = UpstreamConnection(pool)
    up.connection_made(MemoryTransport())
    pool.idle.append(up)
    client = ClientConnection(ctx)
    client.connection_made(MemoryTransport())

    def one() -> None:
        client.data_received(REQUEST)
        up.data_received(RESPONSE)

    for _ in range(2000):
        one()
    if not (client.transport.writes and up.transport.writes and pool.idle == [up]):
        raise SystemExit("the request did not go through (no answer written, or the connection not pooled)")
    best = float("inf")
    for _ in range(5):
        t = time.thread_time()
        for _ in range(requests):
            one()
        best = min(best, (time.thread_time() - t) / requests * 1e6)

    counts: collections.Counter[str] = collections.Counter()

    own = str(Path(__file__).resolve())

    def tracer(frame, event, arg):
        if frame.f_code.co_filename == own:   # the driver and the in-memory transports: not the proxy's
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
        return tracer

    n = 200
    sys.settrace(tracer)
    for _ in range(n):
        one()
    sys.settrace(None)
    import sentinel
    tree = os.environ.get("PYTHONPATH", "")
    if tree and not Path(sentinel.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"measured {sentinel.__file__}, not the tree under {tree}")
    print(json.dumps({"us": best, "opcodes": sum(counts.values()) / n,
                      "top": [(k, v / n) for k, v in counts.most_common(top)]}))


def run_child(tree: Path, requests: int, sample_rate: float, top: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--requests", str(requests),
                        "--sample-rate", str(sample_rate), "--top", str(top)],
                       env=env, cwd=tree, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"the run on {tree} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="requests per timed run (best of 5)")
    ap.add_argument("--sample-rate", type=float, default=0.0, help="share of requests captured for analysis")
    ap.add_argument("--before", metavar="REV", help="also measure this git revision, side by side")
    ap.add_argument("--top", type=int, default=12, help="how many functions to list, most opcodes first")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.requests, args.sample_rate, args.top)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            runs.append((args.before, run_child(worker_bench.baseline_tree(args.before, Path(tmp)), args.requests,
                                                args.sample_rate, args.top)))
        runs.append(("this checkout", run_child(pb.REPO, args.requests, args.sample_rate, args.top)))
    print(f"Proxy hot path in-process, 1 kB v2 JSON POST, sampling {args.sample_rate:g} "
          f"(best of 5 x {args.requests} requests; opcodes over 200)\n")
    print("| code | µs per request | opcodes per request |")
    print("|---|---|---|")
    for name, r in runs:
        print(f"| {name} | {r['us']:.2f} | {r['opcodes']:.0f} |")
    for name, r in runs:
        print(f"\nmost opcodes, {name}:")
        for fn, v in r["top"]:
            print(f"  {v:6.0f}  {fn}")


if __name__ == "__main__":
    main()
