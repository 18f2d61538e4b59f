"""Stage: send one attempt upstream, translating aiohttp's failures into what they mean.

What matters for a retry decision is not *which* exception aiohttp raised but whether the
provider can have seen the request: ``NotSent`` (connect refused, DNS, connect timeout) is
always safe to repeat; ``NoAnswer`` (reset, disconnect, read timeout after sending) leaves a
mutating request's outcome unknown. ``BodyFailed`` is neither: the worker's own streamed body
broke off (too slow, too large), so the upstream never got a whole request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from revive.errors import ProblemError


class NotSent(Exception):
    """The request provably never reached the provider."""


class NoAnswer(Exception):
    """The request may have reached the provider, but no answer came back."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        self.timed_out = timed_out
        super().__init__(reason)


class BodyFailed(Exception):
    """The worker's streamed body failed mid-request; ``problem`` is what the worker is told."""

    def __init__(self, problem: ProblemError) -> None:
        self.problem = problem
        super().__init__(problem.detail)


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: bytes | AsyncIterator[bytes] | None,
) -> aiohttp.ClientResponse:
    """Send one attempt; the caller owns (and must release) the returned response.

    Raises:
        NotSent: the connection could not be established.
        NoAnswer: the connection broke or timed out after the request may have been sent.
        BodyFailed: the worker's body stream raised (aiohttp wraps that in a connection error).
    """
    try:
        return await session.request(
            method, url, headers=headers, data=body, allow_redirects=False, compress=None
        )
    except aiohttp.ConnectionTimeoutError as exc:
        raise NotSent("connect timeout") from exc
    except aiohttp.ClientConnectorError as exc:
        raise NotSent(f"connect failed ({exc.os_error.__class__.__name__})") from exc
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
        raise NoAnswer("the upstream did not answer in time", timed_out=True) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise NoAnswer("the upstream closed the connection without answering") from exc
    except aiohttp.ClientPayloadError as exc:
        raise NoAnswer("the upstream sent a malformed answer") from exc
    except aiohttp.ClientConnectionError as exc:
        if isinstance(exc.__cause__, ProblemError):
            raise BodyFailed(exc.__cause__) from None
        raise NoAnswer("the upstream connection failed") from exc
