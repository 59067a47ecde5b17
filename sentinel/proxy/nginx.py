"""`proxy.engine: nginx`: nginx carries the bytes; sentinel counts from its access log and samples captures.

The Python proxy costs about twice nginx's CPU per small request and reaches a third of its
throughput (benchmarks/proxy.md). Where that matters, the sidecar can leave the request path
to nginx and keep everything else:

    client ──► nginx (proxy.listen) ────────────────────────────────► model server
                  │  the sampled share: request body and whole 200 answer left as files
                  │  in sentinel's capture folder ──► CaptureFiles ──► analysis
                  └─ one access-log line per request, syslog over UDP on loopback ──► AccessLog
                                                   (requests_total, request_duration_seconds)

- **Counting.** nginx logs every request once it is over; `classify` turns what the line says
  into the code of what the client got. nginx's own `$request_completion` is not enough: an
  answer the upstream cut after its head (closed, reset, timed out) is logged complete, with
  its status. So each line also carries the bytes nginx wrote, the body bytes against the
  `Content-Length` it sent, and the connection number, and nginx's error lines come over the
  same socket: an error while nginx relays the upstream's body marks that connection's answer
  as cut (a chunked answer has no length to compare). The codes:

    | nginx logs                                              | counted      |
    |---------------------------------------------------------|--------------|
    | 499 (the client left before the head went out)          | 499          |
    | nothing written, 408 (head or body timeout: nginx never | 408          |
    |   sends its 408, it closes the connection)              |              |
    | nothing written, another status (the client closed or   | 499          |
    |   reset the connection mid-request: nginx logs 400)     |              |
    | head written, answer not finished (the client left,     | incomplete   |
    |   send_timeout on a client that stopped reading)        |              |
    | "complete", but fewer body bytes than Content-Length,   | incomplete   |
    |   or an error while reading the upstream's body         |              |
    | complete                                                | its status   |

  Where this differs from the Python proxy: a head timeout counts 408 there too, but nginx
  sends no answer, and counts it under the route of the request line when it had one (the
  Python proxy: model `none`); a head over the limits is nginx's 400 (the Python proxy's 431);
  a client that leaves mid-answer counts `incomplete` (nginx cannot tell it from a send
  timeout; the Python proxy: 499); a client that half-closes its side before the answer is
  gone for nginx (499; the Python proxy answers it); and an answer that fits the kernel's
  socket buffers counts as sent when nginx handed it over, read by the client or not.
  Canary traffic (`X-Sentinel-Canary: 1`) is not counted, as in the Python proxy. The lines
  arrive over UDP, so a burst larger than the socket's receive buffer loses lines: the
  kernel counts each one it drops (read with `SO_MEMINFO` at every drain, `SO_RXQ_OVFL` as a
  fallback) and sentinel exports the count (`sentinel_access_log_lost_total`), so an
  undercount is never silent. Only lines under this run's syslog tag (random, in a
  configuration file only sentinel's user can read) from a loopback address are counted:
  another process on the pod's loopback cannot add requests.
- **Sampling.** No request goes through sentinel. `split_clients` on nginx's per-request random
  id picks the largest configured sampling rate's share of requests whose `Content-Length` fits
  the largest sampling byte cap (a chunked request is never captured), at most as many per
  second as the sampling caps take (`limit_req`; past it a request is simply not captured).
  nginx keeps a captured request's body in a file (`client_body_in_file_only`), reads the
  answer into its buffers and stores a whole 200 answer in a file (`proxy_store`), and logs the
  request under the tag TAG_cap with both files' names and the headers decoders read.
  `CaptureFiles` applies each model's sampler to the line (its rate over the captured share, its
  caps), hands what is sampled to analysis, and deletes both files in every case. Capturing
  costs a captured request two small file writes in nginx, not a trip through Python: the
  sampled share's added latency stays near nginx's own (benchmarks/proxy.md). A captured answer
  is buffered by nginx (it still flows to the client as nginx reads it, but a slowly streamed
  answer may arrive in larger pieces). nginx answers 500 when it cannot write a body, so
  captures are paused before that can happen: a watchdog thread reloads nginx without captures
  while sentinel's event loop is stalled (it would take no files) or the capture folder's file
  system has less free than two seconds of captures at their cap (64 MiB to 1 GiB), and back
  once both are over. The capture folders are on /dev/shm when it is a memory file system with
  room (`capture_base`; a capture on disk costs about twice), else in the run directory. The
  same thread deletes files whose lines never came
  (lost lines, a crash) once untouched for CAPTURE_TTL_S (or twice the longest timeout).
- **Limits and timeouts** are sentinel's, written into nginx's configuration (`render_conf`):
  head and body timeouts, the upstream timeouts, send timeout, keep-alive, body, request-line
  and head sizes, the connection budget (503 + Retry-After; nginx's `limit_conn` counts
  connections with a request in progress and takes at most 65535: a larger budget is left to
  `worker_connections`), the drain deadline on stop (`worker_shutdown_timeout`), a refused
  body's lingering read (the Python proxy's 2 s).
  nginx has one upstream read timeout for the response head and for pauses in its body: it
  gets the larger of `upstream_timeout_s` and `upstream_idle_timeout_s`. Answers are not buffered (a
  captured one aside, above; `proxy_buffering off`): what the model server sends reaches the client as it comes, as
  through the Python proxy (a token stream is not held back until a buffer fills).
- **Process.** sentinel writes the configuration to a private directory, checks it with
  `nginx -t`, runs nginx in the foreground as its child (in a process group of its own, told to
  stop gracefully when sentinel dies: `setpriv --pdeathsig`, where util-linux has it),
  logs its error lines, restarts it if it dies (counted, with backoff; workers its master
  left behind are killed first, or they would hold the port) and stops it gracefully
  (SIGQUIT, `worker_shutdown_timeout`). nginx is "running" (ready) once the process is up
  and has written its pid file, which it does after binding `listen`.

gRPC stays on sentinel's gRPC listener. nginx's `$request_time` has millisecond resolution.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from typing import Any, NamedTuple

from prometheus_client.samples import Exemplar

from sentinel import metricnames as mn
from sentinel.config import Config, parse_hostport
from sentinel.errors import InfrastructureError
from sentinel.protocols import names
from sentinel.proxy.metrics import ProxyMetrics, _make
from sentinel.proxy.sampling import Sample
from sentinel.proxy.server import LINGER_S, resolve_target

log = logging.getLogger("sentinel.nginx")

SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)   # Linux: datagrams dropped, as ancillary data
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)     # Linux >= 4.6: the socket's memory counters...
SK_MEMINFO_DROPS = 8                               # ...of which this one counts the datagrams dropped
RECV_BUFFER = 16 << 20        # the log socket's receive buffer (root may force it past rmem_max)
MAX_LINE = 16384              # longer datagrams are truncated by the kernel (the request target's end is lost)
POLL_S = 0.05                 # drain the log socket at least this often...
BUSY_POLL_S = 0.002           # ...and at most this often (AccessLog.run)
DATAGRAM_COST = 1280          # receive-buffer bytes one log datagram takes (its ~300 bytes and the kernel's skb)
ROUTE_CACHE = 4096
MAX_CUT_MARKS = 4096          # connections whose answer an error line marked as cut, awaiting their access line
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RESTART_RESET_S = 60.0        # a nginx that ran this long before dying restarts after the shortest backoff
START_TIMEOUT_S = 10.0
STALL_S = 2.0     # sentinel's event loop silent this long: nginx stops capturing the sampled share...
WATCH_S = 0.25    # ...as seen by a thread that looks this often (Nginx.watch)
CAPTURE_IN, CAPTURE_OUT = "capture_in", "capture_out"   # the capture folder's folders of captured bodies
CAPTURE_TTL_S = 30.0   # a captured body nobody took (its line lost) is deleted once untouched this long...
SWEEP_S = 1.0          # ...by the watchdog thread, which looks this often
RUN_PREFIX, OWNER_FILE = "sentinel-nginx-", "sentinel.pid"   # the run directory in $TMPDIR, its owner's pid
MIN_FREE_FLOOR, MAX_FREE_FLOOR = 64 << 20, 1 << 30   # the free-space floor under which captures pause (Nginx)
# why the watchdog paused captures: the metric's `reason` label → /status `capture_pause_reason`
PAUSE_REASONS = {"stalled": "event loop stalled", "disk": "disk nearly full"}
RELAY_LINES, RELAY_WINDOW_S = 20, 10.0   # nginx error lines logged at most this many per window
# util-linux's setpriv (Debian: always there) sets nginx's parent-death signal before it runs nginx:
# a sentinel killed outright left nginx serving (uncounted) and holding `listen` for the next one.
# (Not preexec_fn: forking a threaded process, only async-signal-safe work may run before exec.)
SETPRIV = shutil.which("setpriv")

_CANARY_VAR = "$http_" + names.CANARY_HEADER.lower().replace("-", "_")
# Space-separated; the request target last (it is the one field a client shapes freely, and nginx
# escapes '"', '\\' and bytes outside 0x20-0x7e in it as \xHH, so it never holds a newline). Every
# other field is nginx's number or one of sentinel's maps' values (never a space): status, done
# (1: $request_completion OK), request time, bytes written to the client, body bytes of them, the
# Content-Length sent ("-": none), connection number, trace id, trace flags (01: sampled), canary
# (1: X-Sentinel-Canary: 1), method.
LOG_FORMAT = ("$status $sentinel_done $request_time $bytes_sent $body_bytes_sent $sent_http_content_length "
              "$connection $sentinel_trace_id $sentinel_trace_flags $sentinel_canary $request_method $request_uri")
_FIELDS = LOG_FORMAT.count(" ") + 1
# A captured request's line (under the tag TAG_cap) starts with: the request body's file, the
# request id (the stored answer's file name), the Content-Length, then the headers decoders read,
# each in double quotes (nginx escapes '"' in a value as \x22, so the first '" ' ends it): the
# request's Content-Type, Inference-Header-Content-Length and Content-Encoding, then the answer's;
# then an access line as above.
CAPTURE_HEADERS = ("content-type", "inference-header-content-length", "content-encoding")
CAPTURE_FORMAT = ("$request_body_file $request_id $http_content_length "
                  + " ".join(f'"{v}"' for v in ("$content_type", "$http_inference_header_content_length",
                                                 "$http_content_encoding", "$upstream_http_content_type",
                                                 "$upstream_http_inference_header_content_length",
                                                 "$upstream_http_content_encoding")) + " ")
_BODY_FILE = re.compile(rb"^[0-9]{1,20}$")     # nginx's temporary file names (no levels)
_REQUEST_ID = re.compile(rb"^[0-9a-f]{32}$")   # nginx's $request_id
_ESCAPED = re.compile(rb"\\x([0-9A-Fa-f]{2})")
_NO_BODY = (b"204", b"304")   # and 1xx: answers without a body whatever their Content-Length says
# The actions of nginx's error lines while it relays the upstream's body (unbuffered: mostly the latter).
# What it logs there at level error is the upstream's doing (closed, reset, timed out, bad chunks);
# the client's own (a reset, a timeout) it logs at level info, which is not sent.
_CUT_ACTIONS = (b" while reading upstream", b" while sending to client")


class LogTarget(NamedTuple):
    """Where nginx sends its log lines (syslog over UDP) and under which tag."""

    host: str
    port: int
    tag: str = "sentinel"


class AccessLog:
    """The log socket's reader: each line counted as sentinel's Python proxy counts an exchange."""

    def __init__(self, metrics: ProxyMetrics, *, host: str = "127.0.0.1", captures: CaptureFiles | None = None):
        self.metrics = metrics
        self.captures = captures   # the sampled share's files; None: lines of captured requests are only counted
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
        # A tag of this run's own: a datagram without it is not nginx's (syslog tags: [A-Za-z0-9_], 32 at most)
        self.tag = f"sentinel_{secrets.token_hex(6)}"
        self.address = LogTarget(*self.sock.getsockname()[:2], self.tag)
        self._access = self.tag.encode() + b": "          # access lines: `<PRI>Mmm dd hh:mm:ss TAG: LINE`
        self._errors = self.tag.encode() + b"_err: "      # error lines, under the tag TAG_err
        self._captured = self.tag.encode() + b"_cap: "    # captured requests' lines, under the tag TAG_cap
        self.lines = 0            # lines counted
        self.skipped = 0          # canary lines (not counted, as in the Python proxy)
        self.malformed = 0        # datagrams that are not ours or did not parse
        self.dropped = 0          # datagrams the kernel dropped, as last reported
        self.cuts = 0             # error lines that marked an answer as cut by the upstream
        self._routes: dict[bytes, tuple] = {}   # request target → (protocol, model label, (name, sampler))
        self._cut: dict[bytes, None] = {}   # connection numbers (insertion-ordered: oldest dropped first)
        self._lost = _make(mn.ACCESS_LOG_LOST, metrics.registry)
        self._meminfo = True
        self.loopback = host.startswith("127.") or host == "::1"   # bound there: only this host can send
        # datagrams the receive buffer holds (the kernel reports twice what was asked: its bookkeeping)
        self.capacity = max(1, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // DATAGRAM_COST)
        self.last_line_at = 0.0
        self._bounds = [*metrics.buckets, math.inf]   # the duration histogram's buckets, +Inf last
        # a whole answer's status → its code (statuses classify() passes through as they are)
        self._codes = {b"%d" % c: str(c) for c in range(200, 600) if c not in (204, 304, 499)}

    # --- parsing ------------------------------------------------------------------
    def feed(self, datagram: bytes) -> None:
        """Count one syslog datagram (`<PRI>Mmm dd hh:mm:ss TAG: MESSAGE`, as nginx sends it)."""
        self.feed_many([datagram])

    def feed_many(self, datagrams: list[bytes]) -> None:
        """Count a batch of datagrams: lines are summed per (model, protocol, code) and added to the
        metrics once per batch, with the newest sampled trace of each histogram bucket as its exemplar."""
        access, errors = self._access, self._errors
        skip = len(access)
        batch: dict[tuple[str, str, str], list] = {}
        bounds, bisect_left = self._bounds, bisect.bisect_left
        routes, codes = self._routes, self._codes
        captures: list[list] = []
        for datagram in datagrams:
            gt = datagram.find(b">", 0, 5)
            at = gt + 17   # past '>', the 15-character timestamp and a space
            if gt < 0:
                self.malformed += 1
                continue
            capture = None
            if datagram.startswith(access, at):
                line = datagram[at + skip:]
            elif datagram.startswith(self._captured, at):
                split = _split_capture(datagram[at + len(self._captured):])
                if split is None:
                    self.malformed += 1
                    continue
                capture, line = split
                captures.append(capture)   # its files are deleted whatever the rest of its line says
            else:
                if datagram.startswith(errors, at):
                    self._error(datagram[1:gt], datagram[at + len(errors):])
                else:
                    self.malformed += 1
                continue
            parts = line.rstrip(b"\n").split(b" ", _FIELDS - 1)
            if len(parts) != _FIELDS:
                self.malformed += 1
                continue
            status, done, seconds, sent, body_sent, length, conn, trace_id, flags, canary, method, target = parts
            cut = False
            if self._cut and conn in self._cut:   # an error line said this connection's answer broke off
                del self._cut[conn]
                cut = True
            if canary == b"1":
                self.skipped += 1
                continue
            try:
                took = float(seconds)
            except ValueError:
                self.malformed += 1
                continue
            if (not 0.0 <= took < 1e9 or not sent.isdigit() or not body_sent.isdigit()
                    or not (length == b"-" or length.isdigit())):
                self.malformed += 1
                continue
            code = codes.get(status) if done == b"1" and not cut and (length == b"-" or length == body_sent) \
                and sent != b"0" else None
            if code is None:   # not the common case (a whole answer of a usual status): the full rules
                if len(status) != 3 or not status.isdigit():
                    self.malformed += 1
                    continue
                code = classify(status, done == b"1", int(sent), int(body_sent),
                                int(length) if length != b"-" else None, method == b"HEAD", cut)
            route = routes.get(target)
            if route is None:
                route = self._route(target)
            if capture is not None:
                capture += (route, code, trace_id)
            key = (route[1], route[0], code)
            sums = batch.get(key)
            if sums is None:
                sums = batch[key] = [0, 0.0, [0] * len(bounds), {}]
            i = bisect_left(bounds, took)
            sums[0] += 1
            sums[1] += took
            sums[2][i] += 1
            if flags == b"01":
                sums[3][i] = (trace_id, took)
        if batch:
            now = time.time()
            merge = self.metrics.merge_requests
            for key, (count, total, buckets, traces) in batch.items():
                exemplars = tuple((i, Exemplar({"trace_id": tid.decode("ascii", "replace")}, took, now))
                                  for i, (tid, took) in traces.items())
                merge(key, count, total, tuple(buckets), exemplars)
                self.lines += count
        if captures and self.captures is not None:
            self.captures.take(captures)

    def _error(self, pri: bytes, text: bytes) -> None:
        """An error line of nginx's: one while it relayed the upstream's body marks its connection's answer cut.

        `YYYY/MM/DD hh:mm:ss [level] PID#TID: *CONN message while ACTION, client: ...`; what
        precedes ", client: " is nginx's own words (the request line, which the client shapes,
        comes after).
        """
        if not pri.isdigit() or int(pri) & 7 > 3:   # severity: err (3) or worse
            return
        star = text.find(b": *")
        if star < 0:
            return
        conn, _, message = text[star + 3:].partition(b" ")
        if not conn.isdigit() or not message.partition(b", client: ")[0].endswith(_CUT_ACTIONS):
            return
        if len(self._cut) >= MAX_CUT_MARKS:   # their access lines were lost: forget the oldest
            del self._cut[next(iter(self._cut))]
        self._cut[conn] = None
        self.cuts += 1

    def _route(self, target: bytes) -> tuple:
        return resolve_target(self.metrics, self._routes, target, _unescape(target).decode("latin-1"), ROUTE_CACHE,
                              self.captures.samplers if self.captures is not None else None)

    # --- reading ------------------------------------------------------------------
    def drain(self) -> int:
        """Read every datagram waiting and count them; returns how many."""
        batch: list[bytes] = []
        last: list = []
        if self._meminfo and self.loopback:   # the common case: nothing but the datagram is needed
            recv, add = self.sock.recv, batch.append
            while True:
                try:
                    add(recv(MAX_LINE))
                except (BlockingIOError, InterruptedError):
                    break
        else:
            recvmsg, anc = self.sock.recvmsg, socket.CMSG_SPACE(4)
            while True:
                try:
                    data, anc_data, _flags, addr = recvmsg(MAX_LINE, anc)
                except (BlockingIOError, InterruptedError):
                    break
                last = anc_data or last
                if addr[0].startswith("127.") or addr[0] == "::1":
                    batch.append(data)
                else:   # not from this host's loopback: not nginx's
                    self.malformed += 1
        if batch:
            self.feed_many(batch)
            self.last_line_at = time.monotonic()
        self._count_drops(last)
        return len(batch)

    def _count_drops(self, ancillary: list) -> None:
        """The kernel's count of datagrams it dropped on this socket, now (SO_MEMINFO), else as of
        the last datagram read (SO_RXQ_OVFL: a datagram carries the count when it was queued, so
        drops after the last one read would wait for the next line to be seen)."""
        total = -1
        if self._meminfo:
            try:
                total = struct.unpack_from("=9I", self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[
                    SK_MEMINFO_DROPS]
            except (OSError, struct.error):
                self._meminfo = False
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                total = max(total, struct.unpack("=I", value[:4])[0])
        if total > self.dropped:
            self._lost.inc(total - self.dropped)
            log.warning("the kernel dropped %d access-log line(s) (%d in all): those requests are not "
                        "in sentinel_requests_total; counted in %s", total - self.dropped, total,
                        mn.ACCESS_LOG_LOST.sample_name)
            self.dropped = total

    async def run(self) -> None:
        """Drain the socket often enough that it stays under a quarter full at the last drain's rate
        (between BUSY_POLL_S and POLL_S): few wake-ups when quiet, no drops when busy."""
        then = time.monotonic()
        while True:
            try:
                n = self.drain()
            except Exception:   # a bug here must not stop counting for good
                log.exception("reading nginx's access log failed")
                n = 0
            now = time.monotonic()
            rate, then = n / max(now - then, 1e-3), now
            await asyncio.sleep(min(POLL_S, max(BUSY_POLL_S, self.capacity / 4 / rate)) if rate else POLL_S)

    def state(self) -> dict:
        return {"log_lines": self.lines, "log_lines_canary": self.skipped, "log_lines_malformed": self.malformed,
                "log_lines_lost": self.dropped, "answers_cut_by_upstream": self.cuts,
                **(self.captures.state() if self.captures is not None else {})}

    def close(self) -> None:
        try:
            self.drain()   # what nginx logged before it stopped
        except OSError:
            pass
        self.sock.close()


def classify(status: bytes, done: bool, sent: int, body_sent: int, length: int | None, head: bool = False,
             cut: bool = False) -> str:
    """Sentinel's code label for what the client got, from nginx's line (the table in the module docstring).

    `done`: `$request_completion` was OK; `sent`: bytes written to the client, `body_sent` of them
    after the head; `length`: the Content-Length nginx sent (None: none); `head`: a HEAD request;
    `cut`: an error line said the upstream's answer broke off while nginx relayed it.
    """
    if status == b"499":
        return mn.CODE_CLIENT_CLOSED
    if sent == 0:   # nginx wrote nothing: it gave up on the connection (its timeout) or the client left
        return "408" if status == b"408" else mn.CODE_CLIENT_CLOSED
    if not done:    # the head went out and the rest did not
        return mn.CODE_INCOMPLETE
    if cut:
        return mn.CODE_INCOMPLETE
    if (length is not None and body_sent < length and not head and status not in _NO_BODY
            and not status.startswith(b"1")):
        return mn.CODE_INCOMPLETE
    return status.decode()


def _unescape(value: bytes) -> bytes:
    """A logged value as the client sent it: nginx writes '"', '\\' and bytes outside 0x20-0x7e as \\xHH."""
    return _ESCAPED.sub(lambda m: bytes((int(m.group(1), 16),)), value) if b"\\x" in value else value


def _split_capture(text: bytes) -> tuple[list, bytes] | None:
    """A captured request's line: ([body file, request id, Content-Length, request headers, answer
    headers], the access line after them), or None when it does not parse (CAPTURE_FORMAT)."""
    fields = text.split(b" ", 3)
    if len(fields) != 4:
        return None
    body_file, request_id, length, rest = fields
    values = []
    for _ in range(6):
        end = rest.find(b'" ', 1)
        if not rest.startswith(b'"') or end < 0:
            return None
        value = rest[1:end]
        values.append(None if value == b"-" else _unescape(value).decode("latin-1"))
        rest = rest[end + 2:]
    request = {k: v for k, v in zip(CAPTURE_HEADERS, values[:3], strict=True) if v is not None}
    answer = {k: v for k, v in zip(CAPTURE_HEADERS, values[3:], strict=True) if v is not None}
    return [body_file, request_id, length, request, answer], rest


class CaptureFiles:
    """The sampled share's bodies nginx leaves in the capture folder, taken as samples or deleted.

    nginx keeps a captured request's body in CAPTURE_IN (`client_body_in_file_only`) and stores
    its answer in CAPTURE_OUT under the request id when the answer is a whole 200 (`proxy_store`).
    Its access line (under the tag TAG_cap) names both; `take` applies the model's sampler (its
    rate over the captured share, its per-second and byte caps), reads what is sampled, hands it
    to analysis and deletes both files whatever becomes of them. A path is only ever one of
    nginx's own names inside those folders. Files whose line never came (the kernel dropped it)
    are deleted by `sweep` once untouched for CAPTURE_TTL_S.
    """

    def __init__(self, capture_dir: str, samplers: dict, submit: Any, count_sample: Any):
        self.inbox = os.path.join(capture_dir, CAPTURE_IN)
        self.outbox = os.path.join(capture_dir, CAPTURE_OUT)
        self.samplers = samplers          # path model name → (configured name, Sampler)
        self.submit = submit              # analysis: Sample → None (queues or counts it dropped)
        self.count_sample = count_sample  # (model, outcome) → None
        self.taken = 0        # captured requests whose line came
        self.sampled = 0      # ...of them handed to analysis
        self.swept = 0        # files deleted by the sweep (their line never came)

    def _paths(self, capture: list) -> tuple[str | None, str | None]:
        """The capture's two files as nginx named them (None: not one of its names in these folders)."""
        body_file, request_id = capture[0], capture[1]
        folder, _, name = body_file.rpartition(b"/")
        body = body_file.decode() if folder.decode("latin-1") == self.inbox and _BODY_FILE.match(name) else None
        answer = os.path.join(self.outbox, request_id.decode()) if _REQUEST_ID.match(request_id) else None
        return body, answer

    def take(self, captures: list[list]) -> None:
        """Each captured request's line: sample it (module docstring), then delete its files."""
        for capture in captures:
            body, answer = self._paths(capture)
            try:
                self.taken += 1
                if len(capture) == 8 and body is not None and answer is not None:
                    self._sample(capture, body, answer)
            finally:
                for path in (body, answer):
                    if path is not None:
                        try:
                            os.unlink(path)
                        except OSError:
                            pass

    def _sample(self, capture: list, body: str, answer: str) -> None:
        _file, _id, length, request_headers, answer_headers, route, code, trace_id = capture
        if route[2] is None or code != "200":   # not a configured model's, or not a whole 200
            return
        name, sampler = route[2]
        decision = sampler.decide(int(length) if length.isdigit() else None)
        if decision != "sample":
            if decision is not None:
                self.count_sample(name, decision)
            return
        request = _read(body, sampler.max_bytes)
        response = _read(answer, sampler.max_bytes)
        if request is None or response is None:
            self.count_sample(name, "oversize" if request is False or response is False else "dropped")
            return
        self.sampled += 1
        self.submit(Sample(name, route[0], request_headers, request, answer_headers, response, "proxy",
                           trace_id.decode("ascii", "replace"), time.time()))

    def sweep(self, now: float | None = None, ttl: float = CAPTURE_TTL_S) -> int:
        """Delete the files untouched for `ttl` seconds (their lines were lost); how many."""
        now = time.time() if now is None else now
        gone = 0
        for folder in (self.inbox, self.outbox):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime > ttl:
                        os.unlink(entry.path)
                        gone += 1
                except OSError:
                    pass
        self.swept += gone
        return gone

    def state(self) -> dict:
        return {"captured": self.taken, "captured_sampled": self.sampled, "captured_files_swept": self.swept}


def remove_stale_run_dirs(tmp: str | None = None) -> int:
    """Delete the run directories of sentinels that are gone (SIGKILLed: nothing removed theirs),
    with whatever captured bodies they held; how many. Only directories of this user whose owner
    file names a process that no longer exists (a reused pid keeps one: the safe side)."""
    tmp = tmp or tempfile.gettempdir()
    gone = 0
    try:
        entries = [e for e in os.scandir(tmp) if e.name.startswith(RUN_PREFIX)]
    except OSError:
        return 0
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            with open(os.path.join(entry.path, OWNER_FILE), encoding="ascii") as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
            gone += 1
            log.info("removed %s, the nginx run directory of a sentinel (pid %d) that is gone", entry.path, pid)
        except (OSError, ValueError):
            continue   # not ours to judge: no owner file, another user's process, unreadable
    return gone


def _own_dir(base: str | None) -> str:
    """A new private directory (under `base`, default $TMPDIR) that nginx's workers can enter,
    with its owner's pid (remove_stale_run_dirs)."""
    path = tempfile.mkdtemp(prefix=RUN_PREFIX, dir=base)
    os.chmod(path, 0o755)   # workers drop to an unprivileged user when sentinel runs as root
    with open(os.path.join(path, OWNER_FILE), "w", encoding="ascii") as f:
        f.write(str(os.getpid()))
    return path


def capture_base(setting: str, min_free: int, shm: str = "/dev/shm", mounts: str = "/proc/self/mounts") -> str | None:
    """Where the capture folders go: `proxy.capture_dir` when it names a directory; for "auto",
    `shm` when it is a tmpfs this user can write with room for four times the free-space floor
    (a 64 MB container /dev/shm is not: captures would pause for good), else None ($TMPDIR, with
    the run directory). A capture on disk costs its request about twice the latency (benchmarks/proxy.md)."""
    if setting != "auto":
        return setting
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            tmpfs = any(len(fields) > 2 and fields[1] == shm and fields[2] == "tmpfs"
                        for fields in (line.split() for line in f))
        st = os.statvfs(shm)
    except OSError:
        return None
    if not tmpfs or not os.access(shm, os.W_OK | os.X_OK) or st.f_bavail * st.f_frsize < 4 * min_free:
        return None
    return shm


def free_bytes(path: str) -> int:
    """Bytes free to an unprivileged writer on `path`'s file system (a huge number when it cannot be read)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _read(path: str, cap: int) -> bytes | bool | None:
    """A captured file's bytes; False when it is larger than `cap`, None when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            return False
        chunks, left = [], size
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


# --- configuration ---------------------------------------------------------------

def capture_config(config: Config) -> Config:
    """`config` with each sampling rate divided by the share nginx captures: the rates sentinel's
    samplers apply to the captured requests (a model sampled at rate r keeps r / share of them)."""
    share = sample_share(config)

    def scaled(sc: Any) -> Any:
        return dataclasses.replace(sc, rate=min(1.0, sc.rate / share) if share > 0 else 0.0)
    models = [dataclasses.replace(m, sampling=scaled(m.sampling)) if m.sampling is not None else m
              for m in config.models]
    return dataclasses.replace(config, sampling=scaled(config.sampling), models=models)


def capture_requests_per_second(config: Config) -> int:
    """How many requests per second nginx captures at most: what fills every model's sampling cap
    (a model sampled at rate r keeps r / share of the captured requests)."""
    share = sample_share(config)
    need = sum(config.sampling_for(m).max_per_second * share / config.sampling_for(m).rate
               for m in config.models if config.sampling_for(m).rate > 0)
    return max(1, math.ceil(need))


def capture_max_bytes(config: Config) -> int:
    """The largest body any model samples: larger requests are never captured."""
    return max((config.sampling_for(m).max_bytes for m in config.models), default=config.sampling.max_bytes)


def at_most(n: int) -> str:
    """A regular expression matching the decimal numbers 0..n (no sign, no leading zeros past n's length)."""
    digits = str(n)
    k = len(digits)
    alternatives = [f"[0-9]{{1,{k - 1}}}"] if k > 1 else []
    for i, d in enumerate(digits):   # n's first i digits, a smaller digit, then any digits
        if d != "0":
            rest = k - i - 1
            alternatives.append(digits[:i] + (f"[0-{int(d) - 1}]" if d != "1" else "0")
                                + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(digits)
    return "^(?:" + "|".join(alternatives) + ")$"


def sample_share(config: Config) -> float:
    """The share of requests nginx captures: the largest sampling rate configured."""
    rates = [config.sampling.rate] + [config.sampling_for(m).rate for m in config.models]
    return max(rates) if config.models else config.sampling.rate


def _secs(x: float) -> str:
    return f"{max(1, math.ceil(x * 1000))}ms"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# W3C trace context as sentinel's tracing.parse_traceparent reads it: lowercase hex, the ids not all
# zeros, version ff invalid, version 00 exactly 55 characters, a later version's extra fields after a
# dash. Named captures: t, the trace id; f, the flags' last digit (its low bit: sampled).
_TP_00 = r"^00-(?!0{32})(?<t>[0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f](?<f>[0-9a-f])$"
_TP_LATER = r"^(?!00|ff)[0-9a-f]{2}-(?!0{32})(?<t>[0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f](?<f>[0-9a-f])(?:-.*)?$"
_MAPS = f"""  # trace context: the caller's trace continues with a new span id; otherwise a new trace
  map $request_id $sentinel_span {{ "~^(?<s>[0-9a-f]{{16}})" $s; default 0000000000000001; }}
  map $http_traceparent $sentinel_trace_id {{ "~{_TP_00}" $t; "~{_TP_LATER}" $t; default $request_id; }}
  map $http_traceparent $sentinel_tp_flag {{ "~{_TP_00}" $f; "~{_TP_LATER}" $f; default ""; }}
  map $sentinel_tp_flag $sentinel_trace_flags {{ "~[02468ace]" 00; default 01; }}   # the sampled bit only
  map $sentinel_tp_flag $sentinel_tracestate {{ "" ""; default $http_tracestate; }}
  map {_CANARY_VAR} $sentinel_canary {{ "1" 1; default 0; }}   # as the Python proxy: exactly 1
  map $request_completion $sentinel_done {{ "OK" 1; default 0; }}"""


def render_conf(config: Config, *, upstream: tuple[str, int], log_to: tuple[str, int] | LogTarget,
                run_dir: str, sample: bool = True, capture_dir: str | None = None) -> str:
    """nginx's configuration for `config` (see the module docstring). `log_to`: AccessLog.address
    (a plain (host, port) logs under the tag `sentinel`). `sample=False`: nothing is captured (what
    the watchdog switches to while sentinel's event loop is stalled and cannot take captures).
    `capture_dir`: where the capture folders are (Nginx.capture_dir; default `run_dir`)."""
    p = config.proxy
    model = _hostport(*upstream)
    listen = _hostport(*parse_hostport(config.listen))
    tag = log_to.tag if isinstance(log_to, LogTarget) else "sentinel"
    syslog = f"syslog:server={_hostport(log_to[0], log_to[1])},nohostname"
    share = sample_share(config) if sample else 0.0
    # a request line must fit one buffer; the whole head, the buffers together (nginx has no field count)
    buf = max(1024, p.max_request_line_bytes)
    nbuf = max(2, math.ceil(p.max_header_bytes / buf))
    worker_conns = 2 * p.max_connections + p.upstream_pool_size + 64   # clients and their upstream connections
    # nginx's limit_conn takes at most 65535; a budget past that is left to worker_connections
    limit = f"limit_conn sentinel_clients {p.max_connections};" if p.max_connections < 65536 else \
        f"# limit_conn: proxy.max_connections {p.max_connections} is past nginx's 65535"
    d = run_dir
    capture = _capture_conf(config, share, syslog, tag, capture_dir or d, model) if share > 0 else ("", "", "")
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
  log_format sentinel_capture '{CAPTURE_FORMAT}{LOG_FORMAT}';

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
  lingering_time {_secs(LINGER_S)};      # a refused body is read and dropped this long, as the Python proxy does
  lingering_timeout {_secs(LINGER_S)};
  reset_timedout_connection on;
  limit_conn_zone $server_port zone=sentinel_clients:1m;
  limit_conn_status 503;

  upstream model {{
    server {model};
    keepalive {max(1, p.upstream_pool_size)};
  }}
{capture[0]}{_MAPS}

  server {{
    listen {listen} backlog=2048;
    access_log {syslog},tag={tag} sentinel;
    error_log stderr warn;
    error_log {syslog},tag={tag}_err error;   # an answer cut by the upstream after its head
    {limit}
    error_page 503 = @shed;
    location @shed {{
      add_header Retry-After {p.shed_retry_after_s} always;
      return 503 "over the limit of {p.max_connections} connections; retry later\\n";
    }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_set_header traceparent "00-$sentinel_trace_id-$sentinel_span-$sentinel_trace_flags";
    proxy_set_header tracestate $sentinel_tracestate;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_max_temp_file_size 0;
    proxy_connect_timeout {_secs(min(p.connect_timeout_s, 75.0))};
    proxy_read_timeout {_secs(max(p.upstream_timeout_s, p.upstream_idle_timeout_s))};
    proxy_send_timeout {_secs(p.body_idle_timeout_s)};
    proxy_next_upstream error;
    proxy_intercept_errors off;
    location / {{
{capture[1]}      proxy_pass http://model;
    }}
{capture[2]}  }}
}}
"""


def _capture_conf(config: Config, share: float, syslog: str, tag: str, d: str, model: str) -> tuple[str, str, str]:
    """The http-level and location-level parts of capturing the sampled share (module docstring)."""
    rate = capture_requests_per_second(config)
    max_bytes = capture_max_bytes(config)
    pct = "*" if share >= 1.0 else f"{share * 100:.4f}".rstrip("0").rstrip(".") + "%"
    rest = "" if share >= 1.0 else "\n    * \"\";"
    http = f"""  # A captured request's body goes to the model server from its file after the head, in a second
  # write: on a kept-alive connection without TCP_NODELAY (nginx sets it only for unbuffered
  # bodies) Nagle holds that write until the server's delayed ACK, ~40 ms. A new connection per
  # captured request is ACKed at once (a fresh connection starts in quick-ACK mode).
  upstream model_capture {{
    server {model};
  }}
  # the sampled share: a request whose Content-Length fits the sampling byte cap (not a chunked one)
  split_clients "$request_id" $sentinel_share {{
    {pct} 1;{rest}
  }}
  map $http_content_length $sentinel_fits {{ "~{at_most(max_bytes)}" $sentinel_share; default ""; }}
  limit_req_zone $sentinel_fits zone=sentinel_capture:64k rate={rate}r/s;
"""
    divert = """      # captured: nginx keeps the request body's file and stores a whole 200 answer (module docstring)
      if ($sentinel_fits) { rewrite ^ /.sentinel-capture last; }
"""
    locations = f"""    location = /.sentinel-capture {{
      internal;   # reached by the rewrite above only; a client asking for it gets 404
      error_page 429 = @direct;   # past the capture rate: on to the model server, uncaptured
      limit_req zone=sentinel_capture burst={rate} nodelay;
      limit_req_status 429;
      limit_req_log_level info;
      access_log {syslog},tag={tag}_cap sentinel_capture;
      client_body_in_file_only on;
      proxy_request_buffering on;   # the whole body in its file before it goes on
      client_body_temp_path {d}/{CAPTURE_IN};
      proxy_temp_path {d}/{CAPTURE_OUT};
      proxy_buffering on;
      proxy_max_temp_file_size {max(max_bytes, 65536)};
      proxy_store {d}/{CAPTURE_OUT}/$request_id;
      proxy_store_access user:rw;
      proxy_pass http://model_capture$request_uri;   # the client's own target, not the rewritten one
    }}
    location @direct {{
      proxy_pass http://model$request_uri;
    }}
"""
    return http, divert, locations


# --- the process -------------------------------------------------------------------

class Nginx:
    """nginx as sentinel's child: checked, started, restarted when it dies, stopped gracefully."""

    def __init__(self, config: Config, binary: str, on_restart: Any = None, on_pause: Any = None):
        self.config = config
        self.share = sample_share(config)
        self.binary = shutil.which(binary) or binary
        # captures pause while the capture folder's file system has less free: two seconds of captures
        # at their cap and the largest body each way, between 64 MiB and 1 GiB
        rate = capture_requests_per_second(config)
        self.min_free_bytes = min(MAX_FREE_FLOOR, max(MIN_FREE_FLOOR, 2 * rate * 2 * capture_max_bytes(config)))
        base = capture_base(config.proxy.capture_dir, self.min_free_bytes) if self.share > 0 else None
        remove_stale_run_dirs()
        self.run_dir = _own_dir(None)
        if base is not None:
            remove_stale_run_dirs(base)
        self.capture_dir = self.run_dir if base is None else _own_dir(base)
        self.conf = os.path.join(self.run_dir, "nginx.conf")
        self.pid_file = os.path.join(self.run_dir, "nginx.pid")
        self.conf_text = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.restarts = 0
        self.on_restart = on_restart
        self._relays: list[asyncio.Task] = []
        self._supervisor: asyncio.Task | None = None
        self._spawned_at = 0.0
        self._group_killed = 0   # the master whose process group was killed after it died
        self.last_error = ""
        self.pause_reason = ""   # a PAUSE_REASONS key while the watchdog has captures off, else ""
        self.on_pause = on_pause   # (a PAUSE_REASONS key, paused: bool) → None, from the watchdog thread
        # a captured body whose line never came: deleted once untouched this long (past any request's life)
        p = config.proxy
        self.capture_ttl_s = max(CAPTURE_TTL_S, 2 * max(p.upstream_timeout_s, p.upstream_idle_timeout_s,
                                                         p.body_idle_timeout_s))
        self.diversions = 0
        self._watch_stop: threading.Event | None = None

    def write_and_check(self, text: str) -> None:
        """Write the configuration and have nginx check it (`nginx -t`): InfrastructureError with its words."""
        self.conf_text = text
        self._write_conf(text)
        where = f"proxy.engine is nginx ({self.config.source}: proxy.nginx_binary)"
        if not os.path.exists(self.binary) and shutil.which(self.binary) is None:
            raise InfrastructureError(f"{where}: '{self.binary}' was not found: install nginx "
                                      "(Debian: apt-get install nginx-light) or set proxy.nginx_binary")
        try:
            r = subprocess.run([self.binary, "-t", "-q", "-c", self.conf, "-p", self.run_dir, "-e", "stderr"],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise InfrastructureError(f"{where}: cannot run '{self.binary}': {exc}") from None
        if r.returncode != 0:
            raise InfrastructureError(f"nginx refused the configuration sentinel wrote for {self.config.source} "
                                      f"({self.conf}): {r.stderr.strip() or r.stdout.strip()}")

    async def start(self, ready: Any) -> None:
        """Start nginx and wait until it has bound `listen` (its pid file) and `ready()` (its listener
        answers), or it exits (an error)."""
        try:
            await self._spawn()
        except OSError as exc:
            raise InfrastructureError(f"cannot start nginx ('{self.binary}', {self.config.source}: "
                                      f"proxy.nginx_binary): {exc}") from None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.running and await ready()):
            assert self.proc is not None
            if self.proc.returncode is not None or time.monotonic() > deadline:
                await self._kill()
                why = self.last_error or f"exit status {self.proc.returncode}"
                raise InfrastructureError(f"nginx did not start listening on {self.config.listen} "
                                          f"({self.config.source}: listen): {why}")
            await asyncio.sleep(0.02)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _spawn(self) -> None:
        argv = [self.binary, "-c", self.conf, "-p", self.run_dir, "-e", "stderr"]
        if SETPRIV is not None:   # sentinel killed (SIGKILL, OOM): nginx, in a session of its own, stops too
            argv = [SETPRIV, "--pdeathsig", "QUIT", "--", *argv]
        # nginx's error lines come over a pipe whose write end does not block: if sentinel stops reading
        # (its loop stalled), nginx's workers lose lines instead of waiting on a full pipe with requests
        rfd, wfd = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=wfd,
                start_new_session=True)   # a Ctrl-C at the terminal reaches sentinel, which stops nginx itself
            # after the spawn: uvloop's (libuv's) makes a child's stdio blocking before it execs, and the
            # flag belongs to the pipe end both processes share
            os.set_blocking(wfd, False)
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        self._spawned_at = time.monotonic()
        self._relays = [t for t in self._relays if not t.done()]
        self._relays.append(asyncio.get_running_loop().create_task(self._relay_errors(rfd)))

    async def _relay_errors(self, rfd: int) -> None:
        """Log nginx's error lines as sentinel's: every one as `last_error`, at most RELAY_LINES per
        RELAY_WINDOW_S in the log (a failing model server can make nginx write one per request)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE, loop=loop)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                                                    os.fdopen(rfd, "rb", buffering=0))
        window, shown, hidden = 0.0, 0, 0
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:   # a line past MAX_LINE: skip it
                    continue
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip()
                self.last_error = text[:500]
                now = time.monotonic()
                if now - window > RELAY_WINDOW_S:
                    if hidden:
                        log.warning("nginx: %d more error line(s) in the last %.0f s not logged", hidden, RELAY_WINDOW_S)
                    window, shown, hidden = now, 0, 0
                if shown >= RELAY_LINES:
                    hidden += 1
                    continue
                shown += 1
                level = logging.ERROR if "[emerg]" in text or "[alert]" in text or "[crit]" in text else logging.WARNING
                log.log(level, "nginx: %s", text)
        finally:
            transport.close()

    async def _supervise(self) -> None:
        tries = 0
        while True:
            assert self.proc is not None
            rc = await self.proc.wait()
            if self.stopping:
                return
            _killpg(self.proc.pid)   # workers outlive a killed master, holding the port: the next one could not bind
            self._group_killed = self.proc.pid
            if time.monotonic() - self._spawned_at > RESTART_RESET_S:
                tries = 0   # it had been running fine: a death, not a crash loop
            self.restarts += 1
            delay = RESTART_BACKOFF_S[min(tries, len(RESTART_BACKOFF_S) - 1)]
            tries += 1
            log.error("nginx exited (status %s, %s); restarting in %.1f s (restart %d)", rc,
                      self.last_error or "no message", delay, self.restarts)
            if self.on_restart is not None:
                self.on_restart()
            while True:
                await asyncio.sleep(delay)
                if self.stopping:
                    return
                try:
                    await self._spawn()
                    break
                except OSError as exc:
                    log.error("cannot start nginx again: %s", exc)
                    delay = RESTART_BACKOFF_S[min(tries, len(RESTART_BACKOFF_S) - 1)]
                    tries += 1

    # --- the watchdog: no captures that sentinel cannot take or nginx cannot write -------------
    def watch(self, heartbeat: Any, unsampled: str, captures: CaptureFiles | None = None) -> None:
        """Watch sentinel's event loop from a thread: while `heartbeat()` (the loop's last tick,
        time.monotonic) is older than STALL_S, nginx runs `unsampled` (nothing captured: a stalled
        loop takes no captured files, which would pile up), reloaded with SIGHUP; once the loop
        ticks again, the configuration it started with. The same thread sweeps `captures`' files
        whose lines never came, every SWEEP_S, stalled loop or not."""
        self._sampled_text = self.conf_text
        self._unsampled_text = unsampled
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(heartbeat, captures),
                                         name="sentinel-nginx-watchdog", daemon=True)
        self._watcher.start()

    def _watch(self, heartbeat: Any, captures: CaptureFiles | None) -> None:
        swept_at = time.monotonic()
        while not self._watch_stop.wait(WATCH_S):
            now = time.monotonic()
            stalled = now - heartbeat()
            free = free_bytes(self.capture_dir)
            try:
                if not self.diverted and (stalled > STALL_S or free < self.min_free_bytes):
                    self._reload(self._unsampled_text)
                    self.pause_reason = "stalled" if stalled > STALL_S else "disk"
                    self.diversions += 1
                    self._paused(self.pause_reason, True)
                    if self.pause_reason == "stalled":
                        log.error("sentinel's event loop has not run for %.1f s: nginx captures no request "
                                  "until it does (no samples meanwhile)", stalled)
                    else:
                        log.error("%d MiB free where nginx writes captures (%s), under %d MiB: nginx captures "
                                  "no request until there is more (a body nginx cannot write fails its request)",
                                  free >> 20, self.capture_dir, self.min_free_bytes >> 20)
                elif self.diverted and stalled < 2 * WATCH_S and free >= 2 * self.min_free_bytes:
                    self._reload(self._sampled_text)
                    log.warning("nginx captures the sampled share again (it stopped: %s)",
                                PAUSE_REASONS[self.pause_reason])
                    self._paused(self.pause_reason, False)
                    self.pause_reason = ""
            except OSError as exc:   # nginx between restarts: the next look tries again
                log.warning("cannot reload nginx: %s", exc)
            if captures is not None and now - swept_at >= SWEEP_S:
                swept_at = now
                try:
                    captures.sweep(ttl=self.capture_ttl_s)
                except Exception:   # never the end of the watchdog
                    log.exception("sweeping captured files failed")

    @property
    def diverted(self) -> bool:
        """The watchdog has captures off (PAUSE_REASONS says why)."""
        return bool(self.pause_reason)

    def _paused(self, reason: str, paused: bool) -> None:
        if self.on_pause is not None:
            try:
                self.on_pause(reason, paused)
            except Exception:   # never the end of the watchdog
                log.exception("reporting a capture pause failed")

    def _write_conf(self, text: str) -> None:
        # readable by sentinel's user only (nginx's master reads it): it holds the log lines' tag
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)

    def _reload(self, text: str) -> None:
        self._write_conf(text)
        proc = self.proc
        if proc is not None and proc.returncode is None and not self.stopping:
            os.kill(proc.pid, signal.SIGHUP)

    def state(self) -> dict:
        return {"captures_paused": self.diverted, "capture_pauses": self.diversions,
                "capture_pause_reason": PAUSE_REASONS.get(self.pause_reason),
                "pid": self.proc.pid if self.proc is not None else None, "running": self.running,
                "restarts": self.restarts, "config": self.conf, "sampled_share": self.share,
                "capture_dir": self.capture_dir if self.share > 0 else None,
                "last_error": self.last_error or None}

    @property
    def running(self) -> bool:
        """The process is up and has bound its listener (nginx writes its pid file after that)."""
        if self.proc is None or self.proc.returncode is not None:
            return False
        try:
            with open(self.pid_file, "rb") as f:
                return f.read().strip() == str(self.proc.pid).encode()
        except OSError:
            return False

    async def stop(self, drain_s: float) -> None:
        """SIGQUIT: nginx stops accepting and finishes what it serves (worker_shutdown_timeout), then exits."""
        self.stopping = True
        if self._watch_stop is not None:
            self._watch_stop.set()
        if self._supervisor is not None:   # no restart from here on (nor one half-way through)
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        proc = self.proc
        if proc is not None:
            if proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGQUIT)
                    await asyncio.wait_for(proc.wait(), drain_s + 5.0)
                except ProcessLookupError:
                    pass
                except TimeoutError:
                    log.warning("nginx did not stop within %.1f s of SIGQUIT; killing it", drain_s + 5.0)
                    await self._kill()
            if self._group_killed != proc.pid:   # (once: its pid may be another's by the next time)
                _killpg(proc.pid)   # workers a dead master left behind
        for t in self._relays:
            t.cancel()
        if self._relays:
            await asyncio.gather(*self._relays, return_exceptions=True)
        self.remove_dirs()

    def remove_dirs(self) -> None:
        """The run directory and the capture folder's, with whatever they hold."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.capture_dir != self.run_dir:
            shutil.rmtree(self.capture_dir, ignore_errors=True)

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        _killpg(proc.pid)   # its workers too
        await proc.wait()


def _killpg(pgid: int) -> None:
    """SIGKILL to nginx's process group (the master leads it: start_new_session)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
