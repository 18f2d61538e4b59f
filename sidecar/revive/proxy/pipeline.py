"""The data plane: ``/proxy/{connection}/{tail}`` as an explicit chain of small stages.

    target  -> body -> lease -> headers -> forward -> inspect/classify -> act -> relay
    (target.py) (body.py) (source) (headers.py) (forward.py) (inspect.py, policy)   (here)

What happens after classification is the product (DESIGN §3, §6):
- ``refreshable``: refresh once (with CAE claims when the provider asked), retry once; a
  refresh that still gets the same rejection is ``permanent`` and the answer is relayed.
- ``transient``: bounded backoff honouring ``Retry-After``, but only for requests that are
  safe to repeat; a mutating request whose outcome is unknown is never sent twice.
- ``dead_grant``: 424 ``recovery-required`` with the provider's code. Nothing retries a dead
  grant: only a human reconnect helps.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache

import aiohttp
from aiohttp import web
from yarl import URL

from revive.classify import FailureClass, Phase, Policy, Verdict
from revive.config import ConnectionConfig, LimitsConfig
from revive.errors import (
    BadRequest,
    CredentialError,
    OutcomeUnknown,
    RecoveryRequired,
    UnknownConnection,
    UpstreamTimeout,
    UpstreamUnavailable,
    problem_for_credential_error,
)
from revive.proxy.backoff import backoff_delay
from revive.proxy.body import EMPTY_BODY, RequestBody, read_body
from revive.proxy.forward import NoAnswer, NotSent, send
from revive.proxy.headers import downstream_headers, upstream_headers
from revive.proxy.inspect import inflate_for_classifier, read_prefix
from revive.proxy.target import check_redirect, split_raw_path, upstream_url
from revive.sources import CredentialSource, Lease

log = logging.getLogger("revive.proxy")



@dataclass(frozen=True, slots=True)
class Route:
    """Everything the proxy needs to know about one connection, resolved at start-up."""

    connection: ConnectionConfig
    policy: Policy
    source: CredentialSource
    base: URL
    allowed_hosts: frozenset[str]

    @classmethod
    def build(cls, connection: ConnectionConfig, policy: Policy, source: CredentialSource) -> Route:
        return cls(connection, policy, source, connection.upstream, frozenset(connection.allowed_hosts))


@dataclass(slots=True)
class _Attempt:
    """Mutable bookkeeping of one proxied request across its attempts."""

    lease: Lease
    refreshed: bool = False
    transient_tries: int = 0


@lru_cache(maxsize=1024)
def _is_loopback(remote: str) -> bool:
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class Proxy:
    """The proxy handler; one per application, stored under an ``AppKey``."""

    routes: dict[str, Route]
    session: aiohttp.ClientSession
    limits: LimitsConfig
    loopback_only: bool = True
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        connection_id, tail, query = split_raw_path(request.raw_path)
        route = self.routes.get(connection_id)
        if route is None:
            raise UnknownConnection(f"no connection named {connection_id!r} is configured")
        if self.loopback_only and not _is_loopback(request.remote or ""):
            raise BadRequest("worker routes answer only on loopback")
        url = upstream_url(route.base, tail, query)
        policy = route.policy
        method = request.method
        mutating = policy.is_mutating(method, url.path)
        idempotency_key = request.headers.get("Idempotency-Key")
        provider_dedupes = bool(policy.idempotency_header and idempotency_key)
        # A mutating request may only be repeated when the provider itself deduplicates it.
        safe = not mutating or provider_dedupes
        body = await read_body(request, self.limits) if request.body_exists else EMPTY_BODY
        try:
            state = _Attempt(await route.source.lease())
        except CredentialError as exc:
            raise problem_for_credential_error(exc, connection_id=route.connection.id) from None
        headers = upstream_headers(request.headers, state.lease.access_token)
        if provider_dedupes and policy.idempotency_header and idempotency_key:
            headers[policy.idempotency_header] = idempotency_key
        while True:
            headers["Authorization"] = f"Bearer {state.lease.access_token}"  # may be refreshed
            try:
                resp = await send(self.session, method, url, headers, body.payload())
            except NotSent:
                if body.replayable and await self._backoff(route, state, None):
                    continue
                raise UpstreamUnavailable(
                    "the upstream could not be reached", attempts=state.transient_tries + 1
                ) from None
            except NoAnswer as exc:
                if safe and body.replayable and await self._backoff(route, state, None):
                    continue
                if mutating:
                    raise OutcomeUnknown(
                        f"{exc}; the request may have taken effect and was not repeated"
                    ) from None
                raise (UpstreamTimeout if exc.timed_out else UpstreamUnavailable)(str(exc)) from None
            again = await self._act(request, route, state, resp, body, safe, mutating)
            if isinstance(again, web.StreamResponse):
                return again

    async def _act(
        self,
        request: web.Request,
        route: Route,
        state: _Attempt,
        resp: aiohttp.ClientResponse,
        body: RequestBody,
        safe: bool,
        mutating: bool,
    ) -> web.StreamResponse | None:
        """Classify one answer and either relay it (returned) or prepare a retry (None)."""
        policy = route.policy
        status = resp.status
        if 300 <= status < 400 and "Location" in resp.headers:
            try:
                check_redirect(resp.headers["Location"], resp.url, route.allowed_hosts)
            finally:
                resp.close()  # the redirect body is never relayed when we refuse it
            return await self._relay(request, route, resp, b"", True)
        if status < 300 and not policy.inspect_success_bodies:
            return await self._relay(request, route, resp, b"", False)
        limit = self.limits.classify_read_bytes
        try:
            prefix, complete = await read_prefix(resp, limit)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            resp.close()
            if mutating:
                raise OutcomeUnknown("the upstream broke off its answer") from None
            raise UpstreamUnavailable("the upstream broke off its answer") from None
        inflated = inflate_for_classifier(prefix, resp.headers.get("Content-Encoding"), limit)
        verdict = policy.classify(Phase.API_CALL, status, resp.headers, inflated)
        klass = verdict.failure_class
        if klass is FailureClass.REFRESHABLE and not state.refreshed and body.replayable:
            return await self._refresh(request, route, state, verdict, resp, prefix, complete)
        if klass is FailureClass.TRANSIENT:
            if safe and body.replayable and await self._backoff(route, state, verdict.retry_after):
                resp.close()
                return None
            if safe:
                resp.close()
                raise UpstreamUnavailable(
                    f"the upstream kept failing (last status {status})",
                    upstream_status=status,
                    provider_code=verdict.provider_code,
                    retry_after=verdict.retry_after,
                    attempts=state.transient_tries + 1,
                )
        if klass is FailureClass.DEAD_GRANT:
            resp.close()
            raise RecoveryRequired(
                verdict.message or "the provider rejected the grant",
                provider_code=verdict.provider_code,
                connection_id=route.connection.id,
                generation=state.lease.generation,
            )
        return await self._relay(request, route, resp, prefix, complete)

    async def _refresh(
        self,
        request: web.Request,
        route: Route,
        state: _Attempt,
        verdict: Verdict,
        resp: aiohttp.ClientResponse,
        prefix: bytes,
        complete: bool,
    ) -> web.StreamResponse | None:
        stale = state.lease
        try:
            fresh = await route.source.refresh(stale, claims=verdict.claims)
        except CredentialError as exc:
            resp.close()
            raise problem_for_credential_error(exc, connection_id=route.connection.id) from None
        state.refreshed = True
        if fresh.access_token == stale.access_token and verdict.claims is None:
            # Nothing new to try: the rejection stands, relay it as the provider sent it.
            return await self._relay(request, route, resp, prefix, complete)
        resp.close()
        state.lease = fresh
        return None

    async def _backoff(self, route: Route, state: _Attempt, retry_after: float | None) -> bool:
        """Sleep before another attempt if the budget allows; False when it is spent."""
        retry = route.policy.retry
        state.transient_tries += 1
        if state.transient_tries >= retry.attempts:
            return False
        if retry_after is not None and (
            not retry.honour_retry_after or retry_after > retry.max_retry_after_s
        ):
            return False  # a long window: park the job rather than hold the worker
        delay = backoff_delay(
            state.transient_tries,
            base=retry.base_backoff_s,
            cap=retry.max_backoff_s,
            retry_after=retry_after if retry.honour_retry_after else None,
        )
        await self.sleep(delay)
        return True

    async def _relay(
        self,
        request: web.Request,
        route: Route,
        resp: aiohttp.ClientResponse,
        prefix: bytes,
        complete: bool,
    ) -> web.StreamResponse:
        """Send the upstream answer to the worker, streaming what was not read yet."""
        out: web.StreamResponse
        if complete:  # already read for classification: one write
            resp.release()
            out = web.Response(status=resp.status, reason=resp.reason, body=prefix)
        else:  # streaming even small answers: measured faster than read() + web.Response
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
        headers = out.headers
        headers.extend(downstream_headers(resp.headers))  # one copy, not two
        location = headers.get("Location")
        if location is not None:
            headers["Location"] = self._rewrite_location(route, resp.url, location)
        if complete:
            return out
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        try:
            if prefix:
                await out.write(prefix)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            # Headers are already sent: the only honest signal left is a broken connection.
            resp.close()
            if request.transport is not None:
                request.transport.close()
            return out
        resp.release()
        await out.write_eof()
        return out

    @staticmethod
    def _rewrite_location(route: Route, current: URL, location: str) -> str:
        """Point a same-connection redirect back through the sidecar; leave others absolute."""
        target = current.join(URL(location))
        base = route.base
        base_path = base.raw_path.rstrip("/") + "/"
        if target.host == base.host and target.port == base.port and target.raw_path.startswith(base_path):
            tail = target.raw_path[len(base_path) :]
            query = f"?{target.raw_query_string}" if target.raw_query_string else ""
            return f"/proxy/{route.connection.id}/{tail}{query}"
        return str(target)

