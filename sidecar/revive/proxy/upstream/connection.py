"""One keep-alive HTTP/1.1 connection to a provider: write a request, parse its answer.

One exchange at a time (no pipelining). The answer is parsed by llhttp (through httptools)
as bytes arrive; its head resolves the caller's wait, its body is fed to the
:class:`UpstreamResponse`, and when the body ends the connection goes back to the pool by
itself. A read timeout ("no byte from the provider for N seconds") costs one timer per
connection, re-armed only when it fires, instead of one per request or per read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from revive.errors import BadRequest, ProblemError
from revive.proxy.upstream.errors import BodyFailed, NoAnswer, StaleConnection
from revive.proxy.upstream.response import UpstreamResponse
from revive.proxy.upstream.wire import LAST_CHUNK, chunk

if TYPE_CHECKING:
    from revive.proxy.upstream.client import UpstreamClient

COALESCE_BYTES = 64 * 1024
"""A buffered body up to this size leaves in the same write as the head: one syscall."""
MAX_HEAD_BYTES = 64 * 1024
"""Most bytes of an answer's head (or trailers, or chunk framing) in a row, without body:
past it the answer is refused, since httptools would otherwise gather them all in memory."""

_NO_BODY_STATUSES = frozenset({204, 304})


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class UpstreamConnection(asyncio.Protocol):
    """The protocol of one pooled connection; the pool hands it one request at a time."""

    def __init__(
        self, pool: UpstreamClient, key: tuple[str, str, int], read_timeout: float
    ) -> None:
        self.key = key
        self.exchanges = 0
        """Answers completed on this connection; 0 means it is fresh."""
        self.idle_since = 0.0
        self.gone = False
        """Closed, by either side: never to be used again."""
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._read_timeout = read_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        # The exchange in progress.
        self._active = False
        self._url: URL | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._reason = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._interim = False
        self._head_only = False
        self._eof_framed = False
        self._answered = False
        self._sending = False
        self._reusable = True
        self._body_bytes = 0
        self._framing_run = 0
        """Bytes received since the last piece of body: the head, chunk framing, trailers."""
        # Flow control and the read timeout.
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._writable: asyncio.Future[None] | None = None

    # -- the exchange -------------------------------------------------------------------------

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        url: URL,
        head_only: bool,
    ) -> UpstreamResponse:
        """Send one request and wait for the head of its answer.

        Raises:
            NoAnswer: the connection broke or went silent before the answer's head.
            StaleConnection: a reused connection was found closed before any answer.
            BodyFailed: the worker's body stream raised; the connection is closed.
        """
        transport = self._transport
        if self.gone or transport is None:
            raise StaleConnection("the pooled connection was closed")
        loop = self._loop
        future: asyncio.Future[UpstreamResponse] = loop.create_future()
        self._head = future
        self._active, self._url, self._head_only = True, url, head_only
        self._answered = False
        self._framing_run = 0
        self._last_read = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._last_read + self._read_timeout, self._check_timeout)
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                if len(body) <= COALESCE_BYTES:
                    transport.write(head + body)
                else:
                    transport.write(head)
                    transport.write(body)
            else:
                await self._send_stream(transport, head, body)
            return await future
        except BaseException:
            # The caller will never see this exchange's outcome: an answer that came just as
            # it was cancelled must not hold the connection, nor a failure be logged unread.
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()
            else:
                future.cancel()
                self.abort()  # cancelled, or the body failed: the exchange cannot go on
            raise

    async def _send_stream(
        self, transport: asyncio.Transport, head: bytes, body: AsyncIterator[bytes]
    ) -> None:
        assert self._head is not None
        self._sending = True
        try:
            transport.write(head)
            async for data in body:
                if self._head.done():
                    break  # answered (or failed) before the body ended: stop sending
                if data:
                    transport.write(chunk(data))
                if self._writing_paused:
                    await self._wait_writable()
            else:
                if not self._head.done():
                    transport.write(LAST_CHUNK)
                return
            self._reusable = False  # the provider did not wait for the rest of the body
        except ProblemError as exc:
            self.abort()
            raise BodyFailed(exc) from None
        except (asyncio.CancelledError, NoAnswer):
            raise
        except Exception:  # noqa: BLE001 - the worker's stream broke in some other way
            self.abort()
            raise BodyFailed(BadRequest("the request body broke off")) from None
        finally:
            self._sending = False

    async def _wait_writable(self) -> None:
        self._writable = self._loop.create_future()
        try:
            await self._writable
        finally:
            self._writable = None

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _finish(self) -> None:
        """The answer has fully arrived: hand the connection back, or close it."""
        self._active = False
        self._response = None
        self.exchanges += 1
        if self._reading_paused:
            self.resume_reading()
        self._wake_writer()
        if self._reusable and not self._sending and not self.gone:
            self._pool.release(self)
        else:
            self.abort()

    def _broken(self, error: NoAnswer) -> None:
        """Fail whatever waits on this connection and close it."""
        head, response = self._head, self._response
        if self._active:
            self._active = False
            self._response = None
            if head is not None and not head.done():
                head.set_exception(error)
            elif response is not None:
                response.fail(error)
        self.abort()

    def _check_timeout(self) -> None:
        self._timer = None
        if not self._active or self.gone:
            return  # re-armed by the next exchange
        now = self._loop.time()
        if self._reading_paused or (self._sending and not self._writing_paused):
            self._last_read = now  # waiting on the worker, not on the provider
        deadline = self._last_read + self._read_timeout
        if now >= deadline:
            self._broken(NoAnswer("the upstream did not answer in time", timed_out=True))
        else:
            self._timer = self._loop.call_at(deadline, self._check_timeout)

    # -- flow control -------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self.gone:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self.gone:
            self._reading_paused = False
            self._transport.resume_reading()

    def abort(self) -> None:
        """Close at once, whatever is in flight (a half-read body cannot be reused)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self._gone()

    def _gone(self) -> None:
        if not self.gone:
            self.gone = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._wake_writer()
            self._pool.forget(self)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def bind(self, transport: asyncio.BaseTransport) -> None:
        """Take ``transport`` as this connection's (once; uvloop reports it a turn later)."""
        if self.gone:
            cast(asyncio.Transport, transport).abort()  # given up on while connecting
        elif self._transport is None:
            self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
            self._pool.adopt(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.bind(transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:
            self.abort()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._last_read = self._loop.time()
        self._answered = True
        before = self._body_bytes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(NoAnswer("the upstream switched protocols"))
            return
        except httptools.HttpParserError:
            self._broken(NoAnswer("the upstream sent a malformed answer"))
            return
        body = self._body_bytes - before
        framing = len(data) - body
        self._framing_run = framing if body else self._framing_run + framing
        if self._framing_run > MAX_HEAD_BYTES and self._active:
            self._broken(NoAnswer("the upstream sent a head (or trailers) too large to read"))

    def eof_received(self) -> bool:
        self._peer_closed(clean=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # A reset, or our own abort (gone already), is no end of a body that had no length.
        self._peer_closed(clean=exc is None and not self.gone)
        self._gone()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._last_read = self._loop.time()  # from now on we wait on the provider

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._last_read = self._loop.time()  # the provider took our bytes: it is not silent
        self._wake_writer()

    def _peer_closed(self, clean: bool) -> None:
        if not self._active:
            return
        response = self._response
        if response is not None and self._eof_framed and clean:
            response.feed_eof()  # an answer without a length ends with its connection
            self._reusable = False
            self._finish()
        elif response is not None:
            self._broken(NoAnswer("the upstream broke off its answer"))
        elif self.exchanges and not self._answered:
            self._broken(StaleConnection("the upstream closed the connection without answering"))
        else:
            self._broken(NoAnswer("the upstream closed the connection without answering"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reason = b""
        self._raw_headers = []

    def on_status(self, status: bytes) -> None:
        self._reason += status  # may come in pieces when the status line is split

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is None:  # trailers after a chunked body are not relayed
            self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the answer is still to come
            return
        head, url = self._head, self._url
        if head is None or head.done() or url is None:
            raise RuntimeError("an answer nobody asked for")  # -> HttpParserCallbackError
        headers = CIMultiDictProxy(
            CIMultiDict([(_text(name), _text(value)) for name, value in self._raw_headers])
        )
        response = UpstreamResponse(self, status, _text(self._reason), headers, url)
        transfer = headers.get("Transfer-Encoding", "")
        self._eof_framed = (
            "Content-Length" not in headers
            and "chunked" not in transfer.lower()
            and status not in _NO_BODY_STATUSES
        )
        self._response = response
        head.set_result(response)
        if self._head_only:
            # A HEAD answer has no body whatever its Content-Length says, and httptools cannot
            # be told so: end it here and retire the connection, whose parser would wait.
            response.feed_eof()
            self._reusable = False
            self._finish()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._response is not None:
            self._response.feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response = self._response
        if response is None:
            return  # a HEAD answer, already finished
        response.feed_eof()
        if not self._parser.should_keep_alive():
            self._reusable = False
        self._finish()
