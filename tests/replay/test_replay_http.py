"""The replay HTTP client on local servers: keep-alive, chunked bodies, TLS."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import pytest

from sentinel.replay.http import Connection, HttpError, Target, build_head


async def _serve_once(handler, ssl_ctx=None):
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_ctx)
    return srv, srv.sockets[0].getsockname()[1]


def test_keep_alive_and_chunked_bodies():
    async def main():
        async def handler(reader, writer):
            for body in (b"hello", None):
                await reader.readuntil(b"\r\n\r\n")
                if body is not None:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
                else:
                    writer.write(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                await writer.drain()
            writer.close()

        srv, port = await _serve_once(handler)
        t = Target.parse(f"http://127.0.0.1:{port}")
        conn = Connection(t)
        head = build_head(t, "POST", "/x", {"X-Sentinel-Canary": "1"}, 0)
        assert b"POST /x HTTP/1.1\r\n" in head and b"X-Sentinel-Canary: 1\r\n" in head
        r1 = await conn.request(head, b"")
        r2 = await conn.request(head, b"")
        conn.close()
        srv.close()
        return r1, r2

    r1, r2 = asyncio.run(main())
    assert (r1.status, r1.body) == (200, b"hello")
    assert (r2.status, r2.body) == (503, b"abcde")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_targets_speak_tls_and_check_certificates(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-subj", "/CN=localhost", "-days", "1"], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def main():
        async def handler(reader, writer):
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            writer.close()

        srv, port = await _serve_once(handler, ctx)
        t = Target.parse(f"https://127.0.0.1:{port}")
        try:
            await Connection(t).request(build_head(t, "GET", "/", {}, 0), b"")
        finally:
            srv.close()

    with pytest.raises(HttpError) as exc:
        asyncio.run(main())
    # A self-signed certificate is refused: the client did speak TLS, and verified it.
    assert exc.value.kind == "tls" and "certificate" in str(exc.value).lower()


@pytest.mark.parametrize("answer,kind", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\nxx", "too_large"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nxx", "protocol"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n", "protocol"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\nxx", "too_large"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 150 + b"\r\n", "protocol"),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", "protocol"),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000, "too_large"),   # body to EOF, over the (lowered) bound
])
def test_a_hostile_response_is_a_bounded_error_not_a_crash_or_unbounded_read(monkeypatch, answer, kind):
    # A bad Content-Length or chunk size raised ValueError out of the replay (a traceback; in the
    # daemon's canary, a dead task); a huge one was read into memory whatever its size.
    from sentinel.replay import http

    monkeypatch.setattr(http, "MAX_RESPONSE_BYTES", 4096)

    async def main():
        async def handler(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        srv, port = await _serve_once(handler)
        t = Target.parse(f"http://127.0.0.1:{port}")
        conn = Connection(t)
        try:
            with pytest.raises(HttpError) as info:
                await asyncio.wait_for(conn.request(build_head(t, "POST", "/x", {}, 0), b""), 10)
        finally:
            conn.close()
            srv.close()
        return info.value

    assert asyncio.run(main()).kind == kind


def test_a_request_resent_after_the_server_closed_the_connection_is_counted():
    # The server reads the second request and closes without answering: the client resends it
    # on a fresh connection (right for an idle keep-alive close), and said nothing of it.
    async def main():
        calls = []

        async def handler(reader, writer):
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                calls.append(1)
                if len(calls) == 2:
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            writer.close()

        srv, port = await _serve_once(handler)
        t = Target.parse(f"http://127.0.0.1:{port}")
        conn = Connection(t)
        head = build_head(t, "POST", "/x", {}, 0)
        got = [(await conn.request(head, b"")).body for _ in range(2)]
        conn.close()
        srv.close()
        return got, conn.retries, len(calls)

    got, retries, calls = asyncio.run(main())
    assert got == [b"ok", b"ok"] and calls == 3 and retries == 1
