"""Wires the daemon together: proxy listener, admin listener, metrics, sampling, analysis, ingest."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import hmac
import ipaddress
import json
import logging
import signal
import time
from typing import Any
from urllib.parse import urlsplit

from sentinel import __version__
from sentinel import metricnames as mn
from sentinel.config import Config, parse_hostport
from sentinel.errors import ConfigError, InfrastructureError
from sentinel.proxy import ingest, tracing, worker
from sentinel.proxy.admin import AdminConnection, AdminConnections, Request, Response
from sentinel.proxy.analysis import AnalysisManager
from sentinel.proxy.context import Limits, fd_budget
from sentinel.proxy.ingest import JoinTable
from sentinel.proxy.metrics import ProxyMetrics
from sentinel.proxy.multiproc import make_samplers, shared_budget, worker_connections
from sentinel.proxy.sampling import Sampler
from sentinel.proxy.server import ClientConnection, ProxyContext
from sentinel.proxy.upstream import UpstreamPool

log = logging.getLogger("sentinel.run")

JSON = b"application/json"
READY_CACHE_S = 1.0
TRACER_SHUTDOWN_S = 3.0   # the longest stopping waits for the OTLP collector to take the last spans


def slo_latency_thresholds(config: Config) -> tuple[float, ...]:
    """Latency thresholds (seconds) of the SLO file, so the histogram has a bucket at each."""
    if not config.slo_file:
        return ()
    path = config.resolve(config.slo_file)
    if not path.is_file():
        log.info("SLO file %s not found; latency buckets are the defaults", path)
        return ()
    from sentinel.slo.spec import load_slo_file

    spec = load_slo_file(path)  # ConfigError naming the field, as for the daemon's own config
    return tuple(float(s.threshold) for s in spec.slos if s.sli == "latency" and s.threshold is not None)


def upstream_address(config: Config) -> tuple[str, int]:
    parts = urlsplit(config.upstream)
    if parts.scheme != "http":
        raise ConfigError([f"{config.source}: upstream: the proxy speaks plain HTTP to the model server "
                           f"(same pod); got {config.upstream!r}"])
    return parts.hostname or "127.0.0.1", parts.port or 80


INGEST_TOKEN_HEADER = "x-sentinel-ingest-token"


def read_ingest_token(config: Config) -> bytes | None:
    """The /ingest shared secret from `analysis.ingest_token` or `analysis.ingest_token_file`."""
    a = config.analysis
    if a.ingest_token_file:
        path = config.resolve(a.ingest_token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError([f"{config.source}: analysis.ingest_token_file: cannot read {path}: "
                               f"{exc.strerror or exc}"]) from None
        if not token:
            raise ConfigError([f"{config.source}: analysis.ingest_token_file: {path} is empty"])
        return token.encode()
    return a.ingest_token.encode() if a.ingest_token else None


def ingest_denied(req: Request, token: bytes | None) -> str | None:
    """Why an /ingest request may not post events, or None when it may.

    Loopback peers (the same pod: the KServe logger next door) may always post. Any other
    peer must present the shared secret, compared in constant time; with no secret
    configured, only loopback peers are accepted.
    """
    peer = getattr(req, "peer", None)
    try:
        if peer is not None and ipaddress.ip_address(peer).is_loopback:
            return None
    except ValueError:
        pass
    if token is None:
        return ("/ingest accepts events from loopback peers only; set analysis.ingest_token "
                "to accept them from elsewhere")
    given = req.headers.get(INGEST_TOKEN_HEADER, "")
    if not given:
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
    if not given or not hmac.compare_digest(given.encode("latin-1"), token):
        return f"/ingest needs the shared secret in {INGEST_TOKEN_HEADER} (or Authorization: Bearer)"
    return None


class Sidecar:
    """One running daemon; `start()` binds both listeners, `stop()` drains and shuts down."""

    def __init__(self, config: Config, *, monitor_factory: str = worker.DEFAULT_FACTORY):
        self.config = config
        self.monitor_factory = monitor_factory
        known = {m.path_name: m.name for m in config.models} | {m.name: m.name for m in config.models}
        self.metrics = ProxyMetrics(known, config.proxy.max_model_labels, slo_latency_thresholds(config),
                                    versions={m.name: m.version for m in config.models})
        for m in config.models:   # so the first failures of this sidecar's life are counted by rate()
            self.metrics.zero_codes(m.name, (m.protocol, "grpc") if config.grpc_listen else (m.protocol,))
        self.nginx_engine = config.proxy.engine == "nginx"
        # proxy.workers > 1: one sampling budget for the whole sidecar, in memory shared with the workers
        self.sampling_budget = (shared_budget(len(config.models)) if config.proxy.workers > 1 and not self.nginx_engine
                                else None)
        if self.nginx_engine:   # sentinel samples from nginx's captured share: each model's rate over it
            from sentinel.proxy.nginx import capture_config

            self.samplers = make_samplers(capture_config(config))
        else:
            self.samplers = make_samplers(config, self.sampling_budget)
        self.nginx: Any = None        # proxy.engine nginx: nginx.Nginx, the process
        self.access_log: Any = None   # ... and nginx.AccessLog, its request counter
        self.up_host, self.up_port = upstream_address(config)
        self.join = JoinTable(config.analysis.ingest_ttl_s, config.analysis.ingest_max_pending,
                              config.analysis.ingest_max_pending_bytes)
        self.started_at = time.time()
        self.proxy_server: Any = None
        self.admin_server: Any = None
        self._stopped: asyncio.Event | None = None
        self._ready: tuple[float, bool, str] = (0.0, False, "not checked")
        self._tasks: list[asyncio.Task] = []
        self.gpu_collector: Any = None
        self.canaries: list[Any] = []
        self.grpc_proxy: Any = None
        self.grpc_address: tuple[str, int] | None = None
        self.canary_problems: dict[str, str] = {}
        self.workers: Any = None   # multiproc.WorkerSet when proxy.workers > 1
        self._proxy_address: tuple[str, int] | None = None
        self._admin_address: tuple[str, int] | None = None
        self._add_gpu_collector()

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        cfg = self.config
        self._stopped = asyncio.Event()
        self.pool = UpstreamPool(self.up_host, self.up_port, cfg.proxy.connect_timeout_s, cfg.proxy.upstream_pool_size)
        self.analysis = AnalysisManager(cfg, self.metrics, loop, self.monitor_factory)
        self.tracer = (tracing.SpanExporter(cfg.tracing.otlp_endpoint, cfg.tracing.service_name)
                       if cfg.tracing.otlp_endpoint else None)
        limits = Limits.from_config(cfg.proxy)
        if cfg.proxy.workers > 1:   # each of the N processes holds its share: the cap is the sidecar's
            limits = dataclasses.replace(limits, max_connections=worker_connections(limits.max_connections,
                                                                                    cfg.proxy.workers))
        budget = fd_budget(limits.max_connections, cfg.proxy.admin_max_connections + cfg.proxy.upstream_pool_size + 256)
        if budget < limits.max_connections:
            log.warning("proxy.max_connections %d exceeds what the file-descriptor limit allows; using %d",
                        limits.max_connections, budget)
            limits = dataclasses.replace(limits, max_connections=budget)
        self.ctx = ProxyContext(loop=loop, pool=self.pool, metrics=self.metrics, max_body=cfg.proxy.max_body_bytes,
                                samplers=self.samplers, submit=self.analysis.submit, tracer=self.tracer,
                                limits=limits)
        self.ingest_token = read_ingest_token(cfg)
        admin_limits = Limits.from_config(cfg.proxy, admin=True)
        admin_conns = AdminConnections(admin_limits, self.ctx.fail)
        host, port = parse_hostport(cfg.listen)
        if self.nginx_engine:   # nginx will bind `listen`: a clear error now if something holds it
            nginx_probe = await self._listen("listen", cfg.listen, lambda: ClientConnection(self.ctx), host, port)
            nginx_probe.close()
            await nginx_probe.wait_closed()
        else:
            self.proxy_server = await self._listen("listen", cfg.listen, lambda: ClientConnection(self.ctx),
                                                   host, port, reuse_port=cfg.proxy.workers > 1)
            self._proxy_address = self.proxy_server.sockets[0].getsockname()[:2]
        ahost, aport = parse_hostport(cfg.admin)
        max_ingest = max(s.max_bytes for _, s in self.samplers.values()) if self.samplers else 1 << 20
        admin_body = cfg.proxy.admin_max_body_bytes or 2 * max_ingest + 65536
        try:
            self.admin_server = await self._listen(
                "admin", cfg.admin, lambda: AdminConnection(self._admin, admin_body, admin_conns), ahost, aport)
        except InfrastructureError:
            self._close_proxy()
            raise
        self._admin_address = self.admin_server.sockets[0].getsockname()[:2]
        try:
            await self._start_grpc()
        except InfrastructureError:
            self._close_proxy()
            self.admin_server.close()
            raise
        if self.nginx_engine:
            try:
                await self._start_nginx()
            except BaseException:
                self._close_proxy()
                self.admin_server.close()
                if self.grpc_proxy is not None:
                    await self.grpc_proxy.stop(0)
                raise
        elif cfg.proxy.workers > 1:
            from sentinel.proxy.multiproc import WorkerSet

            bound_host, bound_port = self.proxy_address   # port 0 resolved: every worker binds the same one
            bound = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
            self.workers = WorkerSet(dataclasses.replace(cfg, listen=bound), self.metrics, self.analysis.submit,
                                     self.ctx.fail, loop, self.sampling_budget, serve=self._serve_slot)
            self.workers.start()
        self._start_canaries()
        self._export_model_sizes()
        self._tasks.append(loop.create_task(self._expire_ingest()))
        self._tasks.append(loop.create_task(self.ctx.run_sweeper()))
        self._tasks.append(loop.create_task(admin_conns.run_sweeper()))
        log.info("proxy on %s:%d → %s; admin on %s:%d", *self.proxy_address, cfg.upstream, *self.admin_address)

    def _close_proxy(self) -> None:
        if self.proxy_server is not None:   # None: proxy.engine nginx
            self.proxy_server.close()

    async def _start_nginx(self) -> None:
        """proxy.engine nginx: the access-log reader, then nginx on `listen` (sentinel/proxy/nginx.py)."""
        from sentinel.proxy.metrics import _make
        from sentinel.proxy.nginx import PAUSE_REASONS, AccessLog, CaptureFiles, Nginx, render_conf

        cfg = self.config
        restarts = _make(mn.DATAPLANE_RESTARTS, self.metrics.registry)
        paused = _make(mn.CAPTURES_PAUSED, self.metrics.registry)
        for reason in PAUSE_REASONS:
            paused.labels(reason).set(0)
        self.nginx = Nginx(cfg, cfg.proxy.nginx_binary, on_restart=restarts.inc,
                           on_pause=lambda reason, on: paused.labels(reason).set(1 if on else 0))
        captures = CaptureFiles(self.nginx.capture_dir, self.samplers, self.analysis.submit, self.ctx.count_sample)
        self.access_log = AccessLog(self.metrics, captures=captures)
        conf = functools.partial(render_conf, cfg, upstream=(self.up_host, self.up_port),
                                 log_to=self.access_log.address, run_dir=self.nginx.run_dir,
                                 capture_dir=self.nginx.capture_dir)
        try:
            await self.loop.run_in_executor(None, self.nginx.write_and_check, conf())
            self._tasks.append(self.loop.create_task(self.access_log.run()))
            host, port = parse_hostport(cfg.listen)

            async def listening() -> bool:
                try:
                    _, w = await asyncio.open_connection(host, port)
                except OSError:
                    return False
                w.close()
                return True
            await self.nginx.start(listening)
        except BaseException:
            await self.nginx.stop(0)
            self.access_log.close()
            raise
        self._proxy_address = (host, port)
        if self.nginx.share > 0:   # a stalled loop takes no captures: nginx must not pile them up (Nginx.watch)
            beat = [time.monotonic()]

            async def tick() -> None:
                while True:
                    beat[0] = time.monotonic()
                    await asyncio.sleep(0.25)
            self._tasks.append(self.loop.create_task(tick()))
            self.nginx.watch(lambda: beat[0], conf(sample=False), captures)
        log.info("nginx (pid %d) carries %s → %s; it captures a %.4g share for sampling",
                 self.nginx.proc.pid, cfg.listen, cfg.upstream, self.nginx.share)

    async def _serve_slot(self, sock: Any) -> Any:
        """This process's server on a proxy worker slot's socket (multiproc: while the slot has no worker)."""
        return await self.loop.create_server(lambda: ClientConnection(self.ctx), sock=sock, backlog=2048)

    async def _start_grpc(self) -> None:
        """The gRPC listener (OIP v2 over gRPC), when `grpc_listen` is configured."""
        cfg = self.config
        if cfg.grpc_listen is None:
            return
        from sentinel.proxy.grpc_proxy import GrpcProxy

        assert cfg.grpc_upstream is not None   # validated with grpc_listen
        self.grpc_proxy = GrpcProxy(
            upstream=cfg.grpc_upstream, metrics=self.metrics, samplers=self.samplers, submit=self.analysis.submit,
            count_sample=self.ctx.count_sample, max_message_bytes=cfg.grpc.max_message_bytes,
            upstream_timeout_s=cfg.grpc.upstream_timeout_s, max_concurrent=cfg.grpc.max_concurrent_rpcs,
            tracer=self.tracer, request_timeout_s=cfg.proxy.body_idle_timeout_s)
        try:
            port = await self.grpc_proxy.start(cfg.grpc_listen)
        except RuntimeError as exc:
            port, why = 0, str(exc)
        else:
            why = "address in use or not available"
        if not port:
            await self.grpc_proxy.stop(0)
            self.grpc_proxy = None
            raise InfrastructureError(f"cannot listen on {cfg.grpc_listen} ({cfg.source}: grpc_listen): {why}")
        self.grpc_address = (parse_hostport(cfg.grpc_listen)[0], port)
        log.info("gRPC proxy on %s:%d → %s", *self.grpc_address, cfg.grpc_upstream)

    async def _listen(self, field: str, addr: str, factory: Any, host: str, port: int,
                      reuse_port: bool = False) -> Any:
        try:
            if reuse_port and port:
                # SO_REUSEPORT lets any socket of the same user share the port: another daemon
                # already listening there (a second sentinel with proxy.workers > 1) would be
                # joined silently, each getting part of the connections. A plain bind first
                # fails with "address in use" when anything listens there.
                probe = await self.loop.create_server(factory, host, port, reuse_address=True)
                probe.close()
                await probe.wait_closed()
            return await self.loop.create_server(factory, host, port, backlog=2048, reuse_address=True,
                                                 reuse_port=reuse_port or None)
        except OSError as exc:
            raise InfrastructureError(f"cannot listen on {addr} ({self.config.source}: {field}): "
                                      f"{exc.strerror or exc}") from None

    @property
    def proxy_address(self) -> tuple[str, int]:
        # Kept from start: a closed server (a drain) has no sockets left, and /status still answers.
        if self._proxy_address is None:
            self._proxy_address = self.proxy_server.sockets[0].getsockname()[:2]
        return self._proxy_address

    @property
    def admin_address(self) -> tuple[str, int]:
        if self._admin_address is None:
            self._admin_address = self.admin_server.sockets[0].getsockname()[:2]
        return self._admin_address

    def request_stop(self) -> None:
        """Begin a graceful stop (signal handlers call this)."""
        if self._stopped is not None and not self._stopped.is_set():
            log.info("stopping: no new connections; draining in-flight requests (up to %s s)",
                     self.config.proxy.drain_timeout_s)
            if self.workers is not None:   # a worker ending now (Ctrl-C reaches the whole group) is no death
                self.workers.stopping = True
            self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests up to the deadline, then shut everything down."""
        ctx = self.ctx
        ctx.draining = True
        if self.nginx is not None:   # nginx drains first: the lines it logs meanwhile are still counted
            await self.nginx.stop(self.config.proxy.drain_timeout_s)
        self._close_proxy()
        grpc_stop = (asyncio.ensure_future(self.grpc_proxy.stop(self.config.proxy.drain_timeout_s))
                     if self.grpc_proxy is not None else None)
        workers_stop = (asyncio.ensure_future(self.workers.stop(self.config.proxy.drain_timeout_s))
                        if self.workers is not None else None)
        for conn in list(ctx.connections):
            if conn.idle():
                conn._close_transport()   # answers still leaving our buffer count as their status
        deadline = time.monotonic() + self.config.proxy.drain_timeout_s
        while ctx.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if ctx.connections:
            log.warning("drain deadline passed with %d connection(s) open; closing them", len(ctx.connections))
            for conn in list(ctx.connections):
                conn.cut("drain_timeout", f"in flight when the drain deadline "
                                          f"({self.config.proxy.drain_timeout_s} s) passed", unanswered="502")
        if grpc_stop is not None:
            await grpc_stop   # drains gRPC calls in flight over the same deadline
        if workers_stop is not None:
            await workers_stop   # every proxy worker drains over the same deadline
        if self.canaries:   # joined off the event loop: /healthz and /readyz keep answering meanwhile
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(None, c.stop, 5.0) for c in self.canaries))
        self.pool.close()
        for t in self._tasks:
            t.cancel()
        self.admin_server.close()
        if self.access_log is not None:
            self.access_log.close()   # the lines nginx wrote as it stopped are counted first
        await self.analysis.stop()
        if self.tracer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tracer.shutdown_within, TRACER_SHUTDOWN_S)

    # --- collectors -----------------------------------------------------------------
    def _add_gpu_collector(self) -> None:
        try:
            from sentinel.gpu.collector import build_collector
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("sentinel.gpu"):
                log.debug("no GPU collector module yet; GPU metrics off")
                return
            raise
        try:
            collector = build_collector(self.config.gpu, self.config.models, self._registry_entries())
        except Exception as exc:  # a broken collector must not stop the proxy
            log.warning("GPU collector not started: %s", exc)
            return
        if collector is not None:
            self.gpu_collector = collector
            self.metrics.add_collector(collector)

    def _registry_entries(self) -> dict[str, Any]:
        """Registry entries of the served models (for the GPU headroom estimate); missing ones are skipped."""
        from sentinel.errors import SentinelError
        from sentinel.registry import Registry

        reg = Registry(self.config.resolve(self.config.registry), default_model=self.config.default_model)
        out: dict[str, Any] = {}
        for m in self.config.models:
            try:
                out[m.name] = reg.resolve(f"{m.name}:{m.version}")
            except SentinelError as exc:
                log.info("no registry entry for %s:%s (%s); no GPU headroom estimate for it", m.name, m.version, exc)
        return out

    def _export_model_sizes(self) -> None:
        """`sentinel_model_size_bytes` per model from its registry entry's weights file (none when absent)."""
        from prometheus_client import Gauge

        from sentinel import metricnames as mn

        sizes = {}
        for name, entry in self._registry_entries().items():
            try:
                sizes[name] = entry.weights_path.stat().st_size
            except (OSError, AttributeError) as exc:
                log.info("%s: no model size: %s", name, exc)
        if sizes:
            gauge = Gauge(mn.MODEL_SIZE.name, mn.MODEL_SIZE.help, mn.MODEL_SIZE.labels, registry=self.metrics.registry)
            for name, size in sizes.items():
                gauge.labels(name).set(size)

    def _start_canaries(self) -> None:
        """Golden replay every `replay.canary_interval_s` against each model server (0 turns it off).

        Canary requests go straight to the model's endpoint with `X-Sentinel-Canary: 1`, in a
        thread of their own; their results land on this registry. A model without a usable
        golden set gets no canary, and says why in the log and /status.
        """
        if self.config.replay.canary_interval_s <= 0:
            return
        from sentinel.errors import SentinelError
        from sentinel.replay.canary import Canary

        for m in self.config.models:
            try:
                canary = Canary.from_config(self.config, m.name, self.metrics.registry)
            except (SentinelError, OSError, ValueError) as exc:
                log.warning("no canary for %s:%s: %s", m.name, m.version, exc)
                self.canary_problems[m.name] = str(exc)
                continue
            canary.start()
            self.canaries.append(canary)

    def add_collector(self, collector: Any) -> None:
        """Expose another collector (an object with `collect()`) on /metrics."""
        self.metrics.add_collector(collector)

    # --- admin ----------------------------------------------------------------------
    async def _admin(self, req: Request) -> Response:
        path = req.path.split("?", 1)[0]
        if path == "/ingest":
            if req.method != "POST":
                return 405, JSON, b'{"error":"POST CloudEvents here"}'
            denied = ingest_denied(req, self.ingest_token)
            if denied is not None:
                self.metrics.ingest_events.labels("rejected").inc()
                self.ctx.fail("ingest_unauthorized", denied)
                return 403, JSON, json.dumps({"error": denied}).encode()
            return self._ingest(req)
        if req.method not in ("GET", "HEAD"):
            return 405, JSON, b'{"error":"method not allowed"}'
        if path == "/metrics":
            # Off the event loop: a collector (NVML) may take up to its scrape budget.
            body, ctype = await self.loop.run_in_executor(
                None, self.metrics.exposition, req.headers.get("accept", ""))
            return 200, ctype.encode(), body
        if path == "/healthz":
            return 200, JSON, b'{"status":"ok"}'
        if path == "/readyz":
            ok, why = await self._upstream_ready()
            doc = {"ready": ok, "config": self.config.source, "upstream": why}
            if self.config.grpc_upstream is not None:
                gok, gwhy = await self._grpc_upstream_ready()
                doc["ready"] = ok = ok and gok
                doc["grpc_upstream"] = gwhy
            if self.workers is not None:
                wok, doc["proxy_workers"] = self.workers.readiness()
                doc["ready"] = ok = ok and wok
            if self.nginx is not None:
                nok = self.nginx.running
                doc["nginx"] = "running" if nok else "down (restarting)"
                doc["ready"] = ok = ok and nok
            if self.ctx.draining:   # SIGTERM: the proxy listener is closed; send no more traffic here
                doc["ready"] = ok = False
                doc["draining"] = True
            body = json.dumps(doc).encode()
            return (200 if ok else 503), JSON, body
        if path == "/status":
            return 200, JSON, json.dumps(self.status(), default=str).encode()
        return 404, JSON, b'{"error":"not found; try /metrics, /healthz, /readyz, /status, /ingest"}'

    async def _upstream_ready(self) -> tuple[bool, str]:
        at, ok, why = self._ready
        if time.monotonic() - at < READY_CACHE_S:
            return ok, why
        try:
            async with asyncio.timeout(self.config.proxy.connect_timeout_s):
                _, w = await asyncio.open_connection(self.up_host, self.up_port)
            w.close()
            ok, why = True, f"{self.up_host}:{self.up_port} reachable"
        except (TimeoutError, OSError) as exc:
            ok, why = False, f"{self.up_host}:{self.up_port} unreachable: {exc or 'timeout'}"
        self._ready = (time.monotonic(), ok, why)
        return ok, why

    async def _grpc_upstream_ready(self) -> tuple[bool, str]:
        """Whether the model server's gRPC port accepts connections (cached like the HTTP check)."""
        at, ok, why = getattr(self, "_grpc_ready", (0.0, False, "not checked"))
        if time.monotonic() - at < READY_CACHE_S:
            return ok, why
        addr = self.config.grpc_upstream
        assert addr is not None
        host, port = parse_hostport(addr)
        try:
            async with asyncio.timeout(self.config.proxy.connect_timeout_s):
                _, w = await asyncio.open_connection(host, port)
            w.close()
            ok, why = True, f"{addr} reachable"
        except (TimeoutError, OSError) as exc:
            ok, why = False, f"{addr} unreachable: {exc or 'timeout'}"
        self._grpc_ready = (time.monotonic(), ok, why)
        return ok, why

    def status(self) -> dict:
        """What /status shows: models seen, sampling and queue state, last analysis results."""
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "listen": "{}:{}".format(*self.proxy_address), "upstream": self.config.upstream,
            "grpc_listen": "{}:{}".format(*self.grpc_address) if self.grpc_address else None,
            "grpc_upstream": self.config.grpc_upstream,
            "draining": self.ctx.draining,
            "inflight": self.metrics.inflight_count + (self.metrics.remote_inflight()
                                                       if self.metrics.remote_inflight else 0),
            "models_seen": self.metrics.models_seen(),
            "sampling": {m.name: self.samplers[m.path_name][1].state() for m in self.config.models},
            "analysis": self.analysis.state(),
            "last_results": self.analysis.statuses,
            "ingest_pending": len(self.join),
            "canary": {
                **{c.model: c.status() for c in self.canaries},
                **{name: f"off: {why}" for name, why in self.canary_problems.items()},
            },
            "gpu": self.gpu_collector.status() if self.gpu_collector is not None else {"collector": "off"},
            "proxy_workers": self.workers.state() if self.workers is not None else [],
            "engine": self.config.proxy.engine,
            **({"nginx": self.nginx.state() | self.access_log.state()} if self.nginx is not None else {}),
        }

    def _ingest(self, req: Request) -> Response:
        return ingest.handle(req.headers, req.body, join=self.join,
                             count=lambda outcome, n: self.metrics.ingest_events.labels(outcome).inc(n),
                             route=self._model_for_service, submit=self.analysis.submit,
                             known_models=", ".join(m.name for m in self.config.models), canary=self._canary_body)

    def _canary_body(self, model: str, body: bytes) -> bool:
        """Whether `body` is a request this sidecar's canary sends to `model` (then /ingest drops it)."""
        return any(c.sends(body) for c in self.canaries if c.model == model)

    def _model_for_service(self, service: str) -> tuple[str, Sampler] | None:
        s = self.samplers.get(service)
        if s is not None:
            return s
        if len(self.config.models) == 1:
            # One model behind this sidecar: an InferenceService named differently is still it.
            m = self.config.model()
            return self.samplers[m.name]
        # Several: an unknown service is refused naming the known models. `default_model` (the
        # model commands use when none is named) used to take it, so another service's payloads
        # fed that model's drift windows and accuracy estimate.
        return None

    async def _expire_ingest(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            n = self.join.expire(time.monotonic())
            if n:
                self.metrics.ingest_events.labels("orphaned").inc(n)


async def serve(config: Config, *, monitor_factory: str = worker.DEFAULT_FACTORY) -> None:
    """Run until SIGTERM/SIGINT/SIGHUP, then drain and return (a closed terminal's SIGHUP ended the
    process at once, dropping the requests in flight)."""
    sc = Sidecar(config, monitor_factory=monitor_factory)
    await sc.start()
    gc.freeze()   # what start-up built lives as long as the process: keep it out of the collector's scans
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, sc.request_stop)
    await sc.wait_stopped()


def run(config: Config, *, monitor_factory: str = worker.DEFAULT_FACTORY) -> None:
    """Blocking entry point for `sentinel run`: uvloop where available."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(config, monitor_factory=monitor_factory))
