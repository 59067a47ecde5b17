"""A/B: the analysis worker's scheduling (normal, SCHED_BATCH, nice 10): CPU and added p99 at 1 kB, 1,000 rps.

    python benchmarks/sched_ab.py [ROUNDS=3] [SECONDS=5]     # about 2 minutes; needs nginx

Direct, nginx and three sidecars (analysis.worker_scheduling normal / batch, worker_nice 10,
sampling 5%) take turns; prints the median [min-max] of CPU per 1k requests and of the p99
added to direct's in the same round.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import proxy_bench as pb  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
secs = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
rate = 1000.0
tmp = Path(tempfile.mkdtemp(prefix="sched-ab-"))
up, ng = pb.free_port(), pb.free_port()
procs = {"upstream": pb.start_nginx(tmp, "upstream", pb.UPSTREAM_CONF.format(port=up, resp=pb.UPSTREAM_BODY)),
         "nginx": pb.start_nginx(tmp, "proxy", pb.PROXY_CONF.format(up=up, port=ng))}
ports = {"direct": up, "nginx": ng}
for name, extra in (("normal", ""), ("batch", "worker_scheduling: batch"), ("nice10", "worker_nice: 10")):
    d = tmp / name
    d.mkdir()
    p, a = pb.free_port(), pb.free_port()
    cfg = d / "sentinel.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{p}\nadmin: 127.0.0.1:{a}\nupstream: http://127.0.0.1:{up}\nlog_level: warning\n"
                   f"models:\n  - {{name: bench, version: v1, protocol: v2}}\n"
                   f"sampling: {{rate: 0.05, max_per_second: 100, max_bytes: 8388608}}\n"
                   f"proxy: {{max_body_bytes: 134217728}}\n" + (f"analysis: {{{extra}}}\n" if extra else ""))
    procs[name] = subprocess.Popen([sys.executable, str(HERE / "proxy_bench.py"), "--serve-sidecar", str(cfg)],
                                   cwd=str(HERE.parent), stdout=subprocess.DEVNULL)
    ports[name] = p
req = pb.request_bytes("/v2/models/bench/infer", pb.SMALL_JSON, pb.JSON_HEADERS)
try:
    for p in ports.values():
        pb.wait_port(p)
    for p in ports.values():
        pb.open_loop(p, req, 300, 1.0)
    res = {k: [] for k in ports}
    for _ in range(rounds):
        for name, port in ports.items():
            pid = procs[name if name != "direct" else "upstream"].pid
            c0 = pb.cpu_seconds(pid)
            lat, err = pb.open_loop(port, req, rate, secs)
            n = len(lat) + err
            res[name].append(((pb.cpu_seconds(pid) - c0) / n * 1000, float(np.percentile(lat, 99)), float(np.percentile(lat, 50)), err))
    d99 = [v[1] for v in res["direct"]]
    for name, v in res.items():
        add = [x[1] - d for x, d in zip(v, d99, strict=True)]
        print(f"{name:8s} cpu s/1k med {np.median([x[0] for x in v]):.3f} [{min(x[0] for x in v):.3f}-{max(x[0] for x in v):.3f}]"
              f"  p99 {np.median([x[1] for x in v]):.2f}  added p99 med {np.median(add):+.2f} [{min(add):+.2f}..{max(add):+.2f}]  err {sum(x[3] for x in v)}")
finally:
    pb.stop_processes(procs.values(), 10.0)
