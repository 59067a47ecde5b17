"""What a Python proxy costs at all on this machine: sentinel next to the thinnest proxies possible.

At 1 kB and a fixed rate (default 1,000 rps), CPU per 1,000 requests and p99 of:

- nginx        proxy_pass with a keep-alive pool, one worker (as in proxy_bench.py);
- relay        a uvloop byte relay, one upstream connection per client connection, no parsing:
               the floor of any Python event-loop proxy (two wake-ups, two reads, two writes);
- relay+parse  the same relay feeding both directions through httptools with header callbacks
               (what reading HTTP costs before any proxy logic);
- sentinel     `sentinel run`, sampling 0 (no analysis worker work) and 5% (the default bench).

Targets take turns (`--rounds` interleaved runs of `--seconds` each); the table prints the
median and the [min-max] of the runs, and each target's CPU as a ratio to nginx's.

    python benchmarks/floor_bench.py                # 3 rounds x 5 s at 1,000 rps, about 2 minutes
    python benchmarks/floor_bench.py --rate 200

Needs nginx on the PATH. See benchmarks/proxy.md ("Fourth pass") for what the figures say.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve-relay", nargs=3, metavar=("PORT", "UPSTREAM", "PARSE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_relay:
        port, up, parse = args.serve_relay
        serve_relay(int(port), int(up), parse == "1")
        return
    if shutil.which("nginx") is None:
        sys.exit("nginx is required (apt-get install nginx-light)")

    tmp = Path(tempfile.mkdtemp(prefix="sentinel-floor-"))
    ports = {k: pb.free_port() for k in ("up", "nginx", "relay", "parse", "s0", "s0a", "s5", "s5a")}
    up = ports["up"]
    procs: dict[str, subprocess.Popen] = {}
    procs["upstream"] = pb.start_nginx(tmp, "upstream", pb.UPSTREAM_CONF.format(port=up, resp=pb.UPSTREAM_BODY))
    procs["nginx"] = pb.start_nginx(tmp, "proxy", pb.PROXY_CONF.format(up=up, port=ports["nginx"]))
    for name, key, parse in (("relay", "relay", "0"), ("relay+parse", "parse", "1")):
        procs[name] = subprocess.Popen([sys.executable, __file__, "--serve-relay", str(ports[key]), str(up), parse])
    for name, key, rate in (("sentinel 0%", "s0", 0.0), ("sentinel 5%", "s5", 0.05)):
        d = tmp / key
        d.mkdir()
        procs[name] = pb.start_sentinel(d, ports[key], ports[key + "a"], up, rate)
    targets = [("nginx", ports["nginx"]), ("relay", ports["relay"]), ("relay+parse", ports["parse"]),
               ("sentinel 0%", ports["s0"]), ("sentinel 5%", ports["s5"])]
    req = pb.request_bytes("/v2/models/bench/infer", pb.SMALL_JSON, pb.JSON_HEADERS)
    cpu: dict[str, list[float]] = {t: [] for t, _ in targets}
    p99: dict[str, list[float]] = {t: [] for t, _ in targets}
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
                after = pb.cpu_by_process(procs[name].pid)
                used = sum(after[pid] - t for pid, t in before.items() if pid in after)
                cpu[name].append(used / max(n, 1) * 1000.0)
                p99[name].append(float(np.percentile(lat, 99)) if len(lat) else float("nan"))
    finally:
        pb.stop_processes(procs.values())
        shutil.rmtree(tmp, ignore_errors=True)

    ngx = pb.med(cpu["nginx"])
    print(f"\n1 kB bodies at {args.rate:.0f} rps, {args.rounds} interleaved runs of {args.seconds:.0f} s; "
          f"load average at the end {os.getloadavg()[0]:.1f}; errors {errors}")
    print(f"{'target':<12} | {'cpu s/1k':>8} {'[min-max]':<13} {'x nginx':>7} | {'p99 ms':>6} {'[min-max]':<11}")
    print("-" * 70)
    for name, _ in targets:
        print(f"{name:<12} | {pb.med(cpu[name]):>8.3f} [{pb.spread(cpu[name], '{:.3f}')}] "
              f"{pb.med(cpu[name]) / ngx:>7.2f} | {pb.med(p99[name]):>6.2f} [{pb.spread(p99[name])}]")


if __name__ == "__main__":
    main()
