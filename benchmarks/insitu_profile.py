"""Where a proxied request's CPU goes in the running process: perf by shared object, and syscalls.

At saturation (`wrk -t1 -c8`, 1 kB v2 JSON POSTs, the upstream an nginx `return 200`), for
nginx as a proxy, the compact reference of `floor_bench.py` and `sentinel run` (sampling 0
unless `--sample-rate`), one after the other:

- requests/s, and the target's CPU per request (all its processes, psutil);
- that CPU split by where it ran (`perf record` samples of the target's process tree, at
  `--freq` Hz): the Python interpreter (libpython), the kernel (the socket calls, including
  the loopback delivery and the wake-up of the peer that the sender pays), httptools' llhttp
  (`parser.*.so`), uvloop (`loop.*.so`), libc and the rest: µs per request in each;
- system calls per request (`strace -c -f` attached for `--strace-seconds`; strace slows the
  target, so the counts are the figure, not the rate).

    python benchmarks/insitu_profile.py                      # about 1 minute
    python benchmarks/insitu_profile.py --sample-rate 0.05 --targets sentinel
    python benchmarks/insitu_profile.py --rate 1000 --strace-seconds 0   # at issue 15's fixed rate

Needs nginx, wrk, perf and strace (`apt-get install -y nginx-light wrk linux-perf strace`);
perf needs `kernel.perf_event_paranoid` <= 1 or root. Figures are in benchmarks/proxy.md
("Tenth session").
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb  # noqa: E402

PATH = "/v2/models/bench/infer"
REQUEST = pb.request_bytes(PATH, pb.SMALL_JSON, pb.JSON_HEADERS)
GROUPS = (("python", re.compile(r"libpython|python3")), ("kernel", re.compile(r"\[kernel")),
          ("httptools", re.compile(r"^parser\.")), ("uvloop", re.compile(r"^loop\.")),
          ("libc", re.compile(r"^libc")))


def wrk_script(tmp: Path) -> Path:
    body = tmp / "body.bin"
    body.write_bytes(pb.SMALL_JSON)
    script = tmp / "wrk.lua"
    script.write_text(f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
                      'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
    return script


def run_wrk(port: int, script: Path, seconds: float) -> float:
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds:.0f}s", "-s", str(script),
                          f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk said: {out}")
    return float(m.group(1))


def pids_of(pid: int) -> list[int]:
    import psutil

    p = psutil.Process(pid)
    return [p.pid] + [c.pid for c in p.children(recursive=True)]


def perf_split(pids: list[int], seconds: float, freq: int, out: Path) -> dict[str, float]:
    """Share of perf samples per group over `seconds` of the given processes; 'samples' is the count."""
    subprocess.run(["perf", "record", "-q", "-F", str(freq), "-p", ",".join(map(str, pids)), "-o", str(out),
                    "--", "sleep", f"{seconds}"], capture_output=True, check=True)
    rep = subprocess.run(["perf", "report", "-i", str(out), "--no-children", "--sort", "dso", "-g", "none",
                          "--percent-limit", "0", "--stdio", "-n"], capture_output=True, text=True).stdout
    shares: dict[str, float] = collections.defaultdict(float)
    total = 0
    for line in rep.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\d+)\s+(.*\S)", line)
        if not m:
            continue
        share, n, dso = float(m.group(1)), int(m.group(2)), m.group(3)
        total += n
        group = next((g for g, rx in GROUPS if rx.search(dso)), "other")
        shares[group] += share / 100.0
    shares["samples"] = total
    return dict(shares)


def syscalls_per_request(pids: list[int], port: int, script: Path, seconds: float) -> dict[str, float]:
    """System calls per request of `pids` (strace -c attached to each while wrk runs under it)."""
    cmd = ["strace", "-c", "-f"] + [a for p in pids for a in ("-p", str(p))]
    st = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    out = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds:.0f}s", "-s", str(script),
                          f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True).stdout
    st.send_signal(signal.SIGINT)
    _, err = st.communicate(timeout=30)
    m = re.search(r"(\d+) requests in", out)
    reqs = float(m.group(1)) if m else 0.0
    calls: dict[str, float] = {}
    for line in err.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            try:
                calls[parts[-1]] = int(parts[3]) / max(reqs, 1.0)
            except ValueError:
                continue
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="nginx,compact,sentinel", help="comma-separated: nginx, compact, sentinel")
    ap.add_argument("--seconds", type=float, default=4.0, help="wrk seconds per target while perf samples")
    ap.add_argument("--freq", type=int, default=2000, help="perf samples per second")
    ap.add_argument("--sample-rate", type=float, default=0.0, help="sentinel's sampling rate")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="a fixed request rate (open loop, as proxy_bench) instead of wrk's saturation")
    ap.add_argument("--strace-seconds", type=float, default=3.0, help="0: no syscall counts")
    args = ap.parse_args()
    missing = [t for t in ("nginx", "wrk", "perf") + (("strace",) if args.strace_seconds else ())
               if shutil.which(t) is None]
    if missing:
        sys.exit(f"needs {', '.join(missing)} on the PATH (apt-get install -y nginx-light wrk linux-perf strace)")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="sentinel-insitu-"))
    up, ports = pb.free_port(), {t: pb.free_port() for t in ("nginx", "compact", "sentinel", "admin")}
    procs = {"upstream": pb.start_nginx(tmp, "upstream", pb.UPSTREAM_CONF.format(port=up, resp=pb.UPSTREAM_BODY))}
    if "nginx" in targets:
        procs["nginx"] = pb.start_nginx(tmp, "proxy", pb.PROXY_CONF.format(up=up, port=ports["nginx"]))
    if "compact" in targets:
        procs["compact"] = subprocess.Popen([sys.executable, str(Path(__file__).parent / "floor_bench.py"),
                                             "--serve-compact", str(ports["compact"]), str(up)])
    if "sentinel" in targets:
        d = tmp / "sentinel"
        d.mkdir()
        procs["sentinel"] = pb.start_sentinel(d, ports["sentinel"], ports["admin"], up, args.sample_rate)
    script = wrk_script(tmp)
    rows = []
    try:
        for port in [up] + [ports[t] for t in targets]:
            pb.wait_port(port)
        for t in targets:
            run_wrk(ports[t], script, 2)   # warm up
            pids = pids_of(procs[t].pid)
            if t == "nginx":   # the master does not serve; its worker does
                pids = [p for p in pids if p != procs[t].pid] or pids
            before = sum(pb.cpu_by_process(procs[t].pid).values())
            holder: dict[str, float] = {}
            th = threading.Thread(target=lambda h=holder, p=pids, f=tmp / f"{t}.perf": h.update(
                perf_split(p, args.seconds - 0.5, args.freq, f)))
            th.start()
            if args.rate:
                lat, err = pb.open_loop(ports[t], REQUEST, args.rate, args.seconds)
                rps = (len(lat) + err) / args.seconds
            else:
                rps = run_wrk(ports[t], script, args.seconds)
            th.join()
            cpu = sum(pb.cpu_by_process(procs[t].pid).values()) - before
            us = cpu / max(rps * args.seconds, 1.0) * 1e6
            calls: dict[str, float] = {}
            if args.strace_seconds:
                calls = syscalls_per_request(pids, ports[t], script, args.strace_seconds)
            rows.append((t, rps, us, holder, calls))
    finally:
        pb.stop_processes(procs.values())
        shutil.rmtree(tmp, ignore_errors=True)

    names = [g for g, _ in GROUPS] + ["other"]
    load = f"{args.rate:.0f} rps open loop (" if args.rate else "saturation (wrk -t1 -c8, "
    print(f"\n{load}{args.seconds:.0f} s each, 1 kB v2 JSON POST); CPU per request of the "
          f"target's processes, split by perf samples ({args.freq} Hz) by where they ran")
    print(f"{'target':<9} | {'req/s':>7} | {'us/req':>6} | " + " | ".join(f"{n:>9}" for n in names))
    print("-" * (32 + 12 * len(names)))
    for t, rps, us, shares, _ in rows:
        print(f"{t:<9} | {rps:>7.0f} | {us:>6.1f} | " + " | ".join(f"{us * shares.get(n, 0.0):>9.1f}" for n in names))
    if args.strace_seconds:
        print("\nsystem calls per request (strace -c -f, the target's processes)")
        for t, _, _, _, calls in rows:
            top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
            print(f"{t:<9} | " + ", ".join(f"{k} {v:.2f}" for k, v in top))


if __name__ == "__main__":
    main()
