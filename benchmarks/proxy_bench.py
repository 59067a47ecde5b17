"""Sidecar overhead: direct vs nginx (proxy_pass, keepalive) vs sentinel (5% sampling).

Open-loop, fixed-rate load measured from each request's intended send time (so a stalled
server cannot hide its tail), at 200 and 1,000 rps with 1 kB and 602,112-byte bodies (one
3×224×224 FP32 image, OIP v2 binary extension); then the saturation throughput of each path
with wrk. Everything runs on loopback; the upstream is a static nginx.

    python benchmarks/proxy_bench.py --quick      # about 1-2 minutes
    python benchmarks/proxy_bench.py              # longer runs, steadier numbers
    python benchmarks/proxy_bench.py --workers 2  # nginx worker_processes 2 vs sentinel proxy.workers 2

Every cell is the median of ROUNDS interleaved runs (the targets take turns), printed with
the spread (min-max) of the runs, since the machine may be shared.

See benchmarks/proxy.md for what the columns mean and what limits them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import httptools
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:   # appended: a PYTHONPATH tree (hotpath/worker_bench --before) must win
    sys.path.append(str(REPO))

from sentinel.protocols import oip_v2  # noqa: E402

ROUNDS = 3   # each fixed-rate and saturation measurement: this many interleaved runs, median reported
UPSTREAM_BODY = json.dumps({"model_name": "bench", "outputs": [
    {"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": [0.1] * 10}]}, separators=(",", ":"))


# The 1 kB body of every small-body benchmark: a v2 JSON request padded with trailing whitespace
# (which JSON allows) to exactly 1,024 bytes.
SMALL_JSON = b'{"inputs":[{"name":"x","shape":[1,200],"datatype":"FP32","data":[' + b",".join([b"0.5"] * 200) + b"]}]}"
SMALL_JSON += b" " * (1024 - len(SMALL_JSON))
JSON_HEADERS = {"Content-Type": "application/json"}


def stop_processes(procs, timeout: float = 15.0) -> None:
    """SIGTERM every process, then wait for each, killing one that outlives `timeout`."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


# --- the servers -----------------------------------------------------------------------

NGINX_COMMON = """
worker_processes {workers};
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/{name}-body;
  proxy_temp_path {dir}/{name}-proxy;
  fastcgi_temp_path {dir}/{name}-fcgi;
  uwsgi_temp_path {dir}/{name}-uwsgi;
  scgi_temp_path {dir}/{name}-scgi;
  client_max_body_size 128m;
  client_body_buffer_size 1m;
  keepalive_requests 1000000;
  {body}
}}
"""

UPSTREAM_CONF = """
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{resp}'; }}
  }}
"""

PROXY_CONF = """
  upstream model {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
    }}
  }}
"""


def start_nginx(tmp: Path, name: str, body: str, workers: int = 1) -> subprocess.Popen:
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(dir=tmp, name=name, body=body, workers=workers))
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def start_sentinel(tmp: Path, port: int, admin: int, up: int, rate: float, workers: int = 1,
                   tree: Path | None = None, engine: str = "sentinel", worker_nice: int = 0) -> subprocess.Popen:
    """`sentinel run` on this checkout, or on the `sentinel` package under `tree` (worker_bench.baseline_tree)."""
    cfg = tmp / "sentinel.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\nupstream: http://127.0.0.1:{up}\n"
                   f"log_level: warning\n"
                   f"models:\n  - {{name: bench, version: v1, protocol: v2}}\n"
                   f"sampling: {{rate: {rate}, max_per_second: 100, max_bytes: 8388608}}\n"
                   f"proxy: {{max_body_bytes: 134217728, workers: {workers}"
                   + (f", engine: {engine}" if engine != "sentinel" else "") + "}\n"
                   + (f"analysis: {{worker_nice: {worker_nice}}}\n" if worker_nice else ""))
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, __file__, "--serve-sidecar", str(cfg)], cwd=tree or REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def serve_sidecar(cfg_path: str) -> None:
    """Child mode: the sidecar with the built-in monitor (the bench models have no golden set)."""
    from sentinel.config import load_config
    from sentinel.proxy.sidecar import run

    run(load_config(cfg_path), monitor_factory="sentinel.proxy.builtin_monitor:build_builtin")


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and all its descendants."""
    return sum(cpu_by_process(pid).values())


def cpu_by_process(pid: int) -> dict[int, float]:
    """User+system CPU of a process and each of its descendants, by pid."""
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for q in procs:
        try:
            t = q.cpu_times()
            out[q.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def rss_mb(pid: int) -> float:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p] + p.children(recursive=True)) / 2**20


# --- open-loop load --------------------------------------------------------------------

class _Conn(asyncio.Protocol):
    def __init__(self, gen: OpenLoop):
        self.gen = gen
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.intended = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.gen.done(self, self.intended, self.parser.get_status_code())

    def connection_lost(self, exc) -> None:
        self.gen.lost(self)


class OpenLoop:
    """Sends `rate` requests per second on keep-alive connections; latency from intended send time."""

    def __init__(self, port: int, request: bytes, max_conns: int = 256):
        self.port = port
        self.request = request
        self.max_conns = max_conns
        self.idle: list[_Conn] = []
        self.backlog: deque[float] = deque()
        self.conns = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.outstanding = 0

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self.conns += 1
        try:
            _, c = await loop.create_connection(lambda: _Conn(self), "127.0.0.1", self.port)
        except OSError:
            self.conns -= 1
            self.errors += 1
            return
        self._use(c)

    def _use(self, c: _Conn) -> None:
        if self.backlog:
            c.intended = self.backlog.popleft()
            c.transport.write(self.request)
        else:
            self.idle.append(c)

    def fire(self, intended: float) -> None:
        self.outstanding += 1
        if self.idle:
            c = self.idle.pop()
            c.intended = intended
            c.transport.write(self.request)
            return
        self.backlog.append(intended)
        if self.conns < self.max_conns:
            asyncio.get_running_loop().create_task(self._open())

    def done(self, c: _Conn, intended: float, status: int) -> None:
        self.outstanding -= 1
        if status == 200:
            self.latencies.append(time.perf_counter() - intended)
        else:
            self.errors += 1
        self._use(c)

    def lost(self, c: _Conn) -> None:
        self.conns -= 1
        if c in self.idle:
            self.idle.remove(c)

    async def run(self, rate: float, seconds: float) -> None:
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution
        clock = time.perf_counter
        for _ in range(min(16, self.max_conns)):
            await self._open()
        n = int(rate * seconds)
        t0 = clock() + 0.05
        for i in range(n):
            intended = t0 + i / rate
            delay = intended - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            self.fire(intended)
        deadline = clock() + 10
        while self.outstanding and clock() < deadline:
            await asyncio.sleep(0.01)
        self.errors += self.outstanding
        for c in self.idle:
            c.transport.close()


def request_bytes(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def open_loop(port: int, req: bytes, rate: float, seconds: float) -> tuple[np.ndarray, int]:
    import uvloop

    gen = OpenLoop(port, req)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(gen.run(rate, seconds))
    return np.array(gen.latencies) * 1000.0, gen.errors


def wrk(port: int, path: str, body: bytes, headers: dict[str, str], seconds: float, tmp: Path) -> float:
    """Saturation requests/s with wrk (1 thread, 8 connections)."""
    bodyfile = tmp / "wrk-body.bin"
    bodyfile.write_bytes(body)
    hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    script = tmp / "wrk.lua"
    script.write_text(f'local f = io.open("{bodyfile}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
                      f'wrk.method = "POST"\n{hdrs}')
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{max(seconds, 1):.0f}s", "-s", str(script),
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(f"wrk said: {out}")


# --- main ------------------------------------------------------------------------------

def soak(port: int, pid: int, req: bytes, seconds: float, step: float = 20.0) -> None:
    """Steady 200 rps of large bodies; resident memory of sentinel (main + worker) every `step` s."""
    open_loop(port, req, 200, 5.0)   # warm: worker started, pools and allocator settled
    base = rss_mb(pid)
    print(f"{'t (s)':>6} {'RSS MB':>8} {'growth':>7} {'p50 ms':>7} {'p99 ms':>7}")
    print(f"{0:>6.0f} {base:>8.1f} {0:>+7.1f}")
    t = 0.0
    while t < seconds:
        lat, _ = open_loop(port, req, 200, step)
        t += step
        now = rss_mb(pid)
        print(f"{t:>6.0f} {now:>8.1f} {now - base:>+7.1f} {np.percentile(lat, 50):>7.2f} {np.percentile(lat, 99):>7.2f}",
              flush=True)


@dataclasses.dataclass
class Row:
    """One target at one body and rate: per-run figures (one entry per interleaved run)."""

    target: str
    size: str
    rate: int
    p50: list[float]
    p99: list[float]
    cpu_per_1k: list[float]
    errors: int
    main_cpu_per_1k: list[float] = dataclasses.field(default_factory=list)   # the target's own process only


def med(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return (fmt.format(min(xs)) + "-" + fmt.format(max(xs))) if xs else "-"


def added(run: list[float], base: list[float]) -> list[float]:
    """Per-run differences to the direct path's run of the same round."""
    return [a - b for a, b in zip(run, base, strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (about 1-2 minutes in all)")
    ap.add_argument("--seconds", type=float, help="seconds per fixed-rate run")
    ap.add_argument("--rates", default="200,1000")
    ap.add_argument("--wrk-seconds", type=float, help="seconds per saturation run")
    ap.add_argument("--sample-rate", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=1,
                    help="nginx worker_processes and sentinel proxy.workers (compared at the same count)")
    ap.add_argument("--engine", choices=("sentinel", "nginx"), default="sentinel",
                    help="sentinel's proxy.engine: its own proxy, or nginx carrying the bytes (README \"nginx engine\")")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved runs per cell (median reported)")
    ap.add_argument("--worker-nice", type=int, default=0, help="sentinel's analysis.worker_nice (0: the default)")
    ap.add_argument("--soak", type=float, metavar="SECONDS",
                    help="instead: large bodies at 200 rps through sentinel for SECONDS, printing its memory")
    ap.add_argument("--serve-sidecar", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_sidecar:
        serve_sidecar(args.serve_sidecar)
        return
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required (apt-get install {tool})")
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    wrk_s = args.wrk_seconds or (4.0 if args.quick else 10.0)
    rates = [int(r) for r in args.rates.split(",")]

    small, small_h = SMALL_JSON, JSON_HEADERS
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    large, large_h = oip_v2.encode([("input-0", image)])
    large_h = {"Content-Type": large_h["content-type"],
               "Inference-Header-Content-Length": large_h["inference-header-content-length"]}
    bodies = {"1 kB": (small, small_h), "602,112 B": (large, large_h)}
    path = "/v2/models/bench/infer"

    tmp = Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    up_port, ngx_port, sn_port, sn_admin = free_port(), free_port(), free_port(), free_port()
    procs = [start_nginx(tmp, "upstream", UPSTREAM_CONF.format(port=up_port, resp=UPSTREAM_BODY)),
             start_nginx(tmp, "proxy", PROXY_CONF.format(up=up_port, port=ngx_port), args.workers)]
    sent = start_sentinel(tmp, sn_port, sn_admin, up_port, args.sample_rate, args.workers, engine=args.engine,
                          worker_nice=args.worker_nice)
    rounds = max(1, args.rounds)
    procs.append(sent)
    rows: list[Row] = []
    sat: dict[tuple[str, str], list[float]] = {}
    if args.soak:
        try:
            for p in (up_port, sn_port):
                wait_port(p)
            soak(sn_port, sent.pid, request_bytes(path, large, large_h), args.soak)
        finally:
            stop_processes(procs)
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        for p in (up_port, ngx_port, sn_port):
            wait_port(p)
        targets = {"direct": (up_port, None), "nginx": (ngx_port, procs[1].pid), "sentinel": (sn_port, sent.pid)}
        for _size, (body, headers) in bodies.items():   # warm up: connections, caches, analysis worker
            for port, _ in targets.values():
                open_loop(port, request_bytes(path, body, headers), 100, 1.0)
        rss0 = rss_mb(sent.pid)
        for size, (body, headers) in bodies.items():
            req = request_bytes(path, body, headers)
            for rate in rates:
                # Targets take turns (`rounds` runs each), so a noisy neighbour hurts all of them alike;
                # each run gives its own p50/p99/CPU, and the table shows the median and the spread.
                cell = {t: Row(t, size, rate, [], [], [], 0) for t in targets}
                for _ in range(rounds):
                    for name, (port, pid) in targets.items():
                        c0 = cpu_by_process(pid) if pid else {}
                        lat, errors = open_loop(port, req, rate, seconds / rounds)
                        row = cell[name]
                        row.errors += errors
                        if len(lat):
                            row.p50.append(float(np.percentile(lat, 50)))
                            row.p99.append(float(np.percentile(lat, 99)))
                        if pid:
                            c1 = cpu_by_process(pid)
                            n = max(len(lat) + errors, 1)
                            row.cpu_per_1k.append((sum(c1.values()) - sum(c0.values())) / n * 1000.0)
                            row.main_cpu_per_1k.append((c1.get(pid, 0.0) - c0.get(pid, 0.0)) / n * 1000.0)
                rows.extend(cell.values())
            for _ in range(rounds):
                for name, (port, _pid) in targets.items():
                    rps = wrk(port, path, body, headers, wrk_s / rounds, tmp)
                    sat.setdefault((name, size), []).append(rps)
        rss1 = rss_mb(sent.pid)
        scrape = subprocess.run(["curl", "-s", f"http://127.0.0.1:{sn_admin}/metrics"], capture_output=True,
                                text=True).stdout
    finally:
        stop_processes(procs)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nopen-loop fixed rate, {seconds:.0f} s per cell in {rounds} interleaved runs; latency from intended "
          f"send time (ms); median of the runs [min-max]; sentinel sampling {args.sample_rate:.0%}, "
          f"proxy.engine {args.engine}; "
          f"{args.workers} worker process(es) each for nginx and sentinel; {os.cpu_count()} CPUs shared by "
          f"client, proxies, upstream; load average at the end {os.getloadavg()[0]:.1f}\n")
    hdr = (f"{'body':>10} {'rps':>5} | {'direct p50':>10} {'p99':>6} | {'nginx +p50':>10} {'+p99':>16} "
           f"{'cpu s/1k':>17} | {'sentinel +p50':>13} {'+p99':>16} {'cpu s/1k':>17} | {'cpu x':>5} {'+p99 x':>6} "
           f"| {'errors d/n/s':>12}")
    print(hdr)
    print("-" * len(hdr))
    for size in bodies:
        for rate in rates:
            d, n, s = (next(r for r in rows if r.target == t and r.size == size and r.rate == rate)
                       for t in ("direct", "nginx", "sentinel"))
            n99, s99 = added(n.p99, d.p99), added(s.p99, d.p99)
            cpu_x = med(s.cpu_per_1k) / med(n.cpu_per_1k) if n.cpu_per_1k and med(n.cpu_per_1k) else float("nan")
            p99_x = med(s99) / med(n99) if n99 and med(n99) > 0 else float("nan")
            print(f"{size:>10} {rate:>5} | {med(d.p50):>10.3f} {med(d.p99):>6.2f} | "
                  f"{med(added(n.p50, d.p50)):>+10.3f} {med(n99):>+6.2f} [{spread(n99):>8}] "
                  f"{med(n.cpu_per_1k):>6.3f} [{spread(n.cpu_per_1k, '{:.3f}'):>9}] | "
                  f"{med(added(s.p50, d.p50)):>+13.3f} {med(s99):>+6.2f} [{spread(s99):>8}] "
                  f"{med(s.cpu_per_1k):>6.3f} [{spread(s.cpu_per_1k, '{:.3f}'):>9}] | {cpu_x:>5.2f} {p99_x:>6.2f} "
                  f"| {f'{d.errors}/{n.errors}/{s.errors}':>12}")
    print("\ncpu x: sentinel CPU per request / nginx's (goal <= 2 at 1 kB, 1,000 rps); "
          "+p99 x: sentinel added p99 / nginx's (goal <= 2 at 1,000 rps); errors: requests without a 200 "
          "(or unanswered 10 s after the run) direct/nginx/sentinel")
    print("sentinel's CPU s/1k split, proxy (main) process + the rest (analysis worker, other proxy workers): "
          + "; ".join(f"{r.size} {r.rate} rps {med(r.main_cpu_per_1k):.3f} + "
                      f"{med([a - b for a, b in zip(r.cpu_per_1k, r.main_cpu_per_1k, strict=True)]):.3f}"
                      for r in rows if r.target == "sentinel" and r.main_cpu_per_1k))
    print(f"\nsaturation (wrk, 1 thread, 8 connections, median of {rounds} x {wrk_s / rounds:.1f} s [min-max]), "
          f"requests/s, {args.workers} worker process(es) each:")
    print(f"{'body':>10} | {'direct':>9} {'nginx':>22} {'sentinel':>22} | {'sentinel/nginx':>14}")
    for size in bodies:
        d, n, s = (sat[(t, size)] for t in ("direct", "nginx", "sentinel"))
        print(f"{size:>10} | {med(d):>9.0f} {med(n):>9.0f} [{spread(n, '{:.0f}'):>11}] "
              f"{med(s):>9.0f} [{spread(s, '{:.0f}'):>11}] | {med(s) / med(n):>14.0%}")
    print(f"\nsentinel resident memory (main + analysis worker): {rss0:.1f} MB after warm-up, {rss1:.1f} MB after "
          f"all runs, overload included (steady-state growth: --soak)")
    samples = [ln for ln in scrape.splitlines() if ln.startswith("sentinel_samples_total")]
    print("sentinel samples: " + ", ".join(ln.split("{", 1)[1] for ln in samples))


if __name__ == "__main__":
    main()
