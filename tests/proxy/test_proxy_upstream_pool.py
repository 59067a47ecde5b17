"""The upstream pool's stale-connection check, on real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import time

import uvloop

from sentinel.proxy.upstream import UpstreamPool


def test_a_pooled_connection_the_server_closed_is_not_handed_to_a_post():
    """Before the event loop has seen the server's FIN, `check_stale` still finds it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    async def main() -> tuple[bool, bool]:
        pool = UpstreamPool("127.0.0.1", srv.getsockname()[1], 2.0, 4)
        fresh = await pool.connect()
        peer, _ = srv.accept()
        pool.release(fresh)
        assert pool.get_idle(check_stale=True) is fresh   # alive: handed out
        pool.release(fresh)
        peer.close()          # the server closes the idle keep-alive connection ...
        time.sleep(0.1)       # ... and the loop has not run since: the protocol does not know yet
        stale_for_post = pool.get_idle(check_stale=True)
        pool.close()
        return stale_for_post is None, fresh.closed

    try:
        dropped, closed = uvloop.run(main()) if hasattr(uvloop, "run") else asyncio.run(main())
    finally:
        srv.close()
    assert dropped and closed
