"""One upstream answer: status and headers at once, the body as it arrives, bounded in memory."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy
from yarl import URL

from revive.proxy.upstream.errors import NoAnswer

if TYPE_CHECKING:
    from revive.proxy.upstream.connection import UpstreamConnection

HIGH_WATER = 256 * 1024
"""Buffered body bytes at which the connection stops reading (the worker reads too slowly)."""
LOW_WATER = 64 * 1024


class UpstreamResponse:
    """An answer whose body is still arriving on its connection, or has fully arrived.

    Once the whole body has arrived the connection goes back to the pool at once; the
    body stays here until it is read. Closing an answer whose body is still arriving closes
    its connection, which cannot carry another request before that body ends.
    """

    __slots__ = (
        "status", "reason", "headers", "url", "content_length",
        "_chunks", "_size", "_eof", "_error", "_waiter", "_conn",
    )

    def __init__(
        self,
        conn: UpstreamConnection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        url: URL,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.url = url
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._error: NoAnswer | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn: UpstreamConnection | None = conn

    # -- fed by the connection ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._conn = None
        self._wake()

    def fail(self, error: NoAnswer) -> None:
        if not self._eof:
            self._error = error
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the proxy ----------------------------------------------------------------

    def at_eof(self) -> bool:
        """The whole body has arrived (some of it may still be waiting here to be read)."""
        return self._eof

    def read_nowait(self) -> bytes:
        """Everything buffered so far, without waiting."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._resume_if_drained()
        return data

    async def readany(self) -> bytes:
        """The next piece of the body, as it arrived; ``b""`` at its end.

        Raises:
            NoAnswer: the upstream broke off or went silent before the body ended.
        """
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self._chunks.popleft()
        self._size -= len(data)
        self._resume_if_drained()
        return data

    async def read(self) -> bytes:
        """The whole body.

        Raises:
            NoAnswer: the upstream broke off or went silent before the body ended.
        """
        # Drain while waiting: a body past HIGH_WATER pauses its connection until it is read.
        parts: list[bytes] = []
        while data := await self.readany():
            parts.append(data)
        return b"".join(parts)

    def _resume_if_drained(self) -> None:
        if self._size < LOW_WATER and self._conn is not None:
            self._conn.resume_reading()

    def release(self) -> None:
        """Done with this answer: its connection is reused when the body has ended, else closed."""
        self.close()

    def close(self) -> None:
        """Drop the answer; a body still arriving takes its connection down with it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        self._chunks.clear()
        self._size = 0
