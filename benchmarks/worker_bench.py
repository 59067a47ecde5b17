"""Per-sample CPU of the analysis worker, before and after its fast paths, side by side in one run.

For each body (1 kB OIP v2 JSON, a 602,112-byte OIP v2 binary image, a KServe v1 JSON body)
and each code version (`before`: the tree at --baseline-ref, extracted with `git archive`;
`after`: this checkout), a child process imports that version and measures

- hot: `Worker.handle` in a loop in-process (decode + built-in monitor + result bookkeeping),
  microseconds of CPU per sample;
- loop: the real worker process (`sentinel.proxy.worker.main`, spawned) fed pickled samples
  through a real pipe at --rate samples/s, as the proxy feeds it: the worker's CPU per
  sample (wake-ups, unpickling, pickling and writing results included), and the CPU the
  main process spends reading and applying the results (`AnalysisManager._handle`).

    python benchmarks/worker_bench.py                 # 5 s per loop measurement
    python benchmarks/worker_bench.py --seconds 1     # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The last commit before the decode fast paths and batched results (issue 15): the "before" column.
BASELINE_REF = "072a9d7"
BODIES = ("1 kB v2 JSON", "602 kB v2 binary", "v1 JSON")
RATES = {"1 kB v2 JSON": 50.0, "602 kB v2 binary": 10.0, "v1 JSON": 50.0}   # 5% of 1,000 / 200 rps


def make_samples():
    """(name, Sample) for each body; the upstream answers 10 FP32 scores as JSON."""
    import numpy as np

    from sentinel.protocols import kserve_v1, oip_v2
    from sentinel.proxy.sampling import Sample

    resp_v2 = json.dumps({"model_name": "bench", "outputs": [{"name": "logits", "shape": [1, 10], "datatype": "FP32",
                                                              "data": [0.1 * i for i in range(10)]}]}).encode()
    small = b'{"inputs":[{"name":"x","shape":[1,200],"datatype":"FP32","data":[' + b",".join([b"0.5"] * 200) + b"]}]}"
    small += b" " * (1024 - len(small))
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    large, large_h = oip_v2.encode([("input-0", image)])
    v1_req, _ = kserve_v1.encode_request(np.full((1, 200), 0.5, np.float32))
    v1_resp, _ = kserve_v1.encode_response(np.linspace(0, 1, 10)[None])
    json_h = {"content-type": "application/json"}
    return {
        "1 kB v2 JSON": Sample("bench", "v2", json_h, small, json_h, resp_v2),
        "602 kB v2 binary": Sample("bench", "v2", {k.lower(): v for k, v in large_h.items()}, large, json_h, resp_v2),
        "v1 JSON": Sample("bench", "v1", json_h, v1_req, json_h, v1_resp),
    }


def config(protocol: str):
    from sentinel.config import AnalysisConfig, Config, ModelConfig

    return Config(models=(ModelConfig(name="bench", version="v1", protocol=protocol),),
                  analysis=AnalysisConfig(worker_memory_limit_bytes=0))


class Counting:
    def __init__(self) -> None:
        self.n = 0

    def send(self, msg: tuple) -> None:
        self.n += 1


def hot(sample, n: int) -> float:
    """µs of CPU per sample of Worker.handle in a loop (results flushed every 5 samples when batched)."""
    from sentinel.proxy.builtin_monitor import build_builtin
    from sentinel.proxy.worker import Worker

    w = Worker(config(sample.protocol), build_builtin, Counting())
    flush = getattr(w, "flush", lambda: None)
    for _ in range(50):
        w.handle(sample)
    flush()
    t = time.process_time()
    for i in range(n):
        w.handle(sample)
        if i % 5 == 4:
            flush()
    flush()
    return (time.process_time() - t) / n * 1e6


def samples_in(msg: tuple) -> int:
    """How many samples a worker message reports (the unbatched and batched forms)."""
    if msg[0] == "sample":
        return 1
    if msg[0] == "samples":
        return int(msg[2])
    if msg[0] == "batch":
        return sum(samples_in(m) for m in msg[1])
    return 0


def loop(sample, rate: float, seconds: float) -> tuple[float, float]:
    """(worker CPU ms per sample, main-process result handling µs per sample) over a real pipe."""
    import asyncio
    import multiprocessing as mp
    import pickle

    import psutil

    from sentinel.proxy import analysis, worker
    from sentinel.proxy.analysis import AnalysisManager
    from sentinel.proxy.metrics import ProxyMetrics

    cfg = config(sample.protocol)
    ctx = mp.get_context("spawn")
    s_r, s_w = ctx.Pipe(duplex=False)
    r_r, r_w = ctx.Pipe(duplex=False)
    grow = getattr(analysis, "grow_pipe", None)   # as this version's manager sets up the samples pipe
    if grow is not None:
        grow(s_w.fileno())
    proc = ctx.Process(target=worker.main, args=(cfg, "sentinel.proxy.builtin_monitor:build_builtin", s_r, r_w),
                       daemon=True)
    proc.start()
    r_w.close()
    s_r.close()
    ev = asyncio.new_event_loop()
    mgr = AnalysisManager(cfg, ProxyMetrics({"bench": "bench"}, 8), ev)
    payload = pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL)
    state = {"got": 0, "main_cpu": 0.0}

    def feed(n: int, dt: float) -> None:
        """Send n samples dt apart, reading results meanwhile; then wait for all of them."""
        want = state["got"] + n
        nxt = time.monotonic()
        sent = 0
        while state["got"] < want:
            now = time.monotonic()
            if sent < n and now >= nxt:
                s_w.send_bytes(payload)
                sent += 1
                nxt += dt
            wait = max(0.0, nxt - time.monotonic()) if sent < n else 1.0
            if r_r.poll(wait):
                t = time.process_time()
                while r_r.poll():
                    msg = r_r.recv()
                    state["got"] += samples_in(msg)
                    mgr._handle(msg)
                state["main_cpu"] += time.process_time() - t

    p = psutil.Process(proc.pid)
    mgr.outstanding = 1 << 30   # the accounting the manager does per sample, without its submit()
    feed(max(5, int(rate)), 1.0 / rate)   # warm: monitor built, imports done
    c0, m0 = sum(p.cpu_times()[:2]), state["main_cpu"]
    n = max(5, int(rate * seconds))
    feed(n, 1.0 / rate)
    c1, m1 = sum(p.cpu_times()[:2]), state["main_cpu"]
    s_w.send(None)
    proc.join(10)
    ev.close()
    return (c1 - c0) / n * 1e3, (m1 - m0) / n * 1e6


def child(version: str, seconds: float, n_hot: int) -> None:
    """Measure every body with the sentinel package importable now; print one JSON line."""
    samples = make_samples()
    out = {}
    for name in BODIES:
        s = samples[name]
        n = n_hot if "602" not in name else max(20, n_hot // 20)
        w_ms, m_us = loop(s, RATES[name], seconds)
        out[name] = {"hot_us": hot(s, n), "loop_ms": w_ms, "main_us": m_us}
    print(json.dumps({"version": version, "results": out}))


def baseline_tree(ref: str, into: Path) -> Path:
    """The sentinel package as of `ref` (git archive), extracted under `into`."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "sentinel"], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=data, check=True)
    return into


def run_child(tree: Path, version: str, seconds: float, n_hot: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", version, "--seconds", str(seconds),
                        "--hot", str(n_hot)], env=env, cwd=tree, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{version} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["results"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each loop measurement")
    ap.add_argument("--hot", type=int, default=2000, help="samples of each in-process hot-loop measurement")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the 'before' code")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.seconds, args.hot)
        return
    with tempfile.TemporaryDirectory() as tmp:
        before = run_child(baseline_tree(args.baseline_ref, Path(tmp)), "before", args.seconds, args.hot)
        after = run_child(REPO, "after", args.seconds, args.hot)
    print(f"Analysis worker, per sample (built-in monitor; before = {args.baseline_ref}, after = this checkout; "
          f"loop: {args.seconds:g} s at {RATES['1 kB v2 JSON']:g}/s, 602 kB at {RATES['602 kB v2 binary']:g}/s)\n")
    print("| body | hot loop µs, before / after | worker process ms, before / after "
          "| main process µs (results), before / after |")
    print("|---|---|---|---|")
    for name in BODIES:
        b, a = before[name], after[name]
        print(f"| {name} | {b['hot_us']:.0f} / {a['hot_us']:.0f} | {b['loop_ms']:.3f} / {a['loop_ms']:.3f} "
              f"| {b['main_us']:.0f} / {a['main_us']:.0f} |")


if __name__ == "__main__":
    main()
