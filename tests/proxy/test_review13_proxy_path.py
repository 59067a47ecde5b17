"""Review of the thirteenth pass's proxy path (small requests started after the read, response
bytes gathered per upstream read, header limits checked per head, answers counted when our
buffer is empty), over real loopback sockets: what each client received against what was counted.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

from fault_helpers import (  # noqa: E402
    RawUpstream,
    RunningSidecar,
    code_count,
    make_config,
    normal_request_ok,
    read_all,
    send_request,
    wait_until,
)
from proxy_helpers import ResponseReader, Upstream  # noqa: E402

from sentinel import metricnames as mn  # noqa: E402


def _client_conns(sc: RunningSidecar) -> list:
    return list(sc.sc.ctx.connections)  # type: ignore[union-attr]


def _error_count(sc: RunningSidecar, reason: str) -> float:
    return sc.value(mn.PROXY_ERRORS.sample_name, {"reason": reason})


def _small_buffers_client(sc: RunningSidecar) -> tuple[socket.socket, object]:
    """A client connection with small kernel buffers on both sides: the proxy's own buffer is what fills."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", sc.port))
    s.settimeout(5)
    assert wait_until(lambda: len(_client_conns(sc)) == 1)
    conn = _client_conns(sc)[0]
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return s, conn


class _SinkUpstream(RawUpstream):
    """/sink is read and never answered (a model server waiting for the end of a chunked body)."""

    def _answer(self, conn: socket.socket, method: str, target: str) -> bool:
        if target != "/sink":
            return super()._answer(conn, method, target)
        conn.settimeout(0.2)
        while not self.stopping:
            try:
                if not conn.recv(65536):
                    break
            except TimeoutError:
                continue
        return False


def test_chunked_request_trailer_fields_are_held_to_the_header_limits():
    """httptools reports trailer fields through on_header, after the head's limits were checked:
    since the per-field check went, they were appended to the request's fields without a bound
    (30,000 held, no answer). They count with the head's fields again: 431 too_many_headers."""
    with _SinkUpstream() as up, RunningSidecar(make_config(up.url)) as sc:
        s = send_request(sc.port, b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"3\r\nabc\r\n0\r\n")
        with s:
            assert wait_until(lambda: len(up.seen) == 1)
            s.sendall(b"x-t: 1\r\n" * 150)   # 152 fields in all, over max_headers (100)
            s.settimeout(3)
            out = read_all(s)
        assert out.startswith(b"HTTP/1.1 431 ") and b"too_many_headers" in out, out[:200]
        assert wait_until(lambda: code_count(sc, "431") == 1)
        assert _error_count(sc, "too_many_headers") == 1
        assert sc.sc.metrics.inflight_count == 0
        normal_request_ok(sc)


def test_a_trailer_field_that_never_ends_is_refused_not_held():
    """A trailer field is kept by httptools until its line ends, and no limit counted trailer
    bytes: `0`, `X: ` and then any number of bytes were all held in memory (20 MB sent, 37 MB
    more resident, no answer). After max_line + max_head bytes with no body data: 431."""
    with _SinkUpstream() as up, RunningSidecar(make_config(up.url, max_request_line_bytes=1024,
                                                           max_header_bytes=8192)) as sc:
        s = send_request(sc.port, b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"3\r\nabc\r\n0\r\nX-T: ")
        with s:
            sent = 0
            try:
                for _ in range(64):   # up to 4 MB
                    s.sendall(b"a" * 65536)
                    sent += 65536
            except OSError:
                pass   # refused and cut: what it sent past the linger is not read
            s.settimeout(3)
            out = read_all(s)
        assert out.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in out, (sent, out[:200])
        assert wait_until(lambda: code_count(sc, "431") == 1)
        assert sc.sc.metrics.inflight_count == 0
        normal_request_ok(sc)


def test_a_chunked_upload_in_small_pieces_is_not_refused():
    """The bound on chunk framing without body data leaves a real upload alone: 1-byte chunks,
    each written apart (reads of framing only), and a few trailer fields."""
    with Upstream() as up, RunningSidecar(make_config(up.url, max_request_line_bytes=1024,
                                                       max_header_bytes=1024)) as sc:
        s = send_request(sc.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        with s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(300):
                s.sendall(b"1\r\n")
                s.sendall(b"x\r\n")
            s.sendall(b"0\r\nX-A: 1\r\nX-B: 2\r\n\r\n")
            status, _, body = ResponseReader(s).read()
        assert (status, body) == (200, b"x" * 300)
        assert wait_until(lambda: code_count(sc, "200") == 1)
        assert code_count(sc, "431") == 0


BODY = b"x" * 100_000


def _answer_held_in_our_buffer(up: RawUpstream, sc: RunningSidecar, s: socket.socket, conn) -> None:
    """GET /two: an answer complete (its end 0.5 s after the rest) while most of it waits in our buffer."""
    up.canned["/two"] = ([b"HTTP/1.1 200 OK\r\nContent-Length: 100010\r\n\r\n" + BODY, b"0123456789"], "keep")
    s.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    assert wait_until(lambda: up.count("/two") == 1)
    assert wait_until(lambda: sc.sc.metrics.inflight_count == 0)
    assert conn.transport.get_write_buffer_size() > 0 and code_count(sc, "200") == 0


def test_answers_a_client_read_whole_then_closed_count_their_status():
    """An answer whose end came while earlier bytes sat in our buffer is counted once the sweep
    sees that buffer empty. A client that read it all and closed before the next sweep had it
    counted 499 (client_disconnect), though it received every byte. Counted at its FIN now, when
    everything we wrote was acknowledged (a client closing with bytes unread resets instead)."""
    with RawUpstream() as up, RunningSidecar(make_config(up.url)) as sc:   # default timeouts: 1 s sweep
        s, conn = _small_buffers_client(sc)
        with s:
            _answer_held_in_our_buffer(up, sc, s, conn)
            status, _, got = ResponseReader(s).read()
            assert status == 200 and got == BODY + b"0123456789"
        time.sleep(0.3)   # the FIN arrives before the next sweep
        assert code_count(sc, "499") == 0
        assert wait_until(lambda: code_count(sc, "200") == 1, timeout=3)
        assert _error_count(sc, "client_disconnect") == 0


def test_a_client_that_closes_before_reading_its_answer_still_counts_499():
    """The other side of the test above: the client takes part of the answer and closes (a FIN
    while our bytes are still on their way, or a reset for bytes it left unread)."""
    with RawUpstream() as up, RunningSidecar(make_config(up.url)) as sc:
        s, conn = _small_buffers_client(sc)
        with s:
            _answer_held_in_our_buffer(up, sc, s, conn)
            got = 0
            while got < 20_000:
                got += len(s.recv(65536))
        assert wait_until(lambda: code_count(sc, "499") == 1, timeout=4)
        assert code_count(sc, "200") == 0


def test_a_close_after_answers_counted_by_resume_writing_gives_the_client_send_timeout():
    """held_at, the clock of an answer waiting on our buffer, was left set when resume_writing
    counted that answer. A later close() (Connection: close) timed the client from that old
    start: the first sweep cut a client that had paused for less than send_timeout_s
    (downstream_send_timeout), after its answer had been counted 200."""
    with RawUpstream() as up, RunningSidecar(make_config(up.url, send_timeout_s=1.0)) as sc:
        up.canned["/two"] = ([b"HTTP/1.1 200 OK\r\nContent-Length: 20010\r\n\r\n" + b"x" * 20_000,
                              b"0123456789"], "keep")
        up.canned["/one"] = (b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n" + b"y" * 60_000, "keep")
        s, conn = _small_buffers_client(sc)
        with s:
            r = ResponseReader(s)
            # 1: an answer held in our buffer (the sweep starts its clock); nothing read
            s.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1.0)
            # 2: a large answer fills the buffer (pause_writing); both are then read at once, and
            # resume_writing, with the buffer empty, counts the first
            s.sendall(b"GET /big?n=600000 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            assert r.read()[0] == 200 and r.read()[0] == 200
            time.sleep(0.5)   # longer than send_timeout_s since the first answer's wait began
            # 3: the last answer, then close(); the client pauses 0.5 s (< send_timeout_s) before reading
            s.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.5)
            status, headers, body = r.read()
        assert (status, len(body)) == (200, 60_000)
        assert _error_count(sc, "downstream_send_timeout") == 0
        assert wait_until(lambda: code_count(sc, "200") == 3)


def test_a_pipelined_request_over_the_body_limit_is_refused_in_its_turn():
    """A pipelined request whose body passes max_body_bytes while the answer before it is still
    owed got its 413 at once: ahead of that answer, with the connection closed after it, so the
    first request's answer never reached the client, which read the 413 as its answer (and the
    first counted 200; its write after our FIN raised RuntimeError). The 413 now waits its turn."""
    with RawUpstream() as up, RunningSidecar(make_config(up.url, max_body_bytes=1000)) as sc:
        up.canned["/slow"] = ([b"", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], "keep")   # 0.5 s
        s = send_request(sc.port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"a" * 2000)
        with s:
            r = ResponseReader(s)
            first = r.read()
            second = r.read()
        assert first[0] == 200 and first[2] == b"ok", first
        assert second[0] == 413 and b"body_too_large" in second[2], second
        assert wait_until(lambda: code_count(sc, "413") == 1 and code_count(sc, "200") == 1)
        assert up.count("/x") == 0   # never forwarded
        assert sc.sc.metrics.inflight_count == 0


def test_a_refused_transfer_coding_is_answered_and_counted_once():
    """`Transfer-Encoding: gzip` is answered 501 (the proxy relays only chunked); httptools then
    calls the same head invalid, which was answered again: a phantom 400 counted beside the 501
    and written after our FIN (RuntimeError: Cannot call write() after write_eof())."""
    with RawUpstream() as up, RunningSidecar(make_config(up.url)) as sc:
        s = send_request(sc.port, b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
        with s:
            s.settimeout(3)
            out = read_all(s)
        assert out.startswith(b"HTTP/1.1 501 ") and out.count(b"HTTP/1.1") == 1, out[:300]
        assert wait_until(lambda: code_count(sc, "501") == 1)
        time.sleep(0.2)
        assert code_count(sc, "400") == 0 and _error_count(sc, "bad_request") == 0


def test_a_request_behind_one_refused_with_a_close_in_the_same_read_is_not_processed():
    """The first request is refused (400, no Host) and the connection closes; httptools went on
    parsing the same read, so the request behind it was forwarded to the model server and its
    answer counted 200, then written after our FIN (RuntimeError): the client never got it. As
    bytes after `Connection: close`, it is not processed (RFC 9112 §9.6) and not counted."""
    with RawUpstream() as up, RunningSidecar(make_config(up.url)) as sc:
        s = send_request(sc.port, b"GET /nohost HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        with s:
            s.settimeout(3)
            out = read_all(s)
        assert out.startswith(b"HTTP/1.1 400 ") and b"invalid_host_header" in out, out[:200]
        assert b"HTTP/1.1 200" not in out
        assert wait_until(lambda: code_count(sc, "400") == 1)
        time.sleep(0.3)
        assert up.count("/ok") == 0 and code_count(sc, "200") == 0
        assert sc.sc.metrics.inflight_count == 0
        normal_request_ok(sc)
