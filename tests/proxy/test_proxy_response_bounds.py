"""Bounds on what the model server sends: a response head's size whatever its reads, chunked trailers.

Over real loopback sockets: an upstream that writes each response in the pieces (and pauses) a
test picks, a client that reads what reached it, and /metrics for what was counted.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
from proxy_helpers import RunningSidecar, StepUpstream, make_config, pieces

from sentinel import metricnames as mn

ERR = mn.PROXY_ERRORS.sample_name
REQ = mn.REQUESTS.sample_name
LINE, HEAD = 1024, 4096
LIMIT = LINE + HEAD   # the response head bound: proxy.max_request_line_bytes + max_header_bytes


@pytest.fixture(scope="module")
def env():
    up = StepUpstream()
    cfg = make_config(up.url, max_request_line_bytes=LINE, max_header_bytes=HEAD, upstream_idle_timeout_s=3.0,
                      upstream_timeout_s=5.0, send_timeout_s=3.0)
    with RunningSidecar(cfg) as sc:
        yield up, sc
    up.close()


def _get(port: int, path: bytes, timeout: float = 10.0) -> bytes:
    """GET `path` on a fresh connection (Connection: close); what came back until EOF or a reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)
        out = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                out += b
        except ConnectionResetError:
            pass
    return out


def _counted(sc: RunningSidecar, code: str) -> float:
    return sc.value(REQ, {"model": "none", "protocol": "other", "code": code})


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- task: one measure of a response head, whatever the reads --------------------------------
def _head(size: int) -> bytes:
    """A response head of exactly `size` bytes (status line to blank line), Content-Length 2."""
    base = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (size - len(base)))


SPLITS = [None, 1, 2, 4, 17, 19, 20, 100, LIMIT // 2]   # None: whole; n: the last n bytes in a read of their own


@pytest.mark.parametrize("size", [LIMIT - 1, LIMIT, LIMIT + 1, LIMIT + 17],
                         ids=["under", "at-limit", "one-over", "fields-at-limit"])
def test_the_same_head_gets_the_same_answer_whatever_its_reads(env, size):
    """The same head, whole and with its last bytes in a read of their own, gets the same answer.

    A head was measured in raw bytes while incomplete and as reason + fields once complete (17
    bytes less: status line and CRLFs): one whose fields were at the limit (`fields-at-limit`)
    was relayed when it came in one read and refused 502 when its last <= 19 bytes came apart.
    Now a head's size is its bytes from status line to blank line, whatever the reads.
    """
    up, sc = env
    head = _head(size)
    assert len(head) == size
    answers = {}
    for split in SPLITS:
        path = b"/head-%d-%s" % (size, str(split).encode())
        up.scripts[path] = pieces(head + b"ok") if split is None else pieces(head[:-split], head[-split:] + b"ok")
        ok, bad = _counted(sc, "200"), _counted(sc, "502")
        too_large = sc.value(ERR, {"reason": "upstream_headers_too_large"})
        out = _get(sc.port, path)
        if out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nok"):
            answers[split] = 200
            assert _wait(lambda n=ok: _counted(sc, "200") == n + 1)
        else:
            assert out.startswith(b"HTTP/1.1 502 ") and b"upstream_headers_too_large" in out, out[:200]
            answers[split] = 502
            assert _wait(lambda n=bad: _counted(sc, "502") == n + 1)
            assert sc.value(ERR, {"reason": "upstream_headers_too_large"}) == too_large + 1
    assert set(answers.values()) == {200 if size <= LIMIT else 502}, answers


@pytest.mark.parametrize("size", [LIMIT, LIMIT + 1], ids=["at-limit", "one-over"])
@pytest.mark.parametrize("split", [None, 3], ids=["whole", "split-3"])
def test_an_early_hints_head_before_it_in_the_same_read_is_not_counted_in_its_size(env, size, split):
    up, sc = env
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    head = _head(size)
    path = b"/hints-%d-%s" % (size, str(split).encode())
    up.scripts[path] = (pieces(hints + head + b"ok") if split is None
                        else pieces(hints + head[:-split], head[-split:] + b"ok"))
    out = _get(sc.port, path)
    if size <= LIMIT:
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nok"), out[:80]
    else:
        assert out.startswith(b"HTTP/1.1 502 ") and b"upstream_headers_too_large" in out, out[:200]


# --- task: chunked response trailers ---------------------------------------------------------
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def _trailers(n_bytes: int) -> bytes:
    field = b"X-Trailer: " + b"t" * 50 + b"\r\n"   # 63 bytes, as http.field_bytes counts them
    return field * (n_bytes // len(field) + 1)


def test_small_trailers_are_still_relayed_as_a_complete_response(env):
    up, sc = env
    up.scripts[b"/trailers-small"] = pieces(CHUNKED_HEAD + b"5\r\nhello\r\n",
                                            b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")
    ok = _counted(sc, "200")
    out = _get(sc.port, b"/trailers-small")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"5\r\nhello\r\n0\r\n\r\n"), out
    assert _wait(lambda: _counted(sc, "200") == ok + 1)


def test_trailers_over_the_bound_after_the_response_began_cut_it_counted_incomplete(env):
    """Trailer fields were appended to the response's fields without a bound (tens of MB held)."""
    up, sc = env
    # the head and a chunk reach the client first; then the last chunk and 20 KiB of trailer fields
    # in one write, beside body data (one read: counted by the fields' bound, not the framing's)
    up.scripts[b"/trailers-big"] = pieces(CHUNKED_HEAD + b"5\r\nhello\r\n",
                                          b"3\r\nend\r\n0\r\n" + _trailers(20_000) + b"\r\n")
    cut, ok = _counted(sc, "incomplete"), _counted(sc, "200")
    too_large = sc.value(ERR, {"reason": "upstream_headers_too_large"})
    out = _get(sc.port, b"/trailers-big")
    assert out.startswith(b"HTTP/1.1 200 ") and b"hello" in out
    assert not out.endswith(b"0\r\n\r\n"), out[-40:]   # cut: the client can tell it is incomplete
    assert _wait(lambda: _counted(sc, "incomplete") == cut + 1)
    assert sc.value(ERR, {"reason": "upstream_headers_too_large"}) == too_large + 1
    assert _counted(sc, "200") == ok


def test_trailers_over_the_bound_with_the_whole_response_in_one_read_counted_as_what_the_client_got(env):
    up, sc = env
    up.scripts[b"/trailers-one-read"] = pieces(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n" + _trailers(8_000) + b"\r\n")
    before = {c: _counted(sc, c) for c in ("200", "502", "incomplete")}
    too_large = sc.value(ERR, {"reason": "upstream_headers_too_large"})
    out = _get(sc.port, b"/trailers-one-read")
    # whole in one read, nothing has left yet: a 502; over several reads, the head may have: a cut 200
    code = "502" if out.startswith(b"HTTP/1.1 502 ") else "incomplete"
    if code == "incomplete":
        assert out.startswith(b"HTTP/1.1 200 ") and not out.endswith(b"0\r\n\r\n")
    assert _wait(lambda: _counted(sc, code) == before[code] + 1)
    assert sc.value(ERR, {"reason": "upstream_headers_too_large"}) == too_large + 1
    assert _counted(sc, "200") == before["200"]


def test_a_trailer_field_that_never_ends_is_cut_at_the_bound_not_held(env):
    """`0\\r\\nX: ` and then megabytes: httptools holds a field until it ends; it was held without bound."""
    up, sc = env
    sent = [0]

    def endless(c: socket.socket) -> None:
        c.sendall(CHUNKED_HEAD + b"5\r\nhello\r\n")
        time.sleep(0.15)
        c.sendall(b"0\r\nX-Endless: ")
        try:
            for _ in range(256):   # up to 4 MiB, 16 KiB at a time
                c.sendall(b"e" * 16384)
                sent[0] += 16384
                time.sleep(0.005)
        except OSError:
            pass

    up.scripts[b"/trailer-endless"] = endless
    cut = _counted(sc, "incomplete")
    too_large = sc.value(ERR, {"reason": "upstream_headers_too_large"})
    out = _get(sc.port, b"/trailer-endless")
    assert out.startswith(b"HTTP/1.1 200 ") and b"hello" in out and not out.endswith(b"0\r\n\r\n")
    assert _wait(lambda: _counted(sc, "incomplete") == cut + 1)
    assert sc.value(ERR, {"reason": "upstream_headers_too_large"}) == too_large + 1
    assert sent[0] < 1 << 20, sent[0]   # the proxy closed the upstream connection near the bound


def test_chunk_lines_without_data_that_never_end_are_cut_too(env):
    up, sc = env

    def endless(c: socket.socket) -> None:
        c.sendall(CHUNKED_HEAD + b"5\r\nhello\r\n")
        time.sleep(0.15)
        c.sendall(b"5;ext=")
        try:
            for _ in range(256):
                c.sendall(b"x" * 16384)
                time.sleep(0.005)
        except OSError:
            pass

    up.scripts[b"/chunk-line-endless"] = endless
    too_large = sc.value(ERR, {"reason": "upstream_headers_too_large"})
    out = _get(sc.port, b"/chunk-line-endless")
    assert out.startswith(b"HTTP/1.1 200 ") and not out.endswith(b"0\r\n\r\n")
    assert _wait(lambda: sc.value(ERR, {"reason": "upstream_headers_too_large"}) == too_large + 1)


def test_a_long_chunked_stream_is_not_mistaken_for_framing(env):
    """Many reads of body data (chunks larger than the bound, over many reads) are never refused."""
    up, sc = env
    chunk = b"c" * (3 * LIMIT)

    def stream(c: socket.socket) -> None:
        c.sendall(CHUNKED_HEAD)
        for _ in range(5):
            c.sendall(b"%x\r\n" % len(chunk))
            for i in range(0, len(chunk), 1000):
                c.sendall(chunk[i:i + 1000])
            c.sendall(b"\r\n")
        c.sendall(b"0\r\n\r\n")

    up.scripts[b"/long-stream"] = stream
    ok = _counted(sc, "200")
    out = _get(sc.port, b"/long-stream")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"0\r\n\r\n")
    assert out.count(b"c") >= 5 * len(chunk)
    assert _wait(lambda: _counted(sc, "200") == ok + 1)
