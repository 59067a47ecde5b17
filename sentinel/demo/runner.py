"""Runs the demo: model server + sidecar + phased open-loop traffic, watched through /metrics."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml

from sentinel import metricnames as mn
from sentinel import protocols
from sentinel.demo.observe import Snapshot, Window, parse, window
from sentinel.demo.phases import Phase, apply_shift
from sentinel.demo.processes import Children, free_port, port_taken, wait_ready
from sentinel.errors import DecodeError, InfrastructureError

MODEL = "digits"
DEMO_DRIFT_ALPHA = 0.01  # the demo sidecar's drift.alpha (see write_sidecar_config)
DEMO_DRIFT_WINDOW = 100  # the demo sidecar's drift.window_size: samples a drift window holds
MAX_RATE = 1000.0        # requests per second; the demo is one model server on loopback
LOCK_FILE = ".sentinel-demo.lock"
PORT_ATTEMPTS = 3   # start attempts when a chosen free port is taken before a child binds it


@dataclass(frozen=True)
class DemoOptions:
    phases: tuple[Phase, ...]
    out: Path
    repo: Path                      # where models/, golden_sets/, slo.yaml live
    rate: float = 20.0              # requests per second, open loop
    scrape_every: float = 2.0       # seconds between /metrics reads
    window_s: float = 6.0           # latency/error window shown and judged
    seed: int = 0
    prometheus: bool = False

    def __post_init__(self) -> None:
        """Options checked before anything starts (UsageError naming the flag)."""
        from sentinel.errors import UsageError

        if self.seed < 0:   # numpy's generator refuses it, but only once traffic would start
            raise UsageError(f"--seed must be a non-negative integer, got {self.seed}")
        if not math.isfinite(self.rate) or not 0 < self.rate <= MAX_RATE:
            # every request is queued at its planned time: a huge rate queues millions at once
            raise UsageError(f"--rate must be a positive number of requests per second of at most "
                             f"{MAX_RATE:g}, got {self.rate:g}")


@dataclass
class Request:
    t: float          # intended send time, seconds since start
    phase: int
    label: int
    status: int = 0
    latency_s: float = math.nan
    predicted: int = -1


@dataclass
class Timeline:
    """Everything observed, for the live view, the summary and the report."""

    started: float = 0.0
    phase_starts: list[float] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)

    def true_accuracy(self, t0: float, t1: float) -> float:
        done = [r for r in self.requests if t0 <= r.t < t1 and r.status == 200 and r.predicted >= 0]
        return float(np.mean([r.predicted == r.label for r in done])) if done else math.nan


def slo_settings(slo_file: Path) -> dict[str, float]:
    """Latency threshold and objectives of the example SLOs (defaults when absent)."""
    out = {"threshold": 0.15, "availability": 0.999, "latency": 0.99, "agreement": 0.995, "accuracy": 0.97}
    if slo_file.is_file():
        from sentinel.slo.spec import load_slo_file

        key = {"availability": "availability", "latency": "latency", "agreement": "agreement",
               "estimated_accuracy": "accuracy"}
        for s in load_slo_file(slo_file).slos:
            if s.sli == "latency" and s.threshold is not None:
                out["threshold"] = float(s.threshold)
            out[key[s.sli]] = float(s.objective)
    return out


def write_sidecar_config(opts: DemoOptions, ports: dict[str, int]) -> Path:
    cfg = {
        "listen": f"127.0.0.1:{ports['proxy']}",
        "upstream": f"http://127.0.0.1:{ports['server']}",
        "admin": f"127.0.0.1:{ports['admin']}",
        "registry": str(opts.repo / "models"),
        "golden_sets": str(opts.repo / "golden_sets"),
        "slo_file": str(opts.repo / "slo.yaml"),
        "default_model": MODEL,
        "models": [{"name": MODEL, "version": "v3", "endpoint": f"http://127.0.0.1:{ports['server']}",
                    "protocol": "v2"}],
        # Sample everything: the demo's traffic is small and drift windows should fill fast.
        "sampling": {"rate": 1.0, "max_per_second": 200},
        # The daemon evaluates a sliding window every 20 samples, so a normal phase of 35 s
        # holds ~35 overlapping tests; at alpha 0.05 one of them alarming by chance is likely.
        # alpha 0.01 and persistence 2 (two consecutive disjoint windows must alarm) keep the
        # normal phases quiet for one window (5 s) of extra delay; real shifts give p < 1e-10.
        "drift": {"window_size": DEMO_DRIFT_WINDOW, "evaluate_every": 20, "alpha": DEMO_DRIFT_ALPHA,
                  "persistence": 2},
        "replay": {"canary_interval_s": 10, "canary_samples": 8, "canary_rate": 8},
    }
    path = opts.out / "sentinel.demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _payload(raw: np.ndarray) -> bytes:
    """A v2 JSON request for one 8×8 image (values rounded to 4 decimals: shorter bodies)."""
    x = np.round(np.asarray(raw, dtype=np.float64).reshape(1, 8, 8), 4)
    return protocols.encode_request("v2", x.astype(np.float32))[0]


def _predicted(body: bytes, headers: dict[str, str] | None = None) -> int:
    """The predicted class of a v2 response, read by the wire layer (-1 when it cannot be read)."""
    try:
        resp = protocols.decode_response("v2", body, headers or {})
    except DecodeError:
        return -1
    return int(np.argmax(resp.probabilities_or_softmax()[0]))


class Demo:
    """One run. `on_update(timeline)` is called after every scrape (the live view)."""

    def __init__(self, opts: DemoOptions, on_update: Callable[[Demo], None] | None = None):
        self.opts = opts
        self.on_update = on_update or (lambda d: None)
        self.timeline = Timeline()
        self.slo = slo_settings(opts.repo / "slo.yaml")
        self.children = Children(opts.out)
        self.ports = {k: free_port() for k in ("server", "proxy", "admin")}
        self.current_phase = 0
        self.fault_control_ok = True
        self.drift_alpha = DEMO_DRIFT_ALPHA
        self._lock_fd: int | None = None

    # --- set-up -----------------------------------------------------------------
    def claim_out(self) -> None:
        """Create `--out` and hold its lock for the run: two demos writing one folder would
        truncate each other's logs and reports (and share Prometheus's TSDB). UsageError when
        the folder cannot be made or another demo holds it."""
        import fcntl
        import os

        from sentinel.errors import UsageError

        out = self.opts.out
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot use it as the report folder: "
                             f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"--out {out}: another sentinel demo (pid {holder}) is writing there; "
                             "wait for it to end or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def start(self) -> None:
        """Start the model server and the sidecar (and Prometheus); ports taken meanwhile by another
        process (between choosing a free port and the child binding it) are chosen again."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start()
                return
            except InfrastructureError as exc:
                if attempt + 1 == PORT_ATTEMPTS or not port_taken(str(exc)):
                    raise
                self.children.stop()
                self.children = Children(self.opts.out)
                self.ports = {k: free_port() for k in ("server", "proxy", "admin")}

    def _start(self) -> None:
        o = self.opts
        if self._lock_fd is None:
            self.claim_out()
        cfg = write_sidecar_config(o, self.ports)
        from sentinel.config import load_config

        self.drift_alpha = load_config(cfg).drift.alpha  # what the sidecar alarms at, for the report
        self.children.sentinel("model-server", "serve", "--model", f"{MODEL}:v3", "--registry",
                               str(o.repo / "models"), "--port", str(self.ports["server"]), "--fault-admin")
        self.children.sentinel("sidecar", "run", "--config", str(cfg))
        self._write_children()
        wait_ready(f"http://127.0.0.1:{self.ports['server']}/v2/health/ready", self.children)
        wait_ready(f"http://127.0.0.1:{self.ports['admin']}/healthz", self.children)
        self._warm_up()
        if o.prometheus:
            from sentinel.demo.prom import start_prometheus

            self.prom_url = start_prometheus(self, cfg)
            self._write_children()

    def _write_children(self) -> None:
        """children.json: every child's pid and every port, so an interrupted run can be checked."""
        doc = {"children": {name: p.pid for name, p in self.children.procs}, "ports": self.ports}
        (self.opts.out / "children.json").write_text(json.dumps(doc, indent=1))

    def _warm_up(self, timeout: float = 90.0) -> None:
        """Warm the model server directly, then wait until the sidecar's analysis decodes a sample.

        Model load, the first inferences and the analysis worker's start-up (reference export,
        throughput probe) would otherwise land in the first phase's latency and accuracy.
        """
        from sentinel.training.digits import load_split

        images, _, _ = load_split()
        body = _payload(images[0:1])
        headers = {"Content-Type": "application/json"}
        with httpx.Client(timeout=30.0) as c:
            for _ in range(10):
                c.post(f"http://127.0.0.1:{self.ports['server']}/v2/models/{MODEL}/infer", content=body,
                       headers=headers)
            c.post(f"http://127.0.0.1:{self.ports['proxy']}/v2/models/{MODEL}/infer", content=body, headers=headers)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.children.check_alive()
                snap = parse(c.get(f"http://127.0.0.1:{self.ports['admin']}/metrics").text, 0.0)
                done = snap.values(mn.SAMPLES.sample_name, "outcome", model=MODEL)
                if done.get("decoded", 0) + done.get("rejected", 0) >= 1:
                    return
                time.sleep(0.5)
        self.timeline.notes.append(f"analysis did not report a decoded sample within {timeout:.0f} s of start")

    def stop(self) -> None:
        self.children.stop()

    def release_out(self) -> None:
        """Let another demo use `--out` (after the report is written; also at exit, by the OS)."""
        import os

        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the run ----------------------------------------------------------------
    async def _set_faults(self, client: httpx.AsyncClient, phase: Phase) -> None:
        url = f"http://127.0.0.1:{self.ports['server']}/sentinel/faults"
        try:
            r = await client.post(url, json={"delay_ms": phase.delay_ms, "error_ratio": phase.error_ratio})
            r.raise_for_status()
        except httpx.HTTPError as exc:
            if phase.delay_ms or phase.error_ratio:
                self.fault_control_ok = False
                self.timeline.notes.append(f"could not inject faults for {phase.name!r}: {exc}")

    async def _one(self, client: httpx.AsyncClient, url: str, req: Request, body: bytes) -> None:
        t0 = time.perf_counter()
        try:
            r = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            req.status = r.status_code
            if r.status_code == 200:
                req.predicted = _predicted(r.content, {k.lower(): v for k, v in r.headers.items()})
        except httpx.HTTPError:
            req.status = -1
        # Open loop: latency counts from the intended send time.
        req.latency_s = time.perf_counter() - t0 + max(0.0, (t0 - self.timeline.started) - req.t)

    async def _traffic(self, client: httpx.AsyncClient) -> None:
        from sentinel.registry import Registry
        from sentinel.training.digits import load_split

        entry = Registry(self.opts.repo / "models", default_model=MODEL).resolve(f"{MODEL}:v3")
        images, labels, _ = load_split()
        # Held-out digits only: never the training or golden data.
        idx = np.asarray(entry.manifest.split.holdout, np.int64)
        rng = np.random.default_rng(self.opts.seed)
        url = f"http://127.0.0.1:{self.ports['proxy']}/v2/models/{MODEL}/infer"
        tasks: set[asyncio.Task] = set()
        t_phase = 0.0
        interval = 1.0 / self.opts.rate
        for pi, phase in enumerate(self.opts.phases):
            self.current_phase = pi
            self.timeline.phase_starts.append(t_phase)
            await self._set_faults(client, phase)
            n = int(round(phase.seconds * self.opts.rate))
            for k in range(n):
                t_int = t_phase + k * interval
                delay = self.timeline.started + t_int - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                j = int(rng.choice(idx))
                raw = apply_shift(images[j:j + 1], phase.shift, rng)
                req = Request(t=t_int, phase=pi, label=int(labels[j]))
                self.timeline.requests.append(req)
                task = asyncio.create_task(self._one(client, url, req, _payload(raw)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            t_phase += phase.seconds
        await asyncio.sleep(max(0.0, self.timeline.started + t_phase - time.perf_counter()))
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await self._set_faults(client, Phase("reset", 0))

    async def _scrape(self, client: httpx.AsyncClient, done: asyncio.Event) -> None:
        url = f"http://127.0.0.1:{self.ports['admin']}/metrics"
        history: list[Snapshot] = []
        while not done.is_set():
            try:
                r = await client.get(url)
                snap = parse(r.text, time.perf_counter() - self.timeline.started)
                history.append(snap)
                # Compare with the scrape closest to window_s ago.
                base = next((s for s in history if snap.t - s.t <= self.opts.window_s), history[0])
                if base is not snap:
                    self.timeline.windows.append(window(base, snap, MODEL, self.slo["threshold"]))
                    self.on_update(self)
            except httpx.HTTPError as exc:
                self.timeline.notes.append(f"scrape failed at {time.perf_counter() - self.timeline.started:.0f}s: {exc}")
            self.children.check_alive()
            try:
                async with asyncio.timeout(self.opts.scrape_every):
                    await done.wait()
            except TimeoutError:
                pass

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
            self.timeline.started = time.perf_counter()
            self.wall_started = time.time()
            done = asyncio.Event()
            scraper = asyncio.create_task(self._scrape(client, done))
            try:
                await self._traffic(client)
                await asyncio.sleep(self.opts.scrape_every)
            finally:
                done.set()
                await scraper
            if self.opts.prometheus and getattr(self, "prom_url", None):
                from sentinel.demo.prom import collect_alerts

                self.timeline.alerts = await collect_alerts(client, self.prom_url, self.wall_started)

    def run(self) -> Timeline:
        asyncio.run(self._main())
        return self.timeline


def phase_at(phases: tuple[Phase, ...], starts: list[float], t: float) -> int:
    i = 0
    for k, s in enumerate(starts):
        if t >= s:
            i = k
    return i


def json_safe(v: object) -> object:
    """Plain JSON values: NaN and infinities become null (JSON has no such numbers)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, np.generic):
        return json_safe(v.item())
    return str(v)


def timeline_json_text(demo: Demo) -> str:
    """timeline.json: strict JSON (no bare NaN), missing values as null."""
    return json.dumps(json_safe(timeline_json(demo)), indent=1, allow_nan=False) + "\n"


def timeline_json(demo: Demo) -> dict:
    tl = demo.timeline
    return {
        "phases": [dict(asdict(p), start=s) for p, s in zip(demo.opts.phases, tl.phase_starts, strict=False)],
        "slo": demo.slo,
        "drift_alpha": demo.drift_alpha,
        "windows": [asdict(w) for w in tl.windows],
        "requests": len(tl.requests),
        "notes": tl.notes,
        "alerts": tl.alerts,
        "children": {name: p.pid for name, p in demo.children.procs},
        "ports": demo.ports,
    }
