"""Real servers on 127.0.0.1 for the upstream client's tests: always stopped, every wait bounded.

``RawServer`` speaks bytes by hand, for answers no real server sends (malformed, stalled,
broken off, closed under a reused connection) and counts the connections it accepts, which
is how keep-alive and the pool's bound are observed; ``serving`` runs an aiohttp app for
ordinary answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from revive.proxy.upstream import UpstreamClient, UpstreamResponse

WAIT = 3.0
"""The longest any single wait in these tests may take: a bug fails the test, never hangs it."""
ONE_READ = 256 * 1024
"""The most one socket read hands the protocol (asyncio's, uvloop's and TLS's read buffers)."""


@dataclass(frozen=True)
class Tls:
    """A self-signed certificate for 127.0.0.1: a server context, and a client that trusts it."""

    server: ssl.SSLContext
    client: ssl.SSLContext


@dataclass(frozen=True)
class Received:
    """One request as the raw server read it off the wire."""

    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes
    chunked: bool


class Peer:
    """One accepted connection, as a raw server's handler drives it."""

    def __init__(
        self, server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.index = server.connections  # 1 for the first connection accepted
        self.reader = reader
        self.writer = writer

    async def request(self) -> Received:
        """Read one whole request (Content-Length or chunked body); EOF raises IncompleteRead."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name, value.strip())
        chunked = headers.get("Transfer-Encoding", "").lower() == "chunked"
        body = b""
        if chunked:
            while size := int(await self.reader.readuntil(b"\r\n"), 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            assert await self.reader.readexactly(2) == b"\r\n"
        elif "Content-Length" in headers:
            body = await self.reader.readexactly(int(headers["Content-Length"]))
        received = Received(method, target, headers, body, chunked)
        self.server.requests.append(received)
        return received

    async def head(self) -> bytes:
        """Read just the head of a request, leaving any body unread."""
        return await self.reader.readuntil(b"\r\n\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, body: bytes = b"ok", extra: str = "") -> None:
        """A keep-alive ``200`` with a Content-Length."""
        await self.send(
            f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
        )

    async def until_closed(self) -> bytes:
        """Everything the client still sends, until it closes the connection."""
        return await self.reader.read()

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """A TCP server on an ephemeral port running ``handler`` for each connection.

    A handler's own failure (an assertion about what it received) is raised again when the
    server stops, so it fails the test instead of vanishing in a task.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.connections = 0
        """Connections accepted so far."""
        self.active = 0
        self.peak = 0
        """The most connections open at once."""
        self.requests: list[Received] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.url = URL()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = URL(f"http://127.0.0.1:{port}/")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=WAIT)
        await asyncio.wait_for(self._server.wait_closed(), WAIT)
        if kind is None and self.errors:
            raise self.errors[0]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self._handler(Peer(self, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client closed, or the test is over
        except Exception as exc:  # noqa: BLE001 - kept for __aexit__ to raise
            self.errors.append(exc)
        finally:
            self.active -= 1
            writer.transport.abort()
            self._tasks.discard(task)


def then_silent(raw: bytes = b"") -> Handler:
    """A handler that reads one request, sends ``raw`` (maybe nothing), then says no more."""

    async def handle(peer: Peer) -> None:
        await peer.request()
        if raw:
            await peer.send(raw)
        await peer.until_closed()

    return handle


async def keep_answering(peer: Peer) -> None:
    """The plainest raw handler: answer every request on the connection with ``ok``."""
    while True:
        await peer.request()
        await peer.answer()


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[URL]:
    """Run ``app`` on an ephemeral port of 127.0.0.1; yield its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = runner.addresses[0][1]
        scheme = "https" if ssl_context is not None else "http"
        yield URL(f"{scheme}://127.0.0.1:{port}/")
    finally:
        await asyncio.wait_for(runner.cleanup(), WAIT)


@contextlib.asynccontextmanager
async def upstream(
    *,
    limit: int = 4,
    connect_timeout: float = 2.0,
    read_timeout: float = 2.0,
    keepalive_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[UpstreamClient]:
    """A client, closed afterwards whatever the test did."""
    client = UpstreamClient(
        limit=limit,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        keepalive_timeout=keepalive_timeout,
        ssl_context=ssl_context,
    )
    try:
        yield client
    finally:
        await client.close()


async def fetch(
    client: UpstreamClient,
    url: URL,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
    *,
    retry_stale: bool = False,
) -> tuple[UpstreamResponse, bytes]:
    """One whole exchange, bounded in time: the answer and its body, released."""
    async with asyncio.timeout(WAIT):
        resp = await client.request(method, url, headers or {}, body, retry_stale=retry_stale)
        try:
            return resp, await resp.read()
        finally:
            resp.release()


async def eventually(check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``check()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
