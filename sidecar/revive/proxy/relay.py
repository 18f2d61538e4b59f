"""Stage: the upstream's answer back to the worker, streamed, or read once for the ledger."""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from revive.errors import UpstreamUnavailable
from revive.proxy.headers import downstream_headers
from revive.proxy.inspect import read_prefix
from revive.proxy.upstream import NoAnswer, UpstreamResponse


async def relay(
    request: web.Request,
    resp: UpstreamResponse,
    prefix: bytes,
    complete: bool,
    location: tuple[URL, str] | None,
) -> web.StreamResponse:
    """Send the upstream answer, streaming what was not read yet.

    Args:
        location: (base URL, connection id) to rewrite a same-connection redirect with.
    """
    out: web.StreamResponse
    if not complete and resp.at_eof():
        # The whole answer arrived with its head (the usual small answer): take it now and
        # send status, headers and body in one write instead of streaming them in two.
        prefix += resp.read_nowait()
        complete = True
    if complete:  # already read: one write
        resp.release()
        out = web.Response(status=resp.status, reason=resp.reason, body=prefix)
    else:  # a body still arriving streams through as it comes
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
    headers = out.headers
    headers.extend(downstream_headers(resp.headers))  # one copy, not two
    if location is not None and "Location" in headers:
        headers["Location"] = rewrite_location(*location, resp.url, headers["Location"])
    if complete:
        return out
    if resp.content_length is not None:
        out.content_length = resp.content_length
    try:
        await out.prepare(request)
        if prefix:
            await out.write(prefix)
        while chunk := await resp.readany():
            await out.write(chunk)
    except (NoAnswer, ConnectionResetError):
        # The provider broke off with the head already sent (the only honest signal left
        # is a broken connection), or the worker left: either way nobody gets the rest.
        resp.close()
        if request.transport is not None:
            request.transport.close()
        return out
    resp.release()
    await out.write_eof()
    return out


async def read_for_ledger(resp: UpstreamResponse, limit: int) -> tuple[bytes, bool]:
    """Read an answer that the ledger stores for replay, bounded.

    Raises:
        UpstreamUnavailable: the answer broke off (the caller decides what the action is).
    """
    try:
        return await read_prefix(resp, limit)
    except NoAnswer:
        resp.close()
        raise UpstreamUnavailable("the upstream broke off its answer") from None


def rewrite_location(base: URL, connection_id: str, current: URL, location: str) -> str:
    """Point a same-connection redirect back through the sidecar; leave others absolute."""
    target = current.join(URL(location))
    base_path = base.raw_path.rstrip("/") + "/"
    if (
        target.host == base.host
        and target.port == base.port
        and target.raw_path.startswith(base_path)
    ):
        tail = target.raw_path[len(base_path) :]
        query = f"?{target.raw_query_string}" if target.raw_query_string else ""
        return f"/proxy/{connection_id}/{tail}{query}"
    return str(target)
