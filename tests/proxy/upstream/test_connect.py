"""Connecting: failures are NotSent (never reached the provider), and TLS verifies by default."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web
from yarl import URL

from revive.proxy.upstream import NotSent, PoolStats
from revive.proxy.upstream.response import HIGH_WATER
from tests.proxy.upstream.servers import (
    ONE_READ,
    Peer,
    RawServer,
    Tls,
    fetch,
    keep_answering,
    serving,
    upstream,
)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_refused_connection_is_not_sent() -> None:
    port = await asyncio.to_thread(free_port)
    async with upstream(limit=1) as client:
        for _ in range(2):  # the failed attempt gave its place back
            with pytest.raises(NotSent, match="connect failed"):
                await fetch(client, URL(f"http://127.0.0.1:{port}/"))
        assert client.stats == PoolStats(open=0, idle=0)


async def silent(peer: Peer) -> None:
    await peer.until_closed()


async def test_tls_handshake_that_never_completes_times_out_as_not_sent() -> None:
    """A plain TCP server that never speaks: TLS waits for a ServerHello that never comes."""
    async with RawServer(silent) as server, upstream(limit=1, connect_timeout=0.3) as client:
        url = server.url.with_scheme("https")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NotSent) as caught:
            await fetch(client, url)
        elapsed = loop.time() - started
        assert str(caught.value) == "connect timeout"
        assert 0.25 <= elapsed < 0.9
        assert client.stats == PoolStats(open=0, idle=0)
        assert server.connections == 1


async def test_connect_timeout_gives_the_place_back() -> None:
    async with (
        RawServer(silent) as mute,
        RawServer(keep_answering) as good,
        upstream(limit=1, connect_timeout=0.2) as client,
    ):
        with pytest.raises(NotSent):
            await fetch(client, mute.url.with_scheme("https"))
        resp, body = await fetch(client, good.url)
        assert (resp.status, body) == (200, b"ok")


def hello_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"secure " + await request.read())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def test_tls_with_a_trusted_certificate(tls: Tls) -> None:
    async with serving(hello_app(), tls.server) as url, upstream(ssl_context=tls.client) as client:
        for _ in range(2):
            resp, body = await fetch(client, url / "x", "POST", body=b"body")
            assert (resp.status, body) == (200, b"secure body")
        assert client.stats == PoolStats(open=1, idle=1)  # kept alive over TLS too


async def test_tls_large_answer_arrives_whole(tls: Tls) -> None:
    """TLS delivers decrypted data its own way: framing and back-pressure must still hold."""
    payload = bytes(range(256)) * 8192 * 4  # 8 MiB

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    app = web.Application()
    app.router.add_get("/", big)
    async with serving(app, tls.server) as url, upstream(ssl_context=tls.client) as client:
        async with asyncio.timeout(3):
            resp = await client.request("GET", url, {}, None)
            got = bytearray()
            most = 0
            while not resp.at_eof() or len(got) < len(payload):
                await asyncio.sleep(0.005)
                buffered = resp.read_nowait()
                most = max(most, len(buffered))
                got += buffered or await resp.readany()
        assert got == payload
        assert most <= HIGH_WATER + ONE_READ
        assert client.stats == PoolStats(open=1, idle=1)


async def test_default_context_refuses_an_unknown_certificate(tls: Tls) -> None:
    """``ssl_context=None`` verifies against the system's CAs: a self-signed cert is refused."""
    async with serving(hello_app(), tls.server) as url, upstream() as client:
        with pytest.raises(NotSent, match="SSLCertVerificationError"):
            await fetch(client, url)
        assert client.stats == PoolStats(open=0, idle=0)



async def test_cancelled_while_connecting_gives_the_place_back() -> None:
    async with RawServer(silent) as server, upstream(limit=1, connect_timeout=2.0) as client:
        task = asyncio.create_task(fetch(client, server.url.with_scheme("https")))
        await asyncio.sleep(0.1)  # TCP is up, TLS waits for the server's hello
        assert client.stats == PoolStats(open=1, idle=0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.stats == PoolStats(open=0, idle=0)
