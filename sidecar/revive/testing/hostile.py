"""Test helper: an upstream that misbehaves on purpose, and a process-memory gauge.

The fake Microsoft provider (``revive.lab.provider``) answers like the real one; a hostile
upstream does not: it redirects to other hosts, to ``file:`` and to the cloud metadata
address, redirects forever, and answers errors whose gzip body inflates to gigabytes. The
sidecar must refuse or bound each of these, so the hostile-input suite points a connection
at this app on 127.0.0.1.

Routes (under ``/api/``):
- ``redirect?to=LOCATION`` -> 302 to exactly ``LOCATION``;
- ``hop/{n}`` -> 302 to ``hop/{n+1}``: a same-host redirect chain without end;
- ``bomb/{status}[?chunked=1]`` -> ``status`` with ``Content-Encoding: gzip`` and the bomb;
- anything else -> 200 ``{"ok": true}``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

__all__ = ["HostileUpstream", "PeakRss", "gzip_bomb", "running_hostile_upstream"]

_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def gzip_bomb(expanded: int, block: int = 1 << 20) -> bytes:
    """A valid one-member gzip body of ``expanded`` zero bytes (about 1/1000 of that in size).

    One compressed block of zeros ends on a full flush, so it is byte-aligned and stands
    alone: repeating it is a valid deflate stream, built in milliseconds instead of the
    seconds it takes to deflate gigabytes.
    """
    count = expanded // block
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = deflate.compress(bytes(block)) + deflate.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    zeros, crc = bytes(block), 0
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    trailer = struct.pack("<II", crc, (block * count) & 0xFFFFFFFF)
    return _GZIP_HEADER + segment * count + final + trailer


@dataclass
class HostileUpstream:
    """The app and what reached it (method, path and headers of every request)."""

    bomb: bytes
    url: str = ""
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.method, request.path_qs, dict(request.headers)))
        parts = request.match_info["tail"].removeprefix("api/").split("/")
        if parts[0] == "redirect":
            return web.Response(status=302, headers={"Location": request.query["to"]})
        if parts[0] == "hop":
            return web.Response(status=302, headers={"Location": f"/api/hop/{int(parts[1]) + 1}"})
        if parts[0] == "bomb":
            return await self._bomb(request, int(parts[1]))
        return web.json_response({"ok": True})

    async def _bomb(self, request: web.Request, status: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=status)
        resp.headers["Content-Encoding"] = "gzip"
        resp.headers["Content-Type"] = "application/json"
        if status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        if request.query.get("chunked") != "1":
            resp.content_length = len(self.bomb)
        await resp.prepare(request)
        for start in range(0, len(self.bomb), 65536):
            await resp.write(self.bomb[start : start + 65536])
        await resp.write_eof()
        return resp


@asynccontextmanager
async def running_hostile_upstream(bomb: bytes) -> AsyncIterator[HostileUpstream]:
    """Serve a ``HostileUpstream`` on 127.0.0.1 port 0; stop it on exit."""
    upstream = HostileUpstream(bomb)
    runner = web.AppRunner(upstream.app())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield upstream
    finally:
        await runner.cleanup()


class PeakRss:
    """Peak resident memory of this process since the last ``reset`` (Linux ``VmHWM``).

    The sidecar under test runs in this process, so a body it inflated or buffered shows
    up here even if it was freed again before the measurement. Blocking file I/O on
    ``/proc``: call it through ``asyncio.to_thread``.
    """

    _status = Path("/proc/self/status")

    def reset(self) -> None:
        # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")

    def kilobytes(self, name: str = "VmHWM") -> int:
        for line in self._status.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{name} is not in {self._status}")
