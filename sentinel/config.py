"""The daemon's configuration: one YAML file parsed once into frozen, validated values.

`load_config(path)` is the only place a config file is read; everything else takes
the resulting `Config` (or a part of it) as an argument. Relative paths in the file
are resolved against the file's directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from sentinel.protocols.names import WireProtocol
from sentinel.schema import SECRET, load_file

DetectorName = Literal["bbsd", "label", "confidence", "input_stats", "embedding", "mmd", "consistency"]


def parse_hostport(value: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:8080`); raises ValueError naming the problem (an empty
    host too: `:8080` does not mean every interface)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_s = rest.lstrip(":")
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, got {value!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port must be a number in {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    if not host:
        # `:8080` used to bind every interface: an address left out must not open a listener to
        # the network (README: listeners bind where the config says, never 0.0.0.0 by default)
        raise ValueError(f"no host in {value!r}: a host is required (for a listener, 127.0.0.1:{port} "
                         f"for this machine only or 0.0.0.0:{port} for every interface)")
    return host, port


def _check_addr(value: str) -> str | None:
    try:
        parse_hostport(value)
    except ValueError as exc:
        return str(exc)
    return None


def _check_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port   # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        return f"expected an http(s) URL, got {value!r} ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http(s) URL, got {value!r}"
    return None


def _nonfinite(obj: object, prefix: str):
    """(field path, problem) for every NaN or infinite float in `obj` and the dataclasses it holds.

    `x <= 0` is False for NaN, so range checks let it through, and a NaN or infinite timeout
    breaks the daemon at run time (a NaN `proxy.drain_timeout_s` dropped every in-flight
    request on SIGTERM; an infinite one crashed the stop of `proxy.workers`). A field its own
    `validate()` already reported is not reported twice.
    """
    if obj is None or not dataclasses.is_dataclass(obj):
        return
    try:
        own = getattr(obj, "validate", None)
        flagged = {name for name, _ in own()} if callable(own) else set()
    except (TypeError, ValueError, AttributeError):   # a field of the wrong type, reported by the loader
        flagged = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        if f.metadata.get("secret"):
            continue   # a secret of the wrong type is reported by the loader, without its value
        if isinstance(value, float) and not math.isfinite(value):
            if f.name not in flagged:
                yield f"{prefix}{f.name}", f"must be a finite number, got {value}"
        elif dataclasses.is_dataclass(value):
            yield from _nonfinite(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _nonfinite(item, f"{prefix}{f.name}[{i}].")


@dataclass(frozen=True)
class SamplingConfig:
    """How much traffic is copied for analysis."""

    rate: float = 0.05          # fraction of requests sampled
    max_per_second: float = 50  # cap on samples per second (token bucket)
    max_bytes: int = 8 * 1024 * 1024  # bigger request or response bodies are not sampled

    def validate(self):
        if not 0.0 <= self.rate <= 1.0:
            yield "rate", f"must be between 0 and 1, got {self.rate}"
        if self.max_per_second <= 0:
            yield "max_per_second", "must be positive"
        if self.max_bytes <= 0:
            yield "max_bytes", "must be positive"


@dataclass(frozen=True)
class ModelConfig:
    """A served model sentinel watches."""

    name: str
    version: str
    endpoint: str = "http://127.0.0.1:8081"
    protocol: WireProtocol = "v2"
    served_name: str | None = None   # name in request paths when it differs from `name`
    max_batch: int = 32              # for the GPU headroom estimate
    sampling: SamplingConfig | None = None
    # Shape (without batch) and dtype of a raw application/octet-stream TorchServe body; default:
    # the registry model's raw_input (else its network input). Needed only when neither says it.
    raw_input_shape: tuple[int, ...] | None = None
    raw_input_dtype: Literal["float32", "float16", "uint8", "int64"] = "float32"
    # Largest encoded image (pixels) the analysis decodes; default max(16 Mpx, 256 × model input pixels).
    max_image_pixels: int | None = None

    def validate(self):
        if not self.name:
            yield "name", "must not be empty"
        if err := _check_url(self.endpoint):
            yield "endpoint", err
        if self.max_batch < 1:
            yield "max_batch", "must be at least 1"
        if self.raw_input_shape is not None and (not self.raw_input_shape or min(self.raw_input_shape) < 1):
            yield "raw_input_shape", "must list positive dimensions"
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            yield "max_image_pixels", "must be positive"

    @property
    def path_name(self) -> str:
        return self.served_name or self.name


@dataclass(frozen=True)
class ProxyConfig:
    upstream_timeout_s: float = 30.0
    connect_timeout_s: float = 2.0
    max_body_bytes: int = 64 * 1024 * 1024
    drain_timeout_s: float = 10.0
    max_model_labels: int = 32       # distinct model label values before folding into "other"
    upstream_pool_size: int = 64
    client_idle_timeout_s: float = 75.0  # idle keep-alive client connections are closed after this
    # Front-proxy protections (issue 12); the defaults follow nginx and Envoy's edge settings.
    # `upstream_timeout_s` above is the time from the end of the request to the upstream's
    # response head (time to first byte), not a deadline on the whole exchange.
    request_head_timeout_s: float = 10.0    # a request head must be complete this long after its first byte (408)
    body_idle_timeout_s: float = 60.0       # longest pause between two reads of a request body (408)
    upstream_idle_timeout_s: float = 60.0   # longest pause between two reads of a response body (cut, 504)
    send_timeout_s: float = 60.0            # longest a client may leave response bytes unread (cut)
    max_request_line_bytes: int = 8192      # longer request target → 414, never forwarded
    max_header_bytes: int = 65536           # longer request head (all header lines) → 431, never forwarded
    max_headers: int = 100                  # more header fields → 431
    max_connections: int = 4096             # client connections; more are answered 503 + Retry-After
    admin_max_connections: int = 128        # the admin listener's own budget
    admin_max_body_bytes: int = 0           # admin request bodies (/ingest); 0: twice the sampling cap + 64 KiB
    shed_retry_after_s: int = 1             # Retry-After of the 503 given when over the connection budget
    workers: int = 1                        # proxy processes sharing the listen port (SO_REUSEPORT); README "Multi-process mode"
    engine: str = "sentinel"                # what carries the bytes: sentinel's proxy, or nginx (README "nginx engine")
    nginx_binary: str = "nginx"             # proxy.engine nginx: the nginx executable (a name on PATH or a path)
    # proxy.engine nginx: where captured bodies are written ("auto": /dev/shm when it is a memory file
    # system with room for the captures, else $TMPDIR; or a directory, which must exist)
    capture_dir: str = "auto"

    def validate(self):
        for name in ("upstream_timeout_s", "connect_timeout_s", "drain_timeout_s", "client_idle_timeout_s",
                     "request_head_timeout_s", "body_idle_timeout_s", "upstream_idle_timeout_s", "send_timeout_s"):
            if getattr(self, name) <= 0:
                yield name, "must be positive"
        if self.max_body_bytes <= 0:
            yield "max_body_bytes", "must be positive"
        for name in ("max_request_line_bytes", "max_header_bytes", "max_headers", "max_connections",
                     "admin_max_connections"):
            if getattr(self, name) < 1:
                yield name, "must be at least 1"
        if self.max_request_line_bytes < 64:
            yield "max_request_line_bytes", "must be at least 64"
        if self.max_header_bytes < 1024:
            yield "max_header_bytes", "must be at least 1024"
        if self.admin_max_body_bytes < 0:
            yield "admin_max_body_bytes", "must be 0 (derived) or positive"
        if self.shed_retry_after_s < 0:
            yield "shed_retry_after_s", "must not be negative"
        if not 1 <= self.workers <= 64:
            yield "workers", "must be between 1 and 64"
        elif isinstance(self.max_connections, int) and 0 < self.max_connections < self.workers:
            # the cap is split over the processes, each holding at least one
            yield "max_connections", f"must be at least proxy.workers ({self.workers}): each process holds a share"
        if self.max_model_labels < 0:
            yield "max_model_labels", "must be 0 (every unknown model is 'other') or positive"
        if self.upstream_pool_size < 0:
            yield "upstream_pool_size", "must be 0 (no idle connections kept) or positive"
        if self.engine not in ("sentinel", "nginx"):
            yield "engine", f"must be 'sentinel' or 'nginx', got {self.engine!r}"
        if not self.nginx_binary.strip():
            yield "nginx_binary", "must name the nginx executable"
        if self.capture_dir != "auto" and not os.path.isdir(self.capture_dir):
            yield "capture_dir", f"must be 'auto' or an existing directory, got {self.capture_dir!r}"


@dataclass(frozen=True)
class AnalysisConfig:
    queue_size: int = 256            # bounded, lossy queue between proxy and analysis
    store_payloads: bool = False     # never keep payloads unless asked
    # /ingest from a non-loopback peer must carry this secret (header X-Sentinel-Ingest-Token or
    # Authorization: Bearer); without one, only loopback peers (the same pod) may post events.
    # A secret: left out of repr(), and a wrong value is never quoted in an error (`schema.SECRET`).
    ingest_token: str | None = field(default=None, repr=False, metadata=SECRET)
    ingest_token_file: str | None = None     # read once at start (a mounted Kubernetes Secret)
    ingest_ttl_s: float = 30.0       # CloudEvents request/response join window
    ingest_max_pending: int = 1024
    ingest_max_pending_bytes: int = 64 * 1024 * 1024  # payload bytes of unjoined halves; oldest dropped beyond
    queue_max_bytes: int = 64 * 1024 * 1024  # payload bytes waiting for analysis; more are dropped
    sample_timeout_s: float = 30.0   # wall-clock budget to decode and analyse one sample (0: none)
    heartbeat_s: float = 1.0         # an idle worker says it is alive this often
    hang_timeout_s: float = 60.0     # a worker silent this long is killed and restarted (reason "hung")
    worker_start_timeout_s: float = 300.0  # grace to start the worker and to build a model's monitor
    worker_memory_limit_bytes: int = 4 * 1024 ** 3  # worker's data-segment cap (RLIMIT_DATA); 0: none
    worker_nice: int = 0             # raise the worker's niceness by this (1-19): the proxy wins a contended core
    worker_scheduling: str = "normal"  # "batch": Linux SCHED_BATCH, the worker's wake-ups never preempt the proxy
    # Series (label sets) analysis updates may create, per configured model: in one metric, and in
    # all metrics together; updates that would create more are dropped (`series_limit`).
    max_series_per_metric: int = 2000
    max_series: int = 10000

    def validate(self):
        if self.max_series_per_metric < 1:
            yield "max_series_per_metric", "must be at least 1"
        if self.max_series < 1:
            yield "max_series", "must be at least 1"
        if not 0 <= self.worker_nice <= 19:
            yield "worker_nice", f"must be 0 (same priority as the proxy) to 19, got {self.worker_nice}"
        if self.worker_scheduling not in ("normal", "batch"):
            yield "worker_scheduling", f"must be 'normal' or 'batch', got {self.worker_scheduling!r}"
        if self.queue_size < 1:
            yield "queue_size", "must be at least 1"
        if self.queue_max_bytes < 1:
            yield "queue_max_bytes", "must be positive"
        if self.ingest_max_pending < 1:
            yield "ingest_max_pending", "must be at least 1"
        if not self.ingest_ttl_s > 0:
            yield "ingest_ttl_s", f"must be positive, got {self.ingest_ttl_s}"
        if self.ingest_max_pending_bytes < 1:
            yield "ingest_max_pending_bytes", "must be positive"
        if self.sample_timeout_s < 0:
            yield "sample_timeout_s", "must be 0 (no budget) or positive"
        if self.heartbeat_s <= 0:
            yield "heartbeat_s", "must be positive"
        if self.hang_timeout_s <= self.sample_timeout_s + self.heartbeat_s:
            yield "hang_timeout_s", (f"must exceed sample_timeout_s + heartbeat_s "
                                     f"({self.sample_timeout_s + self.heartbeat_s:g}), got {self.hang_timeout_s:g}")
        if self.worker_start_timeout_s < self.hang_timeout_s:
            yield "worker_start_timeout_s", "must be at least hang_timeout_s"
        if self.worker_memory_limit_bytes < 0:
            yield "worker_memory_limit_bytes", "must be 0 (no limit) or positive"


@dataclass(frozen=True)
class DriftConfig:
    window_size: int = 200
    evaluate_every: int = 25         # evaluate after this many new samples (25: the ATC lower bound reacts within 50)
    alpha: float = 0.05              # family-wise false-alarm level of the combined verdict
    detectors: tuple[DetectorName, ...] = ("bbsd", "label", "confidence", "input_stats", "embedding", "consistency")
    shadow: bool = True              # run the reference on sampled inputs
    shadow_max_per_second: float = 20.0
    univariate: Literal["ks", "cvm"] = "ks"   # per-feature test (sentinel.drift.Univariate)
    combination: Literal["bonferroni", "cauchy"] = "bonferroni"  # combined verdict (sentinel.drift.Combination)
    atc_score: Literal["neg_entropy", "max_confidence"] = "neg_entropy"  # ATC score (sentinel.drift.Score)
    pca_components: int = 8          # principal components of golden embeddings tested
    shadow_cache_dir: str | None = None  # the reference's ONNX export cache (default: $XDG_CACHE_HOME/sentinel/onnx, ~/.cache; a per-user temp folder without a home)
    # The combined alarm fires only when this many consecutive *disjoint* windows all alarm.
    # 1: every evaluation stands alone (false-alarm rate per window <= alpha); 2: one window
    # more of delay, and a fixed golden set's false-alarm rate drops to <= 0.002 (drift eval).
    persistence: int = 1
    # The ATC lower bound gauge is the smaller of the window's and its last N samples' bound, so a
    # sudden mismatch shows within N samples (sentinel.drift.Settings.accuracy_recent); 0: window only.
    accuracy_recent: int = 50

    def validate(self):
        if self.pca_components < 1:
            yield "pca_components", "must be at least 1"
        if self.persistence < 1:
            yield "persistence", "must be at least 1"
        if not 0 < self.alpha < 1:
            yield "alpha", f"must be between 0 and 1, got {self.alpha}"
        if self.window_size < 10:
            yield "window_size", "must be at least 10"
        if self.evaluate_every < 1:
            yield "evaluate_every", "must be at least 1"


@dataclass(frozen=True)
class ReplayConfig:
    canary_interval_s: float = 300.0  # 0 disables the canary
    canary_samples: int = 16
    canary_rate: float = 2.0          # requests per second
    canary_ready_timeout_s: float = 120.0  # longest wait for the model server's readiness before round 1
    protocol: Literal["http", "grpc"] = "http"  # canary transport; grpc goes to `grpc_upstream`

    def validate(self):
        if self.canary_interval_s < 0:
            yield "canary_interval_s", "must be 0 (off) or positive"
        if self.canary_ready_timeout_s < 0:
            yield "canary_ready_timeout_s", "must be 0 or positive"
        if self.canary_samples < 1:
            yield "canary_samples", "must be at least 1"
        if self.canary_rate <= 0:
            yield "canary_rate", "must be positive"


@dataclass(frozen=True)
class GrpcConfig:
    """Bounds of the gRPC listener (on when `grpc_listen` is set)."""

    max_message_bytes: int = 64 * 1024 * 1024  # larger request or response messages: RESOURCE_EXHAUSTED
    upstream_timeout_s: float = 30.0   # cap on an upstream call; a client's shorter deadline wins
    max_concurrent_rpcs: int = 1024    # calls in flight beyond this are shed with UNAVAILABLE (503)

    def validate(self):
        if self.max_message_bytes <= 0:
            yield "max_message_bytes", "must be positive"
        if self.upstream_timeout_s <= 0:
            yield "upstream_timeout_s", "must be positive"
        if self.max_concurrent_rpcs < 1:
            yield "max_concurrent_rpcs", "must be at least 1"


@dataclass(frozen=True)
class GpuConfig:
    enabled: Literal["auto", "on", "off"] = "auto"
    pids: tuple[int, ...] = ()
    process_names: tuple[str, ...] = ()
    cgroup: str | None = None
    scrape_budget_s: float = 0.5

    def validate(self):
        if not self.scrape_budget_s > 0:   # 0 or less: every scrape fails with budget_exceeded
            yield "scrape_budget_s", f"must be positive, got {self.scrape_budget_s}"
        for i, pid in enumerate(self.pids):
            if isinstance(pid, int) and pid < 1:
                yield f"pids[{i}]", f"must be a process id (1 or more), got {pid}"


@dataclass(frozen=True)
class TracingConfig:
    otlp_endpoint: str | None = None  # no exporter runs unless set
    service_name: str = "sentinel"

    def validate(self):
        if self.otlp_endpoint is not None and (err := _check_url(self.otlp_endpoint)):
            yield "otlp_endpoint", err


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    models: tuple[ModelConfig, ...]
    listen: str = "127.0.0.1:8080"
    upstream: str = "http://127.0.0.1:8081"
    admin: str = "127.0.0.1:9464"
    registry: str = "models"
    golden_sets: str = "golden_sets"
    slo_file: str | None = None
    default_model: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    grpc_listen: str | None = None     # gRPC listener host:port (OIP v2 over gRPC); off when unset
    grpc_upstream: str | None = None   # the model server's gRPC host:port
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    source: str = field(default="<memory>", compare=False)

    def validate(self):
        for name in ("listen", "admin"):
            if err := _check_addr(getattr(self, name)):
                yield name, err
        if err := _check_url(self.upstream):
            yield "upstream", err
        if not self.models:
            yield "models", "at least one model is required"
        for name in ("grpc_listen", "grpc_upstream"):
            value = getattr(self, name)
            if value is not None and (err := _check_addr(value)):
                yield name, err
        if self.grpc_listen is not None and self.grpc_upstream is None:
            yield "grpc_upstream", "required when grpc_listen is set (the model server's gRPC host:port)"
        if self.proxy.engine == "nginx" and not _check_addr(self.listen) and parse_hostport(self.listen)[1] == 0:
            yield "listen", "proxy.engine nginx needs a fixed port (nginx cannot report the one port 0 picks)"
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m is not None and m.name in seen:
                yield f"models[{i}].name", f"duplicate model {m.name!r}"
            if m is not None:
                seen.add(m.name)
        if self.default_model is not None and self.default_model not in seen:
            yield "default_model", f"{self.default_model!r} is not among models ({', '.join(sorted(seen))})"
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                yield from _nonfinite(value, f"{f.name}.")
        for i, m in enumerate(self.models or ()):
            yield from _nonfinite(m, f"models[{i}].")

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent if self.source != "<memory>" else Path.cwd()

    def resolve(self, p: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        path = Path(p)
        return path if path.is_absolute() else self.base_dir / path

    def model(self, name: str | None = None) -> ModelConfig:
        name = name or self.default_model or self.models[0].name
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def sampling_for(self, model: ModelConfig) -> SamplingConfig:
        return model.sampling or self.sampling

    def with_overrides(self, **kw: str | None) -> Config:
        """A copy with CLI overrides applied (None values are ignored), re-validated."""
        changes = {k: v for k, v in kw.items() if v is not None}
        new = dataclasses.replace(self, **changes)
        problems = [f"--{k}: {msg}" for k, msg in new.validate()]
        if problems:
            from sentinel.errors import ConfigError
            raise ConfigError(problems)
        return new


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem."""
    cfg = load_file(path, Config)
    return dataclasses.replace(cfg, source=str(path))
