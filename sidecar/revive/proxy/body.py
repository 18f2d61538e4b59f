"""Stage: take the worker's request body, bounded.

Small bodies are buffered so the request can be replayed after a refresh or a transient
failure; large ones stream straight through (one attempt only). Either way no more than
``max_request_bytes`` is accepted: a known oversize answers 413 before anything is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from revive.config import LimitsConfig
from revive.errors import PayloadTooLarge


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


async def read_body(request: web.Request, limits: LimitsConfig) -> RequestBody:
    """Read (or prepare to stream) the request body within the configured limits.

    Raises:
        PayloadTooLarge: the declared or actual size exceeds ``max_request_bytes``.
    """
    if not request.body_exists:
        return EMPTY_BODY
    length = request.content_length
    limit = limits.max_request_bytes
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}", limit=limit)
        if length > limits.replay_buffer_bytes:
            return RequestBody(None, _stream(request, limit))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", limit=limit)
        chunks.append(chunk)
    return RequestBody(b"".join(chunks))


async def _stream(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes", limit=limit)
        yield chunk
