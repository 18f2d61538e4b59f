"""Answers: every way a body can be framed, and which connections can carry the next request."""

from __future__ import annotations

import asyncio

import pytest

from revive.proxy.upstream import NoAnswer, PoolStats
from tests.proxy.upstream.servers import (
    WAIT,
    Handler,
    Peer,
    RawServer,
    eventually,
    fetch,
    then_silent,
    upstream,
)


def answering(*raw: bytes, close: bool = False) -> Handler:
    """A handler that answers every request with exactly these bytes (written one by one)."""

    async def handle(peer: Peer) -> None:
        while True:
            await peer.request()
            for piece in raw:
                await peer.send(piece)
                await asyncio.sleep(0.005)
            if close:
                peer.close()
                return

    return handle


@pytest.mark.parametrize(
    ("raw", "status", "body"),
    [
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"], 200, b"hello"),
        ([b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhe", b"llo"], 201, b"hello"),
        (
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
             b"6\r\n world\r\n", b"0\r\n\r\n"],
            200,
            b"hello world",
        ),
        (
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n"
             b"X-Trailer: t\r\n\r\n"],
            200,
            b"abc",
        ),
        ([b"HTTP/1.1 204 No Content\r\n\r\n"], 204, b""),
        ([b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"], 304, b""),
        (
            [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
            200,
            b"ok",
        ),
        (
            [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n"
             b"Content-Length: 2\r\n\r\nok"],
            200,
            b"ok",
        ),
    ],
    ids=["length", "length-split", "chunked", "chunk-ext-trailer", "204", "304", "100", "103"],
)
async def test_framed_answers_keep_the_connection(
    raw: list[bytes], status: int, body: bytes
) -> None:
    """A body whose end is known leaves the connection ready for the next request."""
    async with RawServer(answering(*raw)) as server, upstream() as client:
        for _ in range(2):
            resp, got = await fetch(client, server.url)
            assert (resp.status, got) == (status, body)
            assert "Link" not in resp.headers  # an interim answer's headers are not the answer's
        assert server.connections == 1
        assert client.stats == PoolStats(open=1, idle=1)


async def test_status_headers_and_reason_arrive_byte_by_byte() -> None:
    """A head split anywhere (even inside the reason) parses the same."""
    raw = (
        b"HTTP/1.1 418 I'm a teapot\r\nSet-Cookie: a=1\r\nX-Thing: x\r\n"
        b"set-cookie: b=2\r\nContent-Length: 3\r\n\r\ntea"
    )

    async def trickle(peer: Peer) -> None:
        await peer.request()
        for i in range(len(raw)):
            await peer.send(raw[i : i + 1])
        await peer.until_closed()

    async with RawServer(trickle) as server, upstream() as client:
        resp, body = await fetch(client, server.url)
        assert (resp.status, resp.reason, body) == (418, "I'm a teapot", b"tea")
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]  # duplicates kept, in order
        assert [name for name, _ in resp.headers.items()] == [
            "Set-Cookie", "X-Thing", "set-cookie", "Content-Length",
        ]
        assert resp.content_length == 3
        assert resp.url == server.url


async def test_body_until_close() -> None:
    """No length and not chunked: the body is everything until the server closes."""
    handler = answering(b"HTTP/1.1 200 OK\r\n\r\nabc", b"def", close=True)
    async with RawServer(handler) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            assert resp.content_length is None
            assert not resp.at_eof()
            assert await resp.read() == b"abcdef"
            assert resp.at_eof()
        assert client.stats == PoolStats(open=0, idle=0)  # it ended with its connection


async def test_head_answer_has_no_body_whatever_its_length() -> None:
    """A HEAD answer's Content-Length describes a GET's body: no byte of it follows."""
    handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    async with RawServer(handler) as server, upstream() as client:
        resp, body = await fetch(client, server.url, "HEAD")
        assert (resp.status, resp.content_length, body) == (200, 1000, b"")
        await eventually(lambda: client.stats.open == 0)  # retired, not reused
        resp, _ = await fetch(client, server.url, "HEAD")
        assert server.connections == 2


@pytest.mark.parametrize(
    ("raw", "closes"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", False),
    ],
    ids=["close", "http1.0", "http1.0-keep-alive"],
)
async def test_connection_close_is_honoured(raw: bytes, closes: bool) -> None:
    async with RawServer(answering(raw)) as server, upstream() as client:
        for _ in range(2):
            _, body = await fetch(client, server.url)
            assert body == b"ok"
        assert server.connections == (2 if closes else 1)


async def test_release_before_the_body_ends_closes_the_connection() -> None:
    """A half-read body cannot be skipped: its connection goes, the next request gets another."""

    async def half(peer: Peer) -> None:
        await peer.request()
        if peer.index == 1:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
            assert await peer.until_closed() == b""
        else:
            await peer.answer()

    async with RawServer(half) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            assert await resp.readany() == b"part"
        resp.release()
        assert client.stats == PoolStats(open=0, idle=0)
        _, body = await fetch(client, server.url)
        assert body == b"ok"


async def test_read_nowait_and_readany_share_one_body() -> None:
    handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc", b"def")
    async with RawServer(handler) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            got = await resp.readany()
            await eventually(resp.at_eof)
            got += resp.read_nowait()
            assert got == b"abcdef"
            assert resp.read_nowait() == b""
            assert await resp.readany() == b""  # and again: the end stays the end
            assert await resp.readany() == b""
            resp.release()


async def test_broken_off_body_delivers_what_came_then_raises() -> None:
    handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500, close=True)
    async with RawServer(handler) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            got = b""
            with pytest.raises(NoAnswer) as caught:
                while True:
                    got += await resp.readany()
            assert got == b"x" * 500
            assert not caught.value.timed_out
            assert not resp.at_eof()
            with pytest.raises(NoAnswer):
                await resp.read()
        assert client.stats == PoolStats(open=0, idle=0)


async def test_reset_during_a_body_until_close_is_no_whole_answer() -> None:
    """A reset is not an end: only a clean close ends a body that had no length."""

    async def reset(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await asyncio.sleep(0.05)
        peer.reset()

    async with RawServer(reset) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            with pytest.raises(NoAnswer):
                await resp.read()


async def test_client_close_during_a_body_until_close_is_no_whole_answer() -> None:
    """Closing the client cuts the body short: the reader must not take that for its end."""

    handler = then_silent(b"HTTP/1.1 200 OK\r\n\r\npartial")
    async with RawServer(handler) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            assert await resp.readany() == b"partial"
            await client.close()
            with pytest.raises(NoAnswer):
                await resp.readany()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 abc Bad\r\n\r\n",
        b"not http at all\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["status", "garbage", "length-and-chunked", "negative-length", "header", "upgrade"],
)
async def test_malformed_answer_is_no_answer(raw: bytes) -> None:
    async with RawServer(answering(raw)) as server, upstream() as client:
        with pytest.raises(NoAnswer) as caught:
            await fetch(client, server.url)
        assert not caught.value.timed_out
        assert client.stats == PoolStats(open=0, idle=0)


async def test_malformed_chunk_after_the_head_fails_the_body() -> None:
    handler = answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    async with RawServer(handler) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            assert resp.status == 200
            got = b""
            with pytest.raises(NoAnswer):
                while True:
                    got += await resp.readany()
            assert got == b"abc"
        assert client.stats == PoolStats(open=0, idle=0)


async def test_closing_an_answer_wakes_its_reader() -> None:
    """A reader waiting on a body its answer was closed under is told, not left waiting."""

    handler = then_silent(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    async with RawServer(handler) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            resp = await client.request("GET", server.url, {}, None)
            reader = asyncio.create_task(resp.readany())
            await asyncio.sleep(0.02)
            resp.close()
            with pytest.raises(NoAnswer):
                await reader
        assert client.stats == PoolStats(open=0, idle=0)


def endless_header_lines(trailers: bool) -> Handler:
    """An answer whose head (or chunked trailer) never ends: one header line after another."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        if trailers:
            await peer.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
            )
        else:
            await peer.send(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Filler: " + b"v" * 1000 + b"\r\n"
        for _ in range(1000):  # about 1 MB, far past MAX_HEAD_BYTES
            await peer.send(line * 16)
        await peer.until_closed()

    return handle


@pytest.mark.parametrize("trailers", [False, True], ids=["head", "trailers"])
async def test_a_head_or_trailer_that_never_ends_is_cut_off(trailers: bool) -> None:
    """llhttp would gather every header line in memory: past MAX_HEAD_BYTES the answer fails."""
    async with RawServer(endless_header_lines(trailers)) as server, upstream() as client:
        async with asyncio.timeout(WAIT):
            with pytest.raises(NoAnswer) as caught:
                resp = await client.request("GET", server.url, {}, None)
                assert await resp.readany() == b"abc"
                await resp.read()
        assert not caught.value.timed_out
        assert client.stats == PoolStats(open=0, idle=0)


async def test_trailers_are_not_added_to_the_headers() -> None:
    handler = answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with RawServer(handler) as server, upstream() as client:
        resp, body = await fetch(client, server.url)
        assert body == b"abc"
        assert resp.headers["X-A"] == "1"
        assert "X-Trailer" not in resp.headers
