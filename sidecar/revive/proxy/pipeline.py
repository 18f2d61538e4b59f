"""The data plane: ``/proxy/{connection}/{tail}`` as an explicit chain of small stages.

    target -> capability -> fence | ledger claim -> body -> lease -> headers -> forward
           -> inspect/classify -> act -> relay (+ ledger finish)

What happens after classification is the product (DESIGN §3, §6, §7):
- ``refreshable``: refresh once (with CAE claims when the provider asked), retry once; a
  refresh that still gets the same rejection is ``permanent`` and the answer is relayed.
- ``transient``: bounded backoff honouring ``Retry-After``, but only for requests that are
  safe to repeat; a mutating request whose outcome is unknown is never sent twice.
- ``dead_grant``: a recovery case joins the run, checkpoint, action and generation, and the
  worker gets 424 ``recovery-required`` naming it. Nothing retries a dead grant.
Every mutating request is claimed in the ledger first (fenced in the same transaction),
and its claim is always finished, so a replay can answer "already done".
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn
from dataclasses import dataclass, field
from functools import lru_cache

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from revive.classify import FailureClass, Phase, Policy, Verdict
from revive.config import ConnectionConfig, LimitsConfig
from revive.errors import (
    BadRequest,
    CapabilityInvalid,
    CredentialError,
    DeadGrant,
    InternalError,
    ProblemError,
    OutcomeUnknown,
    ReconcileRequired,
    RecoveryRequired,
    UnknownConnection,
    UpstreamTimeout,
    UpstreamUnavailable,
    problem_for_credential_error,
)
from revive.logs import bind_request
from revive.metrics import Metrics
from revive.proxy.backoff import backoff_delay
from revive.proxy.body import EMPTY_BODY, RequestBody, read_body
from revive.proxy.headers import upstream_headers
from revive.proxy.inspect import inflate_for_classifier, read_prefix
from revive.proxy.ledger import LedgerEntry, derive_idempotency_key, fingerprint, replay
from revive.proxy.relay import read_for_ledger, relay
from revive.proxy.target import check_redirect, split_raw_path, upstream_url
from revive.proxy.upstream import (
    BodyFailed,
    InvalidHeader,
    NoAnswer,
    NotSent,
    UpstreamClient,
    UpstreamResponse,
)
from revive.recovery.reconcile import stamp_request
from revive.recovery.service import RecoveryService
from revive.redact import redact
from revive.sources import CredentialSource, Lease
from revive.store import CaseDraft, ClaimRequest, FinishedAction, FinishState
from revive.tokens import CapabilityClaims

log = logging.getLogger("revive.proxy")

_EVIDENCE_BYTES = 2048


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
class _Call:
    """One proxied request across its attempts: who asks, what for, and how far it got."""

    outcome: list[str]
    """Shared with ``handle``: the failure class (or ``replayed``) it counts the request by."""
    request: web.Request
    route: Route
    claims: CapabilityClaims
    method: str
    url: URL
    action_key: str
    checkpoint_id: str
    body: RequestBody
    safe: bool
    mutating: bool
    lease: Lease | None = None
    entry: LedgerEntry | None = None
    stamped: CIMultiDict[str] | None = None
    """Headers a reconcile stamp adds to the upstream request."""
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
    upstream: UpstreamClient
    limits: LimitsConfig
    service: RecoveryService
    owner: str
    loopback_only: bool = True
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    metrics: Metrics = field(default_factory=Metrics)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One proxied request, counted by connection, outcome and status."""
        outcome: list[str] = ["ok"]
        try:
            response = await self._handle(request, outcome)
        except ProblemError as exc:
            self.metrics.request(
                request.match_info.get("connection_id", "?"), exc.type[11:], exc.status
            )
            raise
        self.metrics.request(request.match_info["connection_id"], outcome[0], response.status)
        return response

    async def _handle(self, request: web.Request, outcome: list[str]) -> web.StreamResponse:
        if request.version.major < 1:
            # llhttp reads "GET /x\nName: v" as HTTP/0.9 plus headers: a raw line break in
            # the target must never turn into headers of a request that gets forwarded.
            raise BadRequest("HTTP/0.9 requests are not proxied")
        connection_id, tail, query = split_raw_path(request.raw_path)
        route = self.routes.get(connection_id)
        if route is None:
            raise UnknownConnection(f"no connection named {connection_id!r} is configured")
        if self.loopback_only and not _is_loopback(request.remote or ""):
            raise BadRequest("worker routes answer only on loopback")
        claims = self._authenticate(request, connection_id)
        bind_request(request.headers.get("traceparent"), connection_id, claims.run_id)
        url = upstream_url(route.base, tail, query)
        policy = route.policy
        method = request.method
        mutating = policy.is_mutating(method, url.path)
        headers_in = request.headers
        action_key = headers_in.get("Revive-Action") or ""
        if mutating and not action_key:
            raise BadRequest("a mutating request needs a Revive-Action header naming the action")
        idempotency_key = headers_in.get("Idempotency-Key")
        if mutating and not idempotency_key:
            idempotency_key = derive_idempotency_key(claims.run_id, action_key)
        body = await read_body(request, self.limits) if request.body_exists else EMPTY_BODY
        call = _Call(
            outcome, request, route, claims, method, url,
            action_key or f"{method} {url.path}",
            headers_in.get("Revive-Checkpoint") or claims.checkpoint_id,
            body,
            # A mutating request may only be repeated when the provider itself deduplicates it.
            safe=not mutating or policy.idempotency_header is not None,
            mutating=mutating,
        )
        if not mutating:
            await self.service.fences.check(
                claims.run_id, claims.epoch, connection_id, claims.generation
            )
            return await self._forward(call, idempotency_key)
        assert idempotency_key is not None  # given by the worker or derived above
        key = idempotency_key
        replayed = await self._claim(call, key)
        if replayed is not None:
            return replayed
        try:
            return await self._forward(call, key)
        finally:
            if call.entry is not None:
                await call.entry.settle_unfinished()

    def _authenticate(self, request: web.Request, connection_id: str) -> CapabilityClaims:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise CapabilityInvalid("send a run capability as Authorization: Bearer")
        claims = self.service.verifier.verify(token.strip(), typ="run")
        if claims.connection_id != connection_id:
            raise CapabilityInvalid("the capability is for another connection")
        return claims

    async def _claim(self, call: _Call, key: str) -> web.StreamResponse | None:
        """Claim ``key`` (fenced in the same transaction); answer a replay when done before."""
        claims, path_qs = call.claims, call.request.path_qs
        data = call.body.data if call.body.replayable else None
        claim = ClaimRequest(
            key, claims.run_id, call.action_key, call.checkpoint_id, call.route.connection.id,
            fingerprint(call.method, path_qs, data, call.request.content_length),
            self.owner, claims.epoch, claims.generation,
        )
        for _ in range(2):
            try:
                outcome = await self.service.store.claim(claim)
            except ReconcileRequired:
                if not await self._reconcile_unknown(call, key):
                    raise
                continue
            if outcome.kind == "replay":
                call.outcome[0] = "replayed"
                return replay(outcome.action, call.route.policy, call.method, call.url.path)
            call.entry = LedgerEntry(self.service.store, claim, outcome.action)
            rule = call.route.policy.reconcile_for(call.method, call.url.path)
            if rule is not None and call.body.replayable:
                call.stamped = CIMultiDict()
                call.body = RequestBody(stamp_request(rule, call.body.data, call.stamped, key))
            return None
        raise ReconcileRequired("the action's outcome is still unknown", idempotency_key=key)

    async def _reconcile_unknown(self, call: _Call, key: str) -> bool:
        """An ``unknown`` action met again: ask the provider before anything re-executes it.

        Returns True when the provider settled it (the claim is tried again), False when it
        could not tell. A dead grant met while asking opens the case with outcome unknown.
        """
        action = await self.service.store.get_action(key)
        if action is None or action.state != "unknown":
            return True
        binding = self.service.binding(call.route.connection.id)
        try:
            settled = await self.service.reconcile_action(
                binding, action, (call.method, call.url.path)
            )
        except DeadGrant as exc:
            await self._dead_grant(call, exc.provider_code, exc.provider_message, None, key)
        return settled is not None

    async def _forward(self, call: _Call, idempotency_key: str | None) -> web.StreamResponse:
        route, policy = call.route, call.route.policy
        try:
            lease = call.lease = await route.source.lease()
        except CredentialError as exc:
            await self._credential_failed(call, exc)
        headers = upstream_headers(call.request.headers, lease.access_token)
        if policy.idempotency_header and idempotency_key:
            headers[policy.idempotency_header] = idempotency_key
        if call.stamped:
            headers.update(call.stamped)
        body = call.body
        while True:
            headers["Authorization"] = f"Bearer {call.lease.access_token}"  # may be refreshed
            if call.entry is not None:
                call.entry.sent = True
            started = time.monotonic()
            try:
                resp = await self.upstream.request(
                    call.method, call.url, headers, body.payload(),
                    retry_stale=call.safe,
                )
            except NotSent:
                if call.entry is not None:
                    call.entry.sent = False
                if body.replayable and await self._backoff(call, None):
                    continue
                raise UpstreamUnavailable(
                    "the upstream could not be reached", attempts=call.transient_tries + 1
                ) from None
            except BodyFailed as exc:
                if call.entry is not None:
                    call.entry.sent = False  # a body cut short is no request to act on
                raise exc.problem from None
            except NoAnswer as exc:
                if call.safe and body.replayable and await self._backoff(call, None):
                    continue
                if call.mutating:
                    raise OutcomeUnknown(
                        f"{exc}; the request may have taken effect and was not repeated",
                        idempotency_key=call.entry.key if call.entry else None,
                    ) from None
                raise (UpstreamTimeout if exc.timed_out else UpstreamUnavailable)(str(exc)) from None
            except InvalidHeader:
                if call.entry is not None:
                    call.entry.sent = False
                raise InternalError("a header for the provider would break the request") from None
            self.metrics.upstream(route.connection.id, time.monotonic() - started)
            answer = await self._act(call, resp)
            if answer is not None:
                return answer

    async def _act(self, call: _Call, resp: UpstreamResponse) -> web.StreamResponse | None:
        """Classify one answer and either relay it (returned) or prepare a retry (None)."""
        route, policy, status = call.route, call.route.policy, resp.status
        if 300 <= status < 400 and "Location" in resp.headers:
            try:
                check_redirect(resp.headers["Location"], resp.url, route.allowed_hosts)
            finally:
                resp.close()  # the redirect body is never relayed when we refuse it
            return await self._relay(call, resp, b"", True)
        if status < 300 and not policy.inspect_success_bodies:
            call.outcome[0] = "ok"  # what a retry ended in, not what it began with
            return await self._relay(call, resp, b"", False)
        limit = self.limits.classify_read_bytes
        try:
            prefix, complete = await read_prefix(resp, limit)
        except NoAnswer:
            resp.close()
            if call.mutating:
                raise OutcomeUnknown("the upstream broke off its answer") from None
            raise UpstreamUnavailable("the upstream broke off its answer") from None
        inflated = inflate_for_classifier(prefix, resp.headers.get("Content-Encoding"), limit)
        verdict = policy.classify(Phase.API_CALL, status, resp.headers, inflated)
        klass = verdict.failure_class
        call.outcome[0] = klass.value
        if klass is FailureClass.REFRESHABLE and not call.refreshed and call.body.replayable:
            return await self._refresh(call, verdict, resp, prefix, complete)
        if klass is FailureClass.TRANSIENT:
            if call.safe and call.body.replayable and await self._backoff(call, verdict.retry_after):
                resp.close()
                return None
            if call.safe:
                resp.close()
                raise UpstreamUnavailable(
                    f"the upstream kept failing (last status {status})",
                    upstream_status=status,
                    provider_code=verdict.provider_code,
                    retry_after=verdict.retry_after,
                    attempts=call.transient_tries + 1,
                )
        if klass is FailureClass.DEAD_GRANT:
            resp.close()
            await self._dead_grant(
                call, verdict.provider_code, verdict.message, (status, inflated), None
            )
        return await self._relay(call, resp, prefix, complete, verdict)

    async def _refresh(
        self,
        call: _Call,
        verdict: Verdict,
        resp: UpstreamResponse,
        prefix: bytes,
        complete: bool,
    ) -> web.StreamResponse | None:
        assert call.lease is not None
        stale = call.lease
        connection_id = call.route.connection.id
        try:
            fresh = await call.route.source.refresh(stale, claims=verdict.claims)
        except CredentialError as exc:
            self.metrics.refreshes[(connection_id, exc.failure_class)] += 1
            resp.close()
            await self._credential_failed(call, exc)
        self.metrics.refreshes[(connection_id, "ok")] += 1
        call.refreshed = True
        if fresh.access_token == stale.access_token and verdict.claims is None:
            # Nothing new to try: the rejection stands, relay it as the provider sent it.
            return await self._relay(call, resp, prefix, complete, verdict)
        resp.close()
        call.lease = fresh
        return None

    async def _credential_failed(self, call: _Call, exc: CredentialError) -> NoReturn:
        if isinstance(exc, DeadGrant):
            await self._dead_grant(call, exc.provider_code, exc.provider_message, None, None)
        raise problem_for_credential_error(exc, connection_id=call.route.connection.id) from None

    async def _dead_grant(
        self,
        call: _Call,
        provider_code: str | None,
        message: str | None,
        answer: tuple[int, bytes] | None,
        unknown_key: str | None,
    ) -> NoReturn:
        """Open (or join) the recovery case for this run and answer 424 naming it."""
        claims, connection_id = call.claims, call.route.connection.id
        secrets = (call.lease.access_token,) if call.lease is not None else ()
        evidence: dict[str, object] = {
            "request": {"method": call.method, "path": call.url.path},
            "provider_code": provider_code,
        }
        if answer is not None:
            text = answer[1][:_EVIDENCE_BYTES].decode("utf-8", errors="replace")
            evidence["provider_answer"] = {"status": answer[0], "body": redact(text, secrets)}
        key = call.entry.key if call.entry is not None else unknown_key
        case = await self.service.open_case(
            CaseDraft(
                run_id=claims.run_id,
                connection_id=connection_id,
                generation=claims.generation,
                epoch=claims.epoch,
                checkpoint_id=call.checkpoint_id,
                action_key=call.action_key,
                failure_class="dead_grant",
                actor="proxy",
                idempotency_key=key,
                provider_code=provider_code,
                provider_message=redact(message, secrets) if message else None,
                evidence=evidence,
            )
        )
        if call.entry is not None and not call.entry.done:
            await call.entry.finish("not_committed", case_id=case.case_id)
        raise RecoveryRequired(
            message or "the provider rejected the grant",
            case_id=case.case_id,
            run_id=claims.run_id,
            checkpoint_id=case.checkpoint_id,
            action_key=case.action_key,
            idempotency_key=key,
            provider_code=provider_code,
            connection_id=connection_id,
            generation=claims.generation,
        )

    async def _backoff(self, call: _Call, retry_after: float | None) -> bool:
        """Sleep before another attempt if the budget allows; False when it is spent."""
        retry = call.route.policy.retry
        call.transient_tries += 1
        if call.transient_tries >= retry.attempts:
            return False
        if retry_after is not None and (
            not retry.honour_retry_after or retry_after > retry.max_retry_after_s
        ):
            return False  # a long window: park the job rather than hold the worker
        delay = backoff_delay(
            call.transient_tries,
            base=retry.base_backoff_s,
            cap=retry.max_backoff_s,
            retry_after=retry_after if retry.honour_retry_after else None,
        )
        self.metrics.retries[call.route.connection.id] += 1
        await self.sleep(delay)
        return True

    async def _relay(
        self,
        call: _Call,
        resp: UpstreamResponse,
        prefix: bytes,
        complete: bool,
        verdict: Verdict | None = None,
    ) -> web.StreamResponse:
        """Relay the answer; for a claimed action, record it in the ledger first."""
        location = (call.route.base, call.route.connection.id)
        entry = call.entry
        if entry is None:
            return await relay(call.request, resp, prefix, complete, location)
        if not complete:
            rest, complete = await read_for_ledger(resp, self.limits.replay_store_bytes)
            prefix += rest
        status = resp.status
        state = _ledger_state(status, verdict)
        body = prefix if complete else None
        write = entry.finish_later(state, status=status, headers=resp.headers, body=body)
        # The answer goes out while the ledger write commits (see ledger.py for why that
        # is safe); the write is tracked so a shutdown drains it before the store closes.
        task = asyncio.create_task(self._record(write, state, entry.key))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return await relay(call.request, resp, prefix, complete, location)

    async def _record(
        self, write: Coroutine[Any, Any, FinishedAction], state: FinishState, key: str
    ) -> None:
        try:
            action = await write
            if state == "committed" and action.case_id is not None:
                await self.service.action_committed(action.case_id, key)
        except Exception as exc:  # noqa: BLE001 - the restart sweep settles what this lost
            log.error("ledger write for %s failed: %s", key, type(exc).__name__)

    async def drain(self) -> None:
        """Wait for every ledger write still committing (shutdown, before the store closes)."""
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)


def _ledger_state(status: int, verdict: Verdict | None) -> FinishState:
    if status < 400:
        return "committed"
    if verdict is not None and verdict.failure_class is FailureClass.TRANSIENT:
        # 429 means the provider refused it; a 5xx may have done the work anyway.
        return "not_committed" if status == 429 else "unknown"
    if status in (401, 403) and verdict is not None and verdict.failure_class in (
        FailureClass.REFRESHABLE, FailureClass.DEAD_GRANT,
    ):
        return "not_committed"
    return "failed"
