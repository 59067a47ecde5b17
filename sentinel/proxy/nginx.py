"""`proxy.engine: nginx`: nginx carries the bytes; sentinel counts from its access log and samples a share.

The Python proxy costs about twice nginx's CPU per small request and reaches a third of its
throughput (benchmarks/proxy.md). Where that matters, the sidecar can leave the request path
to nginx and keep everything else:

    client ──► nginx (proxy.listen) ──┬── (1 - share) ──────────────► model server
                  │                   └── share ──► sentinel proxy ──► model server
                  │                                  (internal, loopback; samples for analysis)
                  └─ one access-log line per request, syslog over UDP on loopback ──► AccessLog
                                                   (requests_total, request_duration_seconds)

- **Counting.** nginx logs every request once it is over, with what the client got: the status,
  `$request_completion` (whether the whole answer went out) and 499 when the client left
  first. `classify` maps that onto sentinel's codes (`incomplete` for an answer whose head went
  out and whose body did not). Canary traffic (`X-Sentinel-Canary: 1`) is not counted, as in
  the Python proxy. The lines arrive over UDP, so a burst larger than the socket's receive
  buffer loses lines: the kernel counts each one it drops (`SO_RXQ_OVFL`) and sentinel exports
  the count (`sentinel_access_log_lost_total`), so an undercount is never silent.
- **Sampling.** `split_clients` on nginx's per-request random id sends the largest configured
  sampling rate's share of requests through sentinel's own proxy on a loopback port, which
  samples every one of them (per model: its rate over that share) within the usual caps and
  counts nothing (nginx's line counts it). If the internal proxy is down, nginx sends the
  request straight to the model server (`backup`): sentinel is never the reason a request fails.
- **Limits and timeouts** are sentinel's, written into nginx's configuration (`render_conf`):
  head and body timeouts, the upstream timeouts, send timeout, keep-alive, body, request-line
  and head sizes, the connection budget (503 + Retry-After), the drain deadline on stop.
- **Process.** sentinel writes the configuration to a private directory, checks it with
  `nginx -t`, runs nginx in the foreground as its child, logs its error lines, restarts it if it
  dies (counted, with backoff) and stops it gracefully (SIGQUIT, `worker_shutdown_timeout`).

gRPC stays on sentinel's gRPC listener. nginx's `$request_time` has millisecond resolution.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from typing import Any

from sentinel import metricnames as mn
from sentinel.config import Config, parse_hostport
from sentinel.errors import InfrastructureError
from sentinel.protocols import names
from sentinel.protocols.routes import match
from sentinel.proxy.metrics import NO_MODEL, OVERFLOW_MODEL, ProxyMetrics, _make

log = logging.getLogger("sentinel.nginx")

SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)   # Linux: datagrams dropped, as ancillary data
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RECV_BUFFER = 16 << 20        # the log socket's receive buffer (root may force it past rmem_max)
MAX_LINE = 16384              # a log line longer than this is truncated by the kernel: counted malformed
POLL_S = 0.02                 # drain the log socket this often...
BUSY_POLL_S = 0.002           # ...and this often after a drain that found this many lines:
BUSY_LINES = 256
ROUTE_CACHE = 4096
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
START_TIMEOUT_S = 10.0

_CANARY_VAR = "$http_" + names.CANARY_HEADER.lower().replace("-", "_")
# Space-separated; the request target last (it is the one field a client shapes freely, and nginx
# escapes '"', '\\' and bytes outside 0x20-0x7e in it as \xHH, so it never holds a newline).
LOG_FORMAT = ("$status $request_completion $request_time $sentinel_trace_id $sentinel_trace_flags "
              f"{_CANARY_VAR} $request_method $request_uri")
_TP = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class AccessLog:
    """The log socket's reader: each line counted as sentinel's Python proxy counts an exchange."""

    def __init__(self, metrics: ProxyMetrics, *, host: str = "127.0.0.1"):
        self.metrics = metrics
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, 0))
            self.sock.setblocking(False)
            try:   # past net.core.rmem_max where permitted (root, CAP_NET_ADMIN)
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECV_BUFFER)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        except BaseException:
            self.sock.close()
            raise
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.lines = 0            # lines counted
        self.skipped = 0          # canary lines (not counted, as in the Python proxy)
        self.malformed = 0        # lines that are not ours or did not parse
        self.dropped = 0          # datagrams the kernel dropped (SO_RXQ_OVFL), as last reported
        self._routes: dict[bytes, tuple[str, str]] = {}
        self._lost = _make(mn.ACCESS_LOG_LOST, metrics.registry)
        self._task: asyncio.Task | None = None
        self.last_line_at = 0.0

    # --- parsing ------------------------------------------------------------------
    def feed(self, datagram: bytes) -> None:
        """Count one syslog datagram (`<PRI>TIMESTAMP TAG: LINE`)."""
        start = datagram.find(b"sentinel: ")
        if start < 0:
            self.malformed += 1
            return
        parts = datagram[start + 10:].rstrip(b"\n").split(b" ", 7)
        if len(parts) != 8:
            self.malformed += 1
            return
        status, done, seconds, trace_id, flags, canary, _method, target = parts
        if canary == b"1":
            self.skipped += 1
            return
        try:
            took = float(seconds)
        except ValueError:
            self.malformed += 1
            return
        code = classify(status, done)
        route = self._routes.get(target)
        if route is None:
            route = self._route(target)
        self.metrics.observe_request(route[1], route[0], code, took,
                                     trace_id.decode() if flags == b"01" else None)
        self.lines += 1

    def _route(self, target: bytes) -> tuple[str, str]:
        r = match(target.decode("latin-1"))
        if r is None:
            route = ("other", NO_MODEL)
        else:
            label = self.metrics.model_label(r.model)
            route = (r.protocol, label)
            if label == OVERFLOW_MODEL:
                return route
        if len(self._routes) >= ROUTE_CACHE:
            self._routes.clear()
        self._routes[target] = route
        return route

    # --- reading ------------------------------------------------------------------
    def drain(self) -> int:
        """Read every datagram waiting; returns how many."""
        n = 0
        recvmsg, feed = self.sock.recvmsg, self.feed
        anc = socket.CMSG_SPACE(4)
        last: list = []
        while True:
            try:
                data, last, _flags, _addr = recvmsg(MAX_LINE, anc)
            except (BlockingIOError, InterruptedError):
                break
            feed(data)
            n += 1
        for level, kind, value in last:
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                total = struct.unpack("=I", value[:4])[0]
                if total > self.dropped:
                    self._lost.inc(total - self.dropped)
                    log.warning("the kernel dropped %d access-log line(s) (%d in all): those requests are not "
                                "in sentinel_requests_total; counted in %s", total - self.dropped, total,
                                mn.ACCESS_LOG_LOST.sample_name)
                    self.dropped = total
        if n:
            self.last_line_at = time.monotonic()
        return n

    async def run(self) -> None:
        while True:
            try:
                n = self.drain()
            except Exception:   # a bug here must not stop counting for good
                log.exception("reading nginx's access log failed")
                n = 0
            await asyncio.sleep(BUSY_POLL_S if n >= BUSY_LINES else POLL_S)

    def state(self) -> dict:
        return {"log_lines": self.lines, "log_lines_canary": self.skipped, "log_lines_malformed": self.malformed,
                "log_lines_lost": self.dropped}

    def close(self) -> None:
        try:
            self.drain()   # what nginx logged before it stopped
        except OSError:
            pass
        self.sock.close()


def classify(status: bytes, completion: bytes) -> str:
    """Sentinel's code label for what the client got, from nginx's `$status` and `$request_completion`."""
    if status == b"499":
        return mn.CODE_CLIENT_CLOSED
    if completion == b"OK":
        return status.decode()
    # the answer's head went out (nginx logs its status) and the rest did not: cut by the upstream,
    # a timeout or a client that stopped reading. A 4xx/5xx nginx made itself on a request it gave
    # up reading (408, 413, 400) is whole when sent and logged with OK... unless the client left.
    return mn.CODE_INCOMPLETE


class LaneMetrics:
    """ProxyMetrics for sentinel's proxy behind nginx: everything but the request count (nginx's log has it)."""

    def __init__(self, metrics: ProxyMetrics):
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metrics, name)

    def observe_request(self, model: str, protocol: str, code: str, seconds: float, trace_id: str | None) -> None:
        pass


# --- configuration ---------------------------------------------------------------

def lane_config(config: Config) -> Config:
    """`config` with each sampling rate divided by the share nginx sends through sentinel's proxy."""
    share = sample_share(config)

    def scaled(sc: Any) -> Any:
        return dataclasses.replace(sc, rate=min(1.0, sc.rate / share) if share > 0 else 0.0)
    models = [dataclasses.replace(m, sampling=scaled(m.sampling)) if m.sampling is not None else m
              for m in config.models]
    return dataclasses.replace(config, sampling=scaled(config.sampling), models=models)


def sample_share(config: Config) -> float:
    """The share of requests routed through sentinel's proxy: the largest sampling rate configured."""
    rates = [config.sampling.rate] + [config.sampling_for(m).rate for m in config.models]
    return max(rates) if config.models else config.sampling.rate


def _secs(x: float) -> str:
    return f"{max(1, math.ceil(x * 1000))}ms"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_conf(config: Config, *, upstream: tuple[str, int], lane: tuple[str, int], log_to: tuple[str, int],
                run_dir: str) -> str:
    """nginx's configuration for `config` (see the module docstring)."""
    p = config.proxy
    model = _hostport(*upstream)
    listen = _hostport(*parse_hostport(config.listen))
    share = sample_share(config)
    if share >= 1.0:
        split = "    * lane;"
    elif share <= 0.0:
        split = "    * model;"
    else:
        pct = f"{share * 100:.4f}".rstrip("0").rstrip(".")
        split = f"    {pct}% lane;\n    * model;"
    # a request line must fit one buffer; the whole head, the buffers together (nginx has no field count)
    buf = max(1024, p.max_request_line_bytes)
    nbuf = max(2, math.ceil(p.max_header_bytes / buf))
    worker_conns = 2 * p.max_connections + p.upstream_pool_size + 64   # clients and their upstream connections
    d = run_dir
    return f"""# generated by sentinel (proxy.engine: nginx) from {config.source}; rewritten at every start
worker_processes {p.workers};
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
worker_shutdown_timeout {_secs(p.drain_timeout_s)};
events {{ worker_connections {worker_conns}; }}
http {{
  access_log off;
  server_tokens off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  log_format sentinel '{LOG_FORMAT}';

  # limits and timeouts: sentinel's proxy section
  client_max_body_size {p.max_body_bytes};
  client_body_buffer_size 64k;
  client_header_buffer_size 1k;
  large_client_header_buffers {nbuf} {buf};
  client_header_timeout {_secs(p.request_head_timeout_s)};
  client_body_timeout {_secs(p.body_idle_timeout_s)};
  send_timeout {_secs(p.send_timeout_s)};
  keepalive_timeout {_secs(p.client_idle_timeout_s)};
  keepalive_requests 100000;
  reset_timedout_connection on;
  limit_conn_zone $server_port zone=sentinel_clients:1m;
  limit_conn_status 503;

  upstream model {{
    server {model};
    keepalive {max(1, p.upstream_pool_size)};
  }}
  upstream lane {{
    server {_hostport(*lane)} max_fails=1 fail_timeout=2s;
    server {model} backup;
    keepalive 32;
  }}
  split_clients "$request_id" $sentinel_pool {{
{split}
  }}
  # trace context: the caller's trace continues with a new span id; otherwise a new trace
  map $request_id $sentinel_span {{ "~^(?<s>[0-9a-f]{{16}})" $s; default 0000000000000001; }}
  map $http_traceparent $sentinel_trace_id {{
    "~^00-(?<t>[0-9a-f]{{32}})-[0-9a-f]{{16}}-[0-9a-f]{{2}}$" $t;
    default $request_id;
  }}
  map $http_traceparent $sentinel_trace_flags {{
    "~^00-[0-9a-f]{{32}}-[0-9a-f]{{16}}-(?<f>[0-9a-f]{{2}})$" $f;
    default 01;
  }}
  map $http_traceparent $sentinel_tracestate {{
    "~^00-[0-9a-f]{{32}}-[0-9a-f]{{16}}-[0-9a-f]{{2}}$" $http_tracestate;
    default "";
  }}

  server {{
    listen {listen} backlog=2048;
    access_log syslog:server={log_to[0]}:{log_to[1]},nohostname,tag=sentinel sentinel;
    limit_conn sentinel_clients {p.max_connections};
    error_page 503 = @shed;
    location @shed {{
      add_header Retry-After {p.shed_retry_after_s} always;
      return 503 "over the limit of {p.max_connections} connections; retry later\\n";
    }}
    location / {{
      proxy_pass http://$sentinel_pool;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header traceparent "00-$sentinel_trace_id-$sentinel_span-$sentinel_trace_flags";
      proxy_set_header tracestate $sentinel_tracestate;
      proxy_request_buffering off;
      proxy_max_temp_file_size 0;
      proxy_connect_timeout {_secs(min(p.connect_timeout_s, 75.0))};
      proxy_read_timeout {_secs(max(p.upstream_timeout_s, p.upstream_idle_timeout_s))};
      proxy_send_timeout {_secs(p.body_idle_timeout_s)};
      proxy_next_upstream error;
      proxy_intercept_errors off;
    }}
  }}
}}
"""


# --- the process -------------------------------------------------------------------

class Nginx:
    """nginx as sentinel's child: checked, started, restarted when it dies, stopped gracefully."""

    def __init__(self, config: Config, binary: str, on_restart: Any = None):
        self.config = config
        self.share = sample_share(config)
        self.binary = shutil.which(binary) or binary
        self.run_dir = tempfile.mkdtemp(prefix="sentinel-nginx-")
        os.chmod(self.run_dir, 0o755)   # workers drop to an unprivileged user when sentinel runs as root
        self.conf = os.path.join(self.run_dir, "nginx.conf")
        self.conf_text = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.restarts = 0
        self.on_restart = on_restart
        self._tasks: list[asyncio.Task] = []
        self.last_error = ""

    def write_and_check(self, text: str) -> None:
        """Write the configuration and have nginx check it (`nginx -t`): InfrastructureError with its words."""
        self.conf_text = text
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write(self.conf_text)
        if not os.path.exists(self.binary) and shutil.which(self.binary) is None:
            raise InfrastructureError(f"proxy.engine is nginx ({self.config.source}) and '{self.binary}' was not found: "
                                      "install nginx (Debian: apt-get install nginx-light) or set proxy.nginx_binary")
        r = subprocess.run([self.binary, "-t", "-q", "-c", self.conf, "-p", self.run_dir, "-e", "stderr"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise InfrastructureError(f"nginx refused the configuration sentinel wrote for {self.config.source} "
                                      f"({self.conf}): {r.stderr.strip() or r.stdout.strip()}")

    async def start(self, ready: Any) -> None:
        """Start nginx and wait until `ready()` (its listener answers) or it exits (an error)."""
        await self._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not await ready():
            assert self.proc is not None
            if self.proc.returncode is not None or time.monotonic() > deadline:
                await self._kill()
                why = self.last_error or f"exit status {self.proc.returncode}"
                raise InfrastructureError(f"nginx did not start listening on {self.config.listen} "
                                          f"({self.config.source}: listen): {why}")
            await asyncio.sleep(0.02)
        self._tasks.append(asyncio.get_running_loop().create_task(self._supervise()))

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "-c", self.conf, "-p", self.run_dir, "-e", "stderr",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)   # a Ctrl-C at the terminal reaches sentinel, which stops nginx itself
        self._tasks.append(asyncio.get_running_loop().create_task(self._relay_errors(self.proc)))

    async def _relay_errors(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            line = await proc.stderr.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.last_error = text[:500]
            level = logging.ERROR if "[emerg]" in text or "[alert]" in text or "[crit]" in text else logging.WARNING
            log.log(level, "nginx: %s", text)

    async def _supervise(self) -> None:
        tries = 0
        while True:
            assert self.proc is not None
            rc = await self.proc.wait()
            if self.stopping:
                return
            self.restarts += 1
            delay = RESTART_BACKOFF_S[min(tries, len(RESTART_BACKOFF_S) - 1)]
            log.error("nginx exited (status %s, %s); restarting in %.1f s (restart %d)", rc,
                      self.last_error or "no message", delay, self.restarts)
            if self.on_restart is not None:
                self.on_restart()
            await asyncio.sleep(delay)
            if self.stopping:
                return
            started = time.monotonic()
            try:
                await self._spawn()
            except OSError as exc:
                log.error("cannot start nginx again: %s", exc)
                tries += 1
                continue
            await asyncio.sleep(0)
            tries = 0 if time.monotonic() - started > 60 else tries + 1

    def state(self) -> dict:
        return {"pid": self.proc.pid if self.proc is not None else None, "running": self.running,
                "restarts": self.restarts, "config": self.conf, "sampled_share": self.share,
                "last_error": self.last_error or None}

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, drain_s: float) -> None:
        """SIGQUIT: nginx stops accepting and finishes what it serves (worker_shutdown_timeout), then exits."""
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                proc.send_signal(signal.SIGQUIT)
                await asyncio.wait_for(proc.wait(), drain_s + 5.0)
            except ProcessLookupError:
                pass
            except TimeoutError:
                await self._kill()
        for t in self._tasks:
            t.cancel()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # its workers too
        except ProcessLookupError:
            pass
        await proc.wait()
