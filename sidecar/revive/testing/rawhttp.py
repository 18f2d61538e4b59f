"""Test helper: talk HTTP/1.1 over a bare socket, for bytes no HTTP client agrees to send.

aiohttp (like every decent client) refuses a CR, LF or NUL in a header or a path, and
rewrites absolute-form targets; a hostile worker does not. ``exchange`` writes exactly the
bytes given, then reads until the server closes, bounded in time and in bytes, and parses
what came back just enough to assert on.

    answer = await exchange("127.0.0.1", port, b"GET /\\x00 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    assert answer.status == 400 and answer.closed
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

__all__ = [
    "RawAnswer", "exchange", "open_raw", "parse_answer", "read_until_close", "request_bytes",
]

_READ_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """What the server sent before closing: the raw bytes and a lenient parse of them."""

    raw: bytes
    status: int | None
    """None when the server closed without a status line."""
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    closed: bool = True
    """The server closed the connection (EOF or reset) rather than the read limit ending it."""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str, target: str | bytes, headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    body: bytes = b"",
) -> bytes:
    """Assemble a request from exactly these bytes: nothing is validated or escaped."""

    def b(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("latin-1")

    lines = [b(method) + b" " + b(target) + b" HTTP/1.1"]
    lines += [b(name) + b": " + b(value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse_answer(raw: bytes, closed: bool = True) -> RawAnswer:
    """Parse a status line, headers and (Content-Length or chunked) body, leniently."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):  # HTTP/0.9 too: aiohttp answers in kind
        return RawAnswer(raw, None, closed=closed)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    body = rest
    if "Content-Length" in headers:
        body = rest[: int(headers["Content-Length"])]
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(rest)
    return RawAnswer(raw, int(parts[1]), headers, body, closed)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";", 1)[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


@contextlib.asynccontextmanager
async def open_raw(
    host: str, port: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A bare connection, closed on exit whatever happened."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_until_close(
    reader: asyncio.StreamReader, limit: int = _READ_LIMIT
) -> tuple[bytes, bool]:
    """Everything up to EOF or a reset (closed=True), or ``limit`` bytes (closed=False)."""
    data = bytearray()
    try:
        while len(data) < limit:
            chunk = await reader.read(min(65536, limit - len(data)))
            if not chunk:
                return bytes(data), True
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return bytes(data), True
    return bytes(data), False


async def exchange(
    host: str, port: int, data: bytes, *, within: float = 10.0, limit: int = _READ_LIMIT
) -> RawAnswer:
    """Write ``data`` (tolerating a server that hangs up mid-write), read until it closes.

    Raises:
        TimeoutError: the server neither answered-and-closed nor closed within ``within``
            seconds: for a hostile input, a hang is the failure being tested for.
    """
    async with asyncio.timeout(within), open_raw(host, port) as (reader, writer):
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused before we finished: the answer (if any) is still in the buffer
        raw, closed = await read_until_close(reader, limit)
    return parse_answer(raw, closed)
