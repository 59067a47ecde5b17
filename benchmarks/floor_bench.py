"""What a Python proxy costs at all on this machine: sentinel next to the thinnest proxies possible.

At 1 kB and a fixed rate (default 1,000 rps), CPU per 1,000 requests and p99 of:

- nginx        proxy_pass with a keep-alive pool, one worker (as in proxy_bench.py);
- relay        a uvloop byte relay, one upstream connection per client connection, no parsing:
               the floor of any Python event-loop proxy (two wake-ups, two reads, two writes);
- relay+parse  the same relay feeding both directions through httptools with header callbacks
               (what reading HTTP costs before any proxy logic);
- compact      a reference, not a product: ~60 lines doing the per-request work of sentinel's
               hot path that costs CPU (both directions parsed, hop-by-hop fields dropped, a new
               traceparent, a pooled upstream connection with the stale-connection poll, an
               `Exchange` object, sentinel's duration histogram with exemplars), without limits,
               timeouts, pipelining, chunked bodies or honest status codes: what a compact core
               could approach (benchmarks/proxy.md, "Eighth session");
- sentinel     `sentinel run`, sampling 0 (no analysis worker work) and 5% (the default bench).
- nginx-engine `sentinel run` with `proxy.engine: nginx` (nginx carries the bytes, sentinel counts
               from its access log and samples the requests nginx captures to files), sampling 0
               and 5%; its CPU is nginx's, sentinel's and the analysis worker's together.

`--saturation` adds `wrk -t1 -c8` runs (requests/s, and CPU per request at saturation).

Targets take turns (`--rounds` interleaved runs of `--seconds` each); the table prints the
median and the [min-max] of the runs, and each target's CPU as a ratio to nginx's.

    python benchmarks/floor_bench.py                # 3 rounds x 5 s at 1,000 rps, about 2 minutes
    python benchmarks/floor_bench.py --rate 200
    python benchmarks/floor_bench.py --saturation   # also wrk saturation, about 1 more minute
    python benchmarks/floor_bench.py --before 43e326e --only nginx,sentinel   # a revision's sentinel beside this one

Needs nginx on the PATH. See benchmarks/proxy.md ("Fourth pass") for what the figures say.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb  # noqa: E402
import worker_bench  # noqa: E402


def serve_relay(port: int, up_port: int, parse: bool) -> None:
    """Child mode: the relay (optionally parsing both directions with httptools)."""
    import httptools
    import uvloop

    class Sink:
        """Parser callbacks that keep what a proxy would keep (URL, header pairs)."""

        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []
            self.url = b""

        def on_message_begin(self) -> None:
            self.headers = []

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    class Up(asyncio.Protocol):
        def __init__(self, down: Down) -> None:
            self.down = down
            self.parser = httptools.HttpResponseParser(Sink()) if parse else None

        def connection_made(self, transport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if self.parser is not None:
                self.parser.feed_data(data)
            self.down.transport.write(data)

        def connection_lost(self, exc) -> None:
            self.down.transport.close()

    class Down(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.up: Up | None = None
            self.early: list[bytes] = []   # bytes that came before the upstream connection
            self.parser = httptools.HttpRequestParser(Sink()) if parse else None
            transport.pause_reading()   # until the upstream connection is open
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            _, self.up = await asyncio.get_running_loop().create_connection(lambda: Up(self), "127.0.0.1", up_port)
            for data in self.early:
                self.up.transport.write(data)
            self.early = []
            self.transport.resume_reading()

        def data_received(self, data: bytes) -> None:
            if self.parser is not None:
                self.parser.feed_data(data)
            if self.up is None:
                self.early.append(data)
            else:
                self.up.transport.write(data)

        def connection_lost(self, exc) -> None:
            if self.up is not None:
                self.up.transport.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Down, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def serve_compact(port: int, up_port: int) -> None:
    """Child mode: the compact reference proxy (see the module docstring; 1 kB POSTs only)."""
    import httptools
    import uvloop

    sys.path.insert(0, str(pb.REPO))
    from sentinel.proxy import tracing
    from sentinel.proxy.exchange import Exchange
    from sentinel.proxy.http import HOP_BY_HOP
    from sentinel.proxy.metrics import ProxyMetrics

    metrics = ProxyMetrics({"bench": "bench"}, 50)
    idle: list[Up] = []

    class Up(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpResponseParser(self)
            self.down: Down | None = None
            self.lines: list[bytes] = []
            self.body: list[bytes] = []

        def connection_made(self, transport) -> None:
            self.transport = transport
            self.poll = select.poll()   # the stale-connection check sentinel makes before a POST
            self.poll.register(transport.get_extra_info("socket").fileno(), select.POLLIN)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.lines = []
            self.body = []

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() not in HOP_BY_HOP:
                self.lines.append(name + b": " + value + b"\r\n")

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            down, self.down = self.down, None
            status = self.parser.get_status_code()
            if down.transport.is_closing():   # the client left (wrk stopping): drop the answer
                idle.append(self)
                return
            down.transport.write(b"".join([b"HTTP/1.1 %d OK\r\n" % status, *self.lines, b"\r\n", *self.body]))
            ex = down.ex
            metrics.observe_request("bench", "v2", str(status), time.perf_counter() - ex.t0, ex.trace_id)
            idle.append(self)

    class Down(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)

        def connection_made(self, transport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.ex = Exchange(self, None)   # type: ignore[arg-type]  # allocated as sentinel does
            self.ex.fwd_headers = []
            self.body: list[bytes] = []

        def on_url(self, url: bytes) -> None:
            self.ex.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() not in HOP_BY_HOP:
                self.ex.fwd_headers.append(name + b": " + value + b"\r\n")

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            ex = self.ex
            ex.trace_id, ex.span_id = tracing.new_trace_id(), tracing.new_span_id()
            tp = tracing.traceparent(ex.trace_id, ex.span_id)
            data = b"".join([self.parser.get_method(), b" ", ex.url, b" HTTP/1.1\r\n", *ex.fwd_headers,
                             b"traceparent: ", tp, b"\r\n\r\n", *self.body])
            while idle:
                up = idle.pop()
                if not up.poll.poll(0):
                    up.down = self
                    up.transport.write(data)
                    return
                up.transport.abort()
            asyncio.get_running_loop().create_task(self.connect(data))

        async def connect(self, data: bytes) -> None:
            _, up = await asyncio.get_running_loop().create_connection(Up, "127.0.0.1", up_port)
            up.down = self
            up.transport.write(data)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Down, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def cpu_since(pid: int, before: dict[int, float]) -> float:
    """CPU seconds the processes of `before` (pb.cpu_by_process of `pid`) used since, those still running."""
    after = pb.cpu_by_process(pid)
    return sum(after[p] - t for p, t in before.items() if p in after)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--saturation", action="store_true", help="also wrk -t1 -c8 runs (rounds x 3 s)")
    ap.add_argument("--before", metavar="REV", help="also run sentinel as of this git revision (targets 'REV 0%%', 'REV 5%%')")
    ap.add_argument("--only", metavar="NAMES", help="comma-separated prefixes of the targets to run, e.g. "
                    "'sentinel,43e326e' (nginx always runs)")
    ap.add_argument("--serve-relay", nargs=3, metavar=("PORT", "UPSTREAM", "PARSE"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-compact", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_relay:
        port, up, parse = args.serve_relay
        serve_relay(int(port), int(up), parse == "1")
        return
    if args.serve_compact:
        serve_compact(int(args.serve_compact[0]), int(args.serve_compact[1]))
        return
    if shutil.which("nginx") is None:
        sys.exit("nginx is required (apt-get install nginx-light)")

    tmp = Path(tempfile.mkdtemp(prefix="sentinel-floor-"))
    ports = {k: pb.free_port() for k in ("up", "nginx", "relay", "parse", "compact", "s0", "s0a", "s5", "s5a",
                                         "b0", "b0a", "b5", "b5a", "e0", "e0a", "e5", "e5a")}
    only = [p.strip() for p in args.only.split(",")] if args.only else None

    def wanted(name: str) -> bool:
        return name == "nginx" or only is None or any(name.startswith(p) for p in only if p != "nginx")
    up = ports["up"]
    old = None
    if args.before:   # before any process starts: a revision git cannot read leaves nothing running
        (tmp / "before").mkdir()
        old = worker_bench.baseline_tree(args.before, tmp / "before")
    procs: dict[str, subprocess.Popen] = {}
    procs["upstream"] = pb.start_nginx(tmp, "upstream", pb.UPSTREAM_CONF.format(port=up, resp=pb.UPSTREAM_BODY))
    procs["nginx"] = pb.start_nginx(tmp, "proxy", pb.PROXY_CONF.format(up=up, port=ports["nginx"]))
    targets = [("nginx", ports["nginx"])]
    for name, key, parse in (("relay", "relay", "0"), ("relay+parse", "parse", "1")):
        if wanted(name):
            procs[name] = subprocess.Popen([sys.executable, __file__, "--serve-relay", str(ports[key]), str(up), parse])
            targets.append((name, ports[key]))
    if wanted("compact"):
        procs["compact"] = subprocess.Popen([sys.executable, __file__, "--serve-compact", str(ports["compact"]), str(up)])
        targets.append(("compact", ports["compact"]))
    sentinels = [("sentinel 0%", "s0", 0.0, None, "sentinel"), ("sentinel 5%", "s5", 0.05, None, "sentinel"),
                 ("nginx-engine 0%", "e0", 0.0, None, "nginx"), ("nginx-engine 5%", "e5", 0.05, None, "nginx")]
    if old is not None:
        sentinels[:0] = [(f"{args.before[:10]} 0%", "b0", 0.0, old, "sentinel"),
                         (f"{args.before[:10]} 5%", "b5", 0.05, old, "sentinel")]
    for name, key, rate, tree, engine in sentinels:
        if not wanted(name):
            continue
        d = tmp / key
        d.mkdir()
        procs[name] = pb.start_sentinel(d, ports[key], ports[key + "a"], up, rate, tree=tree, engine=engine)
        targets.append((name, ports[key]))
    req = pb.request_bytes("/v2/models/bench/infer", pb.SMALL_JSON, pb.JSON_HEADERS)
    cpu: dict[str, list[float]] = {t: [] for t, _ in targets}
    p99: dict[str, list[float]] = {t: [] for t, _ in targets}
    rps: dict[str, list[float]] = {t: [] for t, _ in targets}
    sat_us: dict[str, list[float]] = {t: [] for t, _ in targets}
    errors = 0
    try:
        for _, port in [("up", up), *targets]:
            pb.wait_port(port)
        for _, port in targets:   # warm up: connections, caches, analysis worker
            pb.open_loop(port, req, 200, 1.0)
        for _ in range(max(1, args.rounds)):
            for name, port in targets:
                before = pb.cpu_by_process(procs[name].pid)   # the process and its children (all sidecar processes)
                lat, err = pb.open_loop(port, req, args.rate, args.seconds)
                n = len(lat) + err
                errors += err
                cpu[name].append(cpu_since(procs[name].pid, before) / max(n, 1) * 1000.0)
                p99[name].append(float(np.percentile(lat, 99)) if len(lat) else float("nan"))
        for _ in range(max(1, args.rounds) if args.saturation else 0):
            for name, port in targets:
                before = pb.cpu_by_process(procs[name].pid)
                r = pb.wrk(port, "/v2/models/bench/infer", pb.SMALL_JSON, pb.JSON_HEADERS, 3.0, tmp)
                rps[name].append(r)
                sat_us[name].append(cpu_since(procs[name].pid, before) / max(r * 3.0, 1.0) * 1e6)
    finally:
        pb.stop_processes(procs.values())
        shutil.rmtree(tmp, ignore_errors=True)

    ngx = pb.med(cpu["nginx"])
    print(f"\n1 kB bodies at {args.rate:.0f} rps, {args.rounds} interleaved runs of {args.seconds:.0f} s; "
          f"load average at the end {os.getloadavg()[0]:.1f}; errors {errors}")
    print(f"{'target':<15} | {'cpu s/1k':>8} {'[min-max]':<13} {'x nginx':>7} | {'p99 ms':>6} {'[min-max]':<11}")
    print("-" * 73)
    for name, _ in targets:
        print(f"{name:<15} | {pb.med(cpu[name]):>8.3f} [{pb.spread(cpu[name], '{:.3f}')}] "
              f"{pb.med(cpu[name]) / ngx:>7.2f} | {pb.med(p99[name]):>6.2f} [{pb.spread(p99[name])}]")
    if args.saturation:
        top = pb.med(rps["nginx"])
        print(f"\nsaturation (wrk -t1 -c8, {args.rounds} x 3 s): requests/s median [min-max], share of nginx's, "
              "CPU per request of the target's processes at saturation (us)")
        for name, _ in targets:
            print(f"{name:<15} | {pb.med(rps[name]):>8.0f} [{pb.spread(rps[name], '{:.0f}')}] "
                  f"{pb.med(rps[name]) / top:>5.0%} | {pb.med(sat_us[name]):>6.1f} us [{pb.spread(sat_us[name], '{:.1f}')}]")


if __name__ == "__main__":
    main()
