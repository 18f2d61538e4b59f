"""Time and memory: back-pressure on a slow reader, and the read timeout on a silent provider."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from revive.proxy.upstream import NoAnswer, PoolStats
from revive.proxy.upstream.response import HIGH_WATER
from tests.proxy.upstream.servers import (
    ONE_READ,
    WAIT,
    Peer,
    RawServer,
    fetch,
    keep_answering,
    then_silent,
    upstream,
)

BIG = 8 * 1024 * 1024


def big_body() -> bytes:
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB that is not one repeated byte
    return b"".join(i.to_bytes(4, "big") + block[4:] for i in range(BIG // len(block)))


async def send_big(peer: Peer) -> None:
    body = big_body()
    await peer.request()
    await peer.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    for start in range(0, len(body), 65536):
        await peer.send(body[start : start + 65536])
    await keep_answering(peer)


async def test_slow_reader_gets_the_whole_body_and_bounds_the_buffer() -> None:
    """A reader slower than the provider holds at most HIGH_WATER plus one read, not the body."""
    body = await asyncio.to_thread(big_body)
    async with RawServer(send_big) as server, upstream(read_timeout=0.3) as client:
        async with asyncio.timeout(WAIT + 2):
            resp = await client.request("GET", server.url, {}, None)
            got = bytearray()
            most = 0
            stalled = False
            while not resp.at_eof() or got != body:
                await asyncio.sleep(0.005)
                if not stalled and len(got) > BIG // 2:
                    # Idle longer than the read timeout: the wait is ours, not the provider's.
                    await asyncio.sleep(0.5)
                    stalled = True
                buffered = resp.read_nowait()
                most = max(most, len(buffered))
                got += buffered or await resp.readany()
            assert await resp.readany() == b""
        assert got == body
        assert HIGH_WATER // 2 < most <= HIGH_WATER + ONE_READ
        assert client.stats == PoolStats(open=1, idle=1)  # the connection survived the pauses
        _, tail = await fetch(client, server.url)
        assert tail == b"ok"
        assert server.connections == 1


async def test_read_collects_a_body_larger_than_the_buffer() -> None:
    """``read()`` drains as it waits; else the paused connection would never deliver the end."""
    body = await asyncio.to_thread(big_body)
    async with RawServer(send_big) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            assert await resp.read() == body


async def test_silence_mid_body_times_out() -> None:
    handler = then_silent(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    async with RawServer(handler) as server, upstream(read_timeout=0.3) as client:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            started = loop.time()
            assert await resp.readany() == b"abc"
            with pytest.raises(NoAnswer) as caught:
                await resp.readany()
        assert caught.value.timed_out
        assert 0.2 <= loop.time() - started < 0.9
        assert client.stats == PoolStats(open=0, idle=0)


async def test_silence_before_the_head_times_out() -> None:
    async with RawServer(then_silent()) as server, upstream(read_timeout=0.3) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(NoAnswer) as caught:
            await fetch(client, server.url)
        assert caught.value.timed_out
        assert 0.27 <= loop.time() - started < 0.9
        assert client.stats == PoolStats(open=0, idle=0)


async def test_timeout_on_a_reused_connection_counts_from_its_request() -> None:
    """The connection's timer was armed by an earlier request: it must not cut this one short."""

    async def second_mute(peer: Peer) -> None:
        await peer.request()
        await peer.answer()
        await peer.request()
        await peer.until_closed()

    async with RawServer(second_mute) as server, upstream(read_timeout=0.4) as client:
        loop = asyncio.get_running_loop()
        await fetch(client, server.url)
        await asyncio.sleep(0.25)  # the first request's deadline falls early in the second's
        started = loop.time()
        with pytest.raises(NoAnswer) as caught:
            await fetch(client, server.url)
        assert caught.value.timed_out
        assert 0.36 <= loop.time() - started < 1.2
        assert server.connections == 1


async def test_a_slow_but_steady_answer_does_not_time_out() -> None:
    """The read timeout bounds silence, not the whole answer: a trickle outlives it."""

    async def trickle(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.1)
            await peer.send(b"1\r\nx\r\n")
        await peer.send(b"0\r\n\r\n")
        await peer.until_closed()

    async with RawServer(trickle) as server, upstream(read_timeout=0.3) as client:
        _, body = await fetch(client, server.url)
        assert body == b"x" * 8


async def test_an_unread_answer_does_not_time_out_while_the_caller_waits() -> None:
    """A caller that has not yet read a small body is not the provider's silence."""
    async with RawServer(keep_answering) as server, upstream(read_timeout=0.2) as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            await asyncio.sleep(0.5)
            assert await resp.read() == b"ok"

