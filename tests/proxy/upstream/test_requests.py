"""Requests: the head and body the provider receives, and a body that fails or is cut short."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from multidict import CIMultiDict

from revive.errors import BadRequest, PayloadTooLarge
from revive.proxy.upstream import BodyFailed, InvalidHeader, NoAnswer, PoolStats
from tests.proxy.upstream.servers import (
    WAIT,
    Peer,
    RawServer,
    eventually,
    fetch,
    keep_answering,
    upstream,
)


async def pieces(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if pause:
            await asyncio.sleep(pause)
        yield part


@pytest.mark.parametrize("size", [5, 64 * 1024, 3 * 1024 * 1024], ids=["small", "edge", "large"])
async def test_bytes_body_is_sent_with_its_length(size: int) -> None:
    body = (bytes(range(251)) * (size // 251 + 1))[:size]
    async with RawServer(keep_answering) as server, upstream() as client:
        resp, _ = await fetch(client, server.url / "up", "PUT", body=body)
        assert resp.status == 200
        (got,) = server.requests
        assert (got.method, got.target, got.body, got.chunked) == ("PUT", "/up", body, False)
        assert got.headers.getall("Content-Length") == [str(size)]


async def test_streamed_body_is_sent_chunked() -> None:
    """An empty piece from the stream must not end the chunked body early (``0`` chunk)."""
    async with RawServer(keep_answering) as server, upstream() as client:
        body = pieces(b"hello", b"", b" ", b"world", pause=0.01)
        resp, _ = await fetch(client, server.url, "POST", body=body)
        assert resp.status == 200
        (got,) = server.requests
        assert (got.body, got.chunked) == (b"hello world", True)
        assert "Content-Length" not in got.headers
        assert client.stats == PoolStats(open=1, idle=1)  # a whole exchange: kept alive


async def test_large_streamed_body_waits_for_the_provider() -> None:
    """Megabytes through a slow reader: the stream waits on the socket and arrives whole."""
    blocks = [bytes([n]) * 256 * 1024 for n in range(32)]

    async def slow_reader(peer: Peer) -> None:
        await asyncio.sleep(0.2)  # lets the client's buffers fill and pause it
        await keep_answering(peer)

    async with RawServer(slow_reader) as server, upstream() as client:
        resp, _ = await fetch(client, server.url, "POST", body=pieces(*blocks))
        assert resp.status == 200
        assert server.requests[0].body == b"".join(blocks)


@pytest.mark.parametrize(
    ("method", "framing"),
    [("POST", ["0"]), ("PUT", ["0"]), ("GET", []), ("DELETE", []), ("HEAD", [])],
)
async def test_empty_body_framing(method: str, framing: list[str]) -> None:
    """POST/PUT/PATCH announce an empty body (some servers want 411 without); others do not."""

    async def answer_head(peer: Peer) -> None:
        while True:
            await peer.request()
            await peer.send(b"HTTP/1.1 204 No Content\r\n\r\n")

    async with RawServer(answer_head) as server, upstream() as client:
        await fetch(client, server.url, method)
        (got,) = server.requests
        assert got.headers.getall("Content-Length", []) == framing
        assert "Transfer-Encoding" not in got.headers


async def test_host_target_and_default_headers() -> None:
    async with RawServer(keep_answering) as server, upstream() as client:
        url = server.url.with_path("/a b/ü").with_query({"q": "x y", "n": "1"})
        await fetch(client, url)
        await fetch(client, server.url, headers=CIMultiDict({"user-agent": "mine/1.0"}))
        default, given = server.requests
        assert default.target == url.raw_path_qs
        assert default.headers.getall("Host") == [f"127.0.0.1:{server.url.port}"]
        assert default.headers.getall("User-Agent") == ["revive-sidecar"]
        assert default.headers.getall("Accept") == ["*/*"]
        assert given.headers.getall("User-Agent") == ["mine/1.0"]


async def test_header_injection_is_refused_before_anything_is_sent() -> None:
    async with RawServer(keep_answering) as server, upstream() as client:
        for headers in ({"X-A": "v\r\nX-Evil: 1"}, {"X-A": "v\0"}, {"X-A\nB": "v"}):
            with pytest.raises(InvalidHeader):
                await client.request("GET", server.url, headers, None)
        assert server.connections == 0
        assert client.stats == PoolStats(open=0, idle=0)


@pytest.mark.parametrize(
    ("error", "problem"),
    [(PayloadTooLarge, PayloadTooLarge), (OSError, BadRequest)],
    ids=["problem", "other"],
)
async def test_failing_body_stream_is_body_failed(
    error: Callable[[str], Exception],
    problem: type[Exception],
    loop_errors: list[dict[str, Any]],
) -> None:
    """The worker's stream broke: BodyFailed carries what to tell the worker; no whole request.

    And nothing is left for the loop to log (an unretrieved NoAnswer in the dropped exchange).
    """
    seen: list[bytes] = []
    raised = error("too big")

    async def record(peer: Peer) -> None:
        await peer.head()
        seen.append(await peer.until_closed())

    async def failing() -> AsyncIterator[bytes]:
        yield b"start"
        await asyncio.sleep(0.02)
        raise raised

    async with RawServer(record) as server, upstream() as client:
        with pytest.raises(BodyFailed) as caught:
            await fetch(client, server.url, "POST", body=failing())
        assert isinstance(caught.value.problem, problem)
        if isinstance(raised, PayloadTooLarge):
            assert caught.value.problem is raised
        assert client.stats == PoolStats(open=0, idle=0)
        await eventually(lambda: bool(seen))
        assert seen == [b"5\r\nstart\r\n"]  # cut off: never the last chunk
    del caught, raised  # their tracebacks hold the exchange
    await asyncio.sleep(0.05)
    gc.collect()
    assert not loop_errors


REFUSAL = b"HTTP/1.1 413 Too Large\r\nConnection: close\r\nContent-Length: 4\r\n\r\nnope"


async def endless_body(pause: float = 0.0) -> AsyncIterator[bytes]:
    block = b"x" * 65536
    while True:
        if pause:
            await asyncio.sleep(pause)
        yield block


async def test_early_answer_while_the_body_is_sent() -> None:
    """A provider that refuses on the head (413) and stops reading: the caller gets the 413."""

    async def refuse(peer: Peer) -> None:
        await peer.head()
        await peer.send(REFUSAL)
        peer.writer.write_eof()
        await peer.until_closed()  # drain what still comes, as nginx's lingering close does

    async with RawServer(refuse) as server, upstream() as client:
        resp, body = await fetch(client, server.url, "POST", body=endless_body(0.001))
        assert (resp.status, body) == (413, b"nope")
        await eventually(lambda: client.stats.open == 0)  # the body was cut: not reusable


async def test_early_answer_then_a_hard_close() -> None:
    """The provider closes at once, unread body and all: the kernel may reset the connection.

    A reset can take the unread 413 with it, so NoAnswer is a legitimate outcome here; what
    must not happen is a hang, a wrong answer or a leaked place in the pool.
    """

    async def refuse(peer: Peer) -> None:
        await peer.head()
        await peer.send(REFUSAL)
        peer.close()

    async with RawServer(refuse) as server, upstream() as client:
        try:
            resp, body = await fetch(client, server.url, "POST", body=endless_body(0.001))
        except NoAnswer as exc:
            assert not exc.timed_out
        else:
            assert (resp.status, body) == (413, b"nope")
        await eventually(lambda: client.stats.open == 0)


async def test_provider_that_stops_reading_the_body_times_out() -> None:
    """Blocked on a provider that reads nothing and says nothing: that is its silence."""

    async def deaf(peer: Peer) -> None:
        await peer.head()
        await asyncio.sleep(WAIT)  # reads nothing more: the client's writes back up

    async with RawServer(deaf) as server, upstream(read_timeout=0.3) as client:
        with pytest.raises(NoAnswer) as caught:
            await fetch(client, server.url, "POST", body=endless_body())
        assert caught.value.timed_out
        assert client.stats == PoolStats(open=0, idle=0)


async def test_a_slow_worker_body_is_not_the_providers_silence() -> None:
    """Waiting on the worker's stream is not the provider being silent: no read timeout."""
    async with RawServer(keep_answering) as server, upstream(read_timeout=0.2) as client:
        resp, _ = await fetch(client, server.url, "POST", body=pieces(b"a", b"b", b"c", pause=0.15))
        assert resp.status == 200
        assert server.requests[0].body == b"abc"


async def test_a_provider_pause_is_timed_from_its_start() -> None:
    """The worker's slow start must not count against a provider that then reads slowly.

    The read timer fires once while the stream waits on the worker, and again soon after the
    provider stops reading for a moment (shorter than the timeout): that moment is no timeout.
    """
    blocks = [bytes([n]) * 256 * 1024 for n in range(32)]

    async def hesitant(peer: Peer) -> None:
        await peer.head()
        await peer.reader.readexactly(1)
        await asyncio.sleep(0.2)
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            data += await peer.reader.read(1 << 20)
        await peer.answer()

    async def late_then_fast() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.45)  # the timer (0.3) fires meanwhile, re-armed for 0.6
        for block in blocks:
            yield block

    async with RawServer(hesitant) as server, upstream(read_timeout=0.3) as client:
        resp, _ = await fetch(client, server.url, "POST", body=late_then_fast())
        assert resp.status == 200


async def test_close_during_a_blocked_upload_ends_it() -> None:
    """``close()`` while the body waits on a provider that stopped reading: no hang."""
    started = asyncio.Event()

    async def deaf(peer: Peer) -> None:
        await peer.head()
        started.set()
        await asyncio.sleep(WAIT)

    async with RawServer(deaf) as server, upstream(read_timeout=WAIT) as client:
        task = asyncio.create_task(client.request("POST", server.url, {}, endless_body()))
        await asyncio.wait_for(started.wait(), WAIT)
        await asyncio.sleep(0.2)  # the socket's buffers fill, the upload waits to write
        await client.close()
        with pytest.raises(NoAnswer):
            await asyncio.wait_for(task, 1.0)
        assert client.stats == PoolStats(open=0, idle=0)
