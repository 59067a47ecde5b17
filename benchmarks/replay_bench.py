"""Replay client throughput and its own overhead, against a trivial server on loopback.

    python benchmarks/replay_bench.py [--seconds 5] [--rates 1000,2000,4000] [--concurrency 8]

The server (a raw uvloop protocol in a subprocess, answering every request with one fixed
v2 JSON response) is as cheap as a server can be, so what limits the numbers is the
client. Requests are ~1 kB: a v2 binary request carrying 180 float32 values. For each
run it prints achieved rate, corrected/uncorrected latency, how late the open-loop
scheduler sent (send lag), and the client's CPU time per request: the time it spends not
waiting for the server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

RESPONSE = json.dumps({"model_name": "bench", "outputs": [
    {"name": "probabilities", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.6, 0.2, 0.1]}]}).encode()


def serve(port: int) -> None:
    """A minimal keep-alive HTTP/1.1 server that answers every POST with RESPONSE."""
    import asyncio

    import uvloop

    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(RESPONSE)).encode() + b"\r\n\r\n" + RESPONSE)

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):  # noqa: ANN001
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].lower()
                i = head.find(b"content-length:")
                n = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
                if len(self.buf) < end + 4 + n:
                    return
                self.buf = self.buf[end + 4 + n:]
                self.t.write(reply)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Proto, "127.0.0.1", port)
        print("ready", flush=True)
        await srv.serve_forever()

    uvloop.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rates", default="1000,2000,4000")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from servers import free_port

    from sentinel.golden import Tolerance
    from sentinel.replay.http import Target
    from sentinel.replay.report import Objectives, build_report
    from sentinel.replay.runner import LoadPlan, Replayer, Samples
    from sentinel.replay.wire import WireFormat

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    try:
        n = 64
        rng = np.random.default_rng(0)
        probs = np.tile(np.array([0.1, 0.6, 0.2, 0.1], np.float32), (n, 1))
        samples = Samples(ids=np.arange(n), inputs=rng.random((n, 180), dtype=np.float32), probabilities=probs,
                          logits=np.log(probs), tolerance=Tolerance(prob_atol=1e-6))
        wire = WireFormat("v2", "bench", binary=True)
        target = Target.parse(f"http://127.0.0.1:{port}")
        rep = Replayer(target, wire, samples)
        size = len(rep._requests[0])
        print(f"replay client benchmark: {size} B requests (v2 binary, 180 float32) to a trivial uvloop server "
              f"on loopback; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        hdr = (f"{'mode':<16}{'achieved rps':>13}{'corr p50':>10}{'corr p99':>10}{'uncorr p99':>11}"
               f"{'lag p99':>9}{'cpu µs/req':>11}{'client cores':>13}{'agree':>7}")
        print(hdr)
        print("-" * len(hdr))
        plans = [(f"open {r} rps", LoadPlan(rate=float(r), duration_s=args.seconds, connections=64))
                 for r in map(int, args.rates.split(","))]
        plans.append((f"closed c={args.concurrency}", LoadPlan(concurrency=args.concurrency, duration_s=args.seconds)))
        for label, plan in plans:
            res = rep.run(plan)
            d = build_report(res, model="bench", target="", protocol="v2", binary=True, plan=plan,
                             tolerance=samples.tolerance, objectives=Objectives()).doc
            c, u = d["latency_ms"]["corrected"], d["latency_ms"]["uncorrected"]
            print(f"{label:<16}{d['achieved_rps']:>13.0f}"
                  f"{c['p50']:>10.2f}{c['p99']:>10.2f}{u['p99']:>11.2f}{d['client']['send_lag_ms']['p99']:>9.2f}"
                  f"{d['client']['cpu_per_request_us']:>11.1f}{res.cpu_s / res.wall_s:>13.2f}"
                  f"{d['agreement']:>7.0%}")
        print("latencies in ms; 'cpu µs/req' is the client's process CPU time per request (encoding is done "
              "once up front; this is sending, parsing, decoding, comparing, recording); 'client cores' is "
              "that CPU time over wall time.")
    finally:
        proc.terminate()
        proc.wait(5)


if __name__ == "__main__":
    main()
