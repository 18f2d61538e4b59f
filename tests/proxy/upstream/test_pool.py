"""The pool: keep-alive reuse, its bound, idle expiry, and what frees a connection's place."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

import revive.proxy.upstream.connection as connection_module
from revive.proxy.upstream import (
    NoAnswer,
    NotSent,
    PoolStats,
    StaleConnection,
    UpstreamResponse,
)
from tests.proxy.upstream.servers import (
    WAIT,
    Peer,
    RawServer,
    eventually,
    fetch,
    keep_answering,
    serving,
    then_silent,
    upstream,
)


async def test_sequential_requests_share_one_connection() -> None:
    """Keep-alive is the point of the pool: the server sees one connection for three requests."""
    peers: set[object] = set()

    async def handle(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(text=f"hi {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    async with serving(app) as url, upstream() as client:
        for n in range(3):
            resp, body = await fetch(client, url / f"n{n}")
            assert (resp.status, body) == (200, f"hi /n{n}".encode())
        assert len(peers) == 1
        assert client.stats == PoolStats(open=1, idle=1)


async def test_limit_bounds_concurrent_connections() -> None:
    """Ten requests through a pool of two: at most two connections, and all ten answered."""

    async def slow(peer: Peer) -> None:
        while True:
            await peer.request()
            await asyncio.sleep(0.05)
            await peer.answer(str(peer.index).encode())

    async with RawServer(slow) as server, upstream(limit=2) as client:
        results = await asyncio.gather(*(fetch(client, server.url) for _ in range(10)))
        assert [resp.status for resp, _ in results] == [200] * 10
        assert server.peak == 2
        assert server.connections == 2
        assert client.stats == PoolStats(open=2, idle=2)


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    """A request cancelled while it waits for a place must not swallow the next wake-up."""
    gate = asyncio.Event()

    async def gated(peer: Peer) -> None:
        while True:
            await peer.request()
            await gate.wait()
            await peer.answer()

    async with RawServer(gated) as server, upstream(limit=1) as client:
        first = asyncio.create_task(fetch(client, server.url))
        await eventually(lambda: len(server.requests) == 1)
        second = asyncio.create_task(fetch(client, server.url))
        third = asyncio.create_task(fetch(client, server.url))
        await asyncio.sleep(0.05)
        second.cancel()
        gate.set()
        (resp1, _), (resp3, _) = await asyncio.wait_for(asyncio.gather(first, third), WAIT)
        assert resp1.status == resp3.status == 200
        assert second.cancelled()
        assert server.connections == 1


async def test_idle_connection_expires_after_keepalive_timeout() -> None:
    """An idle connection is closed after ``keepalive_timeout``; the next request opens anew."""
    closed = asyncio.Event()

    async def answer_then_watch(peer: Peer) -> None:
        await peer.request()
        await peer.answer()
        if peer.index == 1:
            assert await peer.until_closed() == b""
            closed.set()
        else:
            await keep_answering(peer)

    async with RawServer(answer_then_watch) as server, upstream(keepalive_timeout=0.2) as client:
        loop = asyncio.get_running_loop()
        await fetch(client, server.url)
        released = loop.time()
        assert client.stats == PoolStats(open=1, idle=1)
        await eventually(lambda: client.stats.open == 0, timeout=1.0)
        assert loop.time() - released >= 0.15
        await asyncio.wait_for(closed.wait(), WAIT)  # the server saw it go
        resp, _ = await fetch(client, server.url)
        assert resp.status == 200
        assert server.connections == 2


async def test_server_closing_an_idle_connection_is_noticed() -> None:
    """A provider's own idle close frees the place at once; no request ever meets it."""

    async def answer_once(peer: Peer) -> None:
        await peer.request()
        await peer.answer()
        if peer.index == 1:
            await asyncio.sleep(0.02)
            peer.close()
        else:
            await keep_answering(peer)

    async with RawServer(answer_once) as server, upstream() as client:
        await fetch(client, server.url)
        await eventually(lambda: client.stats.open == 0)
        resp, _ = await fetch(client, server.url)  # no retry_stale: it must not need one
        assert resp.status == 200


@pytest.mark.parametrize("same_write", [False, True], ids=["later", "with-the-answer"])
async def test_unsolicited_bytes_drop_the_connection(same_write: bool) -> None:
    """Bytes nobody asked for mean the connection cannot be trusted for the next request."""
    junk = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged"

    async def chatty(peer: Peer) -> None:
        await peer.request()
        if peer.index == 1:
            if same_write:
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + junk)
            else:
                await peer.answer()
                await asyncio.sleep(0.05)
                await peer.send(junk)
            await peer.until_closed()
        else:
            await peer.answer(b"fresh")
            await keep_answering(peer)

    async with RawServer(chatty) as server, upstream() as client:
        _, body = await fetch(client, server.url)
        assert body == b"ok"
        await eventually(lambda: client.stats.open == 0)
        _, body = await fetch(client, server.url)
        assert body == b"fresh"
        assert server.connections == 2


async def test_close_fails_waiters_and_closes_connections() -> None:
    """``close()``: a request waiting for a place is NotSent, one in flight gets NoAnswer."""

    async with RawServer(then_silent()) as server, upstream(limit=1) as client:
        in_flight = asyncio.create_task(client.request("GET", server.url, {}, None))
        await eventually(lambda: len(server.requests) == 1)
        waiting = asyncio.create_task(client.request("GET", server.url, {}, None))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await client.close()
        with pytest.raises(NotSent):
            await asyncio.wait_for(waiting, WAIT)
        with pytest.raises(NoAnswer):
            await asyncio.wait_for(in_flight, WAIT)
        assert client.stats == PoolStats(open=0, idle=0)
        await eventually(lambda: server.active == 0)  # the server saw its connection close
        with pytest.raises(NotSent):
            await client.request("GET", server.url, {}, None)


async def test_cancelling_a_request_frees_its_place() -> None:
    """A request cancelled while it waits for the answer gives its connection's place back."""

    async def silent_first(peer: Peer) -> None:
        if peer.index == 1:
            await peer.request()
            await peer.until_closed()
        else:
            await keep_answering(peer)

    async with RawServer(silent_first) as server, upstream(limit=1) as client:
        task = asyncio.create_task(client.request("GET", server.url, {}, None))
        await eventually(lambda: len(server.requests) == 1)
        assert client.stats.open == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.stats == PoolStats(open=0, idle=0)
        resp, body = await fetch(client, server.url)
        assert (resp.status, body) == (200, b"ok")


async def test_cancelled_just_as_the_answer_came_frees_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled after the head came but before the request returned it.

    Nobody will read that answer, so its connection (paused on a large body, where the read
    timeout does not run) must go.
    """
    task: asyncio.Task[object] | None = None

    def cancel_on_arrival(*args: Any) -> UpstreamResponse:
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)  # runs before the task resumes
        return UpstreamResponse(*args)

    async def big(peer: Peer) -> None:
        await peer.request()
        size = 4 * 1024 * 1024
        await peer.send(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        await peer.send(b"x" * size)
        await peer.until_closed()

    monkeypatch.setattr(connection_module, "UpstreamResponse", cancel_on_arrival)
    async with RawServer(big) as server, upstream() as client:
        task = asyncio.create_task(client.request("GET", server.url, {}, None))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        await eventually(lambda: client.stats.open == 0, timeout=1.0)


async def stale_on_second(peer: Peer) -> None:
    """Answer a connection's first request; close without answering its second."""
    await peer.request()
    await asyncio.sleep(0.02)  # lets two concurrent requests hold two connections
    await peer.answer()
    await peer.request()
    peer.close()


async def test_stale_keepalive_is_retried_on_a_fresh_connection() -> None:
    async with RawServer(stale_on_second) as server, upstream() as client:
        await fetch(client, server.url)
        resp, body = await fetch(client, server.url, retry_stale=True)
        assert (resp.status, body) == (200, b"ok")
        assert server.connections == 2
        assert len(server.requests) == 3  # the repeat went up once more


async def test_stale_keepalive_without_retry_raises_stale() -> None:
    async with RawServer(stale_on_second) as server, upstream() as client:
        await fetch(client, server.url)
        with pytest.raises(StaleConnection):
            await fetch(client, server.url)
        assert client.stats == PoolStats(open=0, idle=0)


async def test_a_streamed_body_is_never_sent_twice_even_when_retry_is_allowed() -> None:
    """A stream is used up by the first attempt: a repeat would send a truncated request."""

    async def upload() -> AsyncIterator[bytes]:
        yield b"part"

    async with RawServer(stale_on_second) as server, upstream() as client:
        await fetch(client, server.url)
        with pytest.raises(StaleConnection):
            await fetch(client, server.url, "POST", body=upload(), retry_stale=True)
        assert server.connections == 1
        assert len(server.requests) == 2


async def test_stale_retry_skips_other_stale_idle_connections() -> None:
    """The retry goes to a fresh connection, not to the next idle one that died alike."""
    async with RawServer(stale_on_second) as server, upstream() as client:
        await asyncio.gather(fetch(client, server.url), fetch(client, server.url))
        assert client.stats == PoolStats(open=2, idle=2)
        resp, _ = await fetch(client, server.url, retry_stale=True)
        assert resp.status == 200


async def test_fresh_connection_closed_unanswered_is_not_stale() -> None:
    """Only a *reused* connection is stale: on a fresh one the provider may have acted."""

    async def hang_up(peer: Peer) -> None:
        await peer.request()
        peer.close()

    async with RawServer(hang_up) as server, upstream() as client:
        with pytest.raises(NoAnswer) as caught:
            await fetch(client, server.url, retry_stale=True)
        assert not isinstance(caught.value, StaleConnection)
        assert not caught.value.timed_out
        assert server.connections == 1  # and it was not repeated


async def test_limit_is_over_all_hosts_and_idle_ones_make_room() -> None:
    """With the pool full, an idle connection to one host is closed to reach another."""
    gate = asyncio.Event()

    async def gated(peer: Peer) -> None:
        await peer.request()
        await gate.wait()
        await peer.answer(b"a")
        await peer.until_closed()

    async with (
        RawServer(gated) as first,
        RawServer(keep_answering) as second,
        upstream(limit=1) as client,
    ):
        busy = asyncio.create_task(fetch(client, first.url))
        await eventually(lambda: len(first.requests) == 1)
        waiting = asyncio.create_task(fetch(client, second.url))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the one place is taken
        gate.set()
        (_, a), (_, b) = await asyncio.wait_for(asyncio.gather(busy, waiting), WAIT)
        assert (a, b) == (b"a", b"ok")
        await eventually(lambda: first.active == 0)  # its idle connection made the room
        assert client.stats == PoolStats(open=1, idle=1)
        _, b = await fetch(client, second.url)
        assert second.connections == 1
