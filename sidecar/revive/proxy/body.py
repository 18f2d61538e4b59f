"""Stage: take the worker's request body, bounded in size and in time.

Small bodies are buffered so the request can be replayed after a refresh or a transient
failure; large ones stream straight through (one attempt only). Either way no more than
``max_request_bytes`` is accepted: a known oversize answers 413 before anything is read.
The whole body must arrive within ``request_body_timeout_seconds`` of the first read: a
worker dribbling bytes (slowloris) is cut off instead of holding a handler, and an
upstream connection, for as long as it likes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from revive.config import LimitsConfig
from revive.errors import BadRequest, PayloadTooLarge, body_too_slow


@dataclass(slots=True)
class RequestBody:
    """What will be sent upstream: replayable bytes, a one-shot stream, or nothing."""

    data: bytes | None
    stream: AsyncIterator[bytes] | None = None

    @property
    def replayable(self) -> bool:
        return self.stream is None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        return self.stream if self.stream is not None else self.data


EMPTY_BODY = RequestBody(None)


def _too_slow(limits: LimitsConfig) -> BadRequest:
    return body_too_slow(limits.request_body_timeout_seconds)


async def read_body(request: web.Request, limits: LimitsConfig) -> RequestBody:
    """Read (or prepare to stream) the request body within the configured limits.

    Raises:
        PayloadTooLarge: the declared or actual size exceeds ``max_request_bytes``.
        BadRequest: the body did not arrive within ``request_body_timeout_seconds``.
    """
    if not request.body_exists:
        return EMPTY_BODY
    length = request.content_length
    limit = limits.max_request_bytes
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}", limit=limit)
        if length > limits.replay_buffer_bytes:
            return RequestBody(None, _stream(request, limits, _deadline(limits)))
    if request.content.is_eof():
        # The usual small body arrived with the headers: nothing to wait for, so no timer
        # (arming one costs a few microseconds on every POST).
        return RequestBody(await _buffer(request, limit))
    try:
        async with asyncio.timeout_at(_deadline(limits)):
            return RequestBody(await _buffer(request, limit))
    except TimeoutError:
        raise _too_slow(limits) from None


def _deadline(limits: LimitsConfig) -> float:
    return asyncio.get_running_loop().time() + limits.request_body_timeout_seconds


async def _buffer(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream(
    request: web.Request, limits: LimitsConfig, deadline: float
) -> AsyncIterator[bytes]:
    size, limit = 0, limits.max_request_bytes
    while True:
        try:  # never yield inside the timeout: the consumer's time is not the worker's
            async with asyncio.timeout_at(deadline):
                chunk = await request.content.readany()
        except TimeoutError:
            raise _too_slow(limits) from None
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", limit=limit)
        yield chunk
