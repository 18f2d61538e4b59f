"""The ``/v1`` handlers: parse a pydantic body, ask the ``RecoveryApi``, render a pydantic answer.

Who may call what (DESIGN §6), decided here and nowhere else:

- ``worker`` routes answer loopback peers only, unless ``add_routes(loopback_only=False)``
  (the sidecar then sits on a private pod network, ``workers_from_any_address``).
- ``admin`` routes need ``Authorization: Bearer <admin token>`` (``revive.api.auth``); a
  missing or wrong token is a 401 before the service is asked anything.
- ``GET /v1/connections/{id}/connect`` answers loopback peers only, whatever the flag: whoever
  starts the flow chooses whose grant gets installed, and a browser cannot send the admin
  bearer. Its callback is open: the single-use ``state`` the connect call created guards it.
- ``POST /v1/webhooks/nango`` answers anyone who can sign: Nango calls it from outside, so it
  is neither loopback-only nor admin; the service verifies ``X-Nango-Hmac-Sha256`` over the
  raw body (bounded to 256 KiB here) before it reads a field.
- ``/v1/jwks`` and ``/v1/openapi.json`` answer anyone on the listener.

A body that is not JSON, or does not validate, is a 400 ``bad-request`` whose ``errors`` name
each field. A non-empty body must be sent as ``application/json``: that forces a CORS
preflight on any cross-site browser request to a loopback worker route.
"""

from __future__ import annotations

import asyncio
import functools
import html
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from yarl import URL

from revive.api import models as m
from revive.api.auth import AdminAuth
from revive.api.openapi import OPERATIONS, build_openapi
from revive.api.problems import problem_response, with_problems
from revive.api.service import RecoveryApi
from revive.errors import BadRequest, PayloadTooLarge, Unauthorized, body_too_slow
from revive.recovery.machine import TransitionNotAllowed
from revive.store.models import ConflictError

__all__ = ["add_routes"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")

_NO_STORE = {"Cache-Control": "no-store"}
# Nango's auth webhooks are well under 2 KiB; sync webhooks list model names, still small.
_MAX_WEBHOOK_BYTES = 256 * 1024
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # The callback URL carries the authorization code: never let it leak through a Referer.
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'",
    "X-Content-Type-Options": "nosniff",
}


def add_routes(
    app: web.Application,
    api_key: web.AppKey[RecoveryApi],
    admin_key: web.AppKey[AdminAuth],
    *,
    loopback_only: bool = True,
    body_timeout: float = 30.0,
) -> None:
    """Register every route of ``revive.api.openapi.OPERATIONS`` on ``app``.

    Call it before any catch-all route. The service and the admin auth are looked up per
    request under ``api_key`` / ``admin_key`` (in ``app`` or a parent app), so they may be
    set later, in a ``cleanup_ctx``.

    Args:
        app: the application (or sub-application) to add the routes to.
        api_key: where the ``RecoveryApi`` implementation is stored.
        admin_key: where the ``AdminAuth`` is stored.
        loopback_only: whether worker routes refuse peers that are not loopback.
        body_timeout: seconds a request body may take to arrive (``limits.
            request_body_timeout_seconds``); a client dribbling it gets a 400, and holds
            nothing longer.
    """
    h = _Handlers(api_key, admin_key, build_openapi(), body_timeout)
    handlers: dict[str, _Handler] = {
        "mint_run_capability": h.mint_run_capability,
        "renew_capability": h.renew_capability,
        "redeem_capability": h.redeem_capability,
        "settle_action": h.settle_action,
        "run_status": h.run_status,
        "list_cases": h.list_cases,
        "get_case": h.get_case,
        "reconnected": h.reconnected,
        "connections_at_risk": h.connections_at_risk,
        "nango_webhook": h.nango_webhook,
        "connect": h.connect,
        "connect_callback": h.connect_callback,
        "issue_recovery_capability": h.issue_recovery_capability,
        "abandon_case": h.abandon_case,
        "jwks": h.jwks,
        "openapi": h.openapi,
    }
    documented = {op.operation_id for op in OPERATIONS}
    if documented != set(handlers):  # a programming error: fail the start-up, loudly
        raise RuntimeError(f"routes and OPERATIONS differ: {documented ^ set(handlers)}")
    for op in OPERATIONS:
        handler = handlers[op.operation_id]
        if op.audience == "worker" and loopback_only:
            handler = _loopback_only(handler)
        elif op.audience == "admin":
            handler = _admin_only(handler, admin_key)
        app.router.add_route(op.method, op.path, with_problems(handler), name=op.operation_id)


class _Handlers:
    """The route handlers; they only translate between HTTP and the ``RecoveryApi``."""

    def __init__(
        self,
        api_key: web.AppKey[RecoveryApi],
        admin_key: web.AppKey[AdminAuth],
        openapi: dict[str, object],
        body_timeout: float,
    ) -> None:
        self._api_key = api_key
        self._admin_key = admin_key
        self._openapi = json.dumps(openapi).encode()
        self._body_timeout = body_timeout

    async def _body(self, request: web.Request, model: type[_M]) -> _M:
        return await _within(self._body_timeout, _body(request, model))

    def _api(self, request: web.Request) -> RecoveryApi:
        return request.config_dict[self._api_key]

    # -- worker --------------------------------------------------------------------------------

    async def mint_run_capability(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, m.MintRunCapabilityRequest)
        minted = await self._api(request).mint_run_capability(
            request.match_info["run_id"], body.connection_id, body.checkpoint_id, body.epoch,
            body.workflow,
        )
        return _answer(m.RunCapability.from_minted(minted))

    async def renew_capability(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, m.CapabilityRequest)
        return _answer(m.RunCapability.from_minted(await self._api(request).renew(body.capability)))

    async def redeem_capability(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, m.CapabilityRequest)
        redemption = await self._api(request).redeem(body.capability)
        return _answer(m.Redeemed.from_redemption(redemption))

    async def settle_action(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, m.SettleOutcomeRequest)
        key = request.match_info["idempotency_key"]
        try:
            row = await self._api(request).settle_action(key, body.outcome, body.evidence)
        except ConflictError as exc:
            # No 409 type fits "already settled" (fenced / in-flight / reconcile-required
            # each mean something else to a worker): a 400 that names the state found.
            raise BadRequest(
                f"action {key!r} is {exc.actual}; only an unknown outcome can be settled",
                state=exc.actual,
            ) from exc
        return _answer(m.ActionView.from_row(row))

    async def run_status(self, request: web.Request) -> web.StreamResponse:
        run, cases = await self._api(request).run_status(request.match_info["run_id"])
        return _answer(m.RunStatus.from_rows(run, cases))

    # -- admin ---------------------------------------------------------------------------------

    async def list_cases(self, request: web.Request) -> web.StreamResponse:
        query = _query(request, m.CaseQuery)
        cases = await self._api(request).list_cases(
            query.state.value if query.state is not None else None,
            query.connection_id, query.run_id,
        )
        return _answer(m.CaseList(cases=[m.CaseSummary.from_row(c) for c in cases]))

    async def get_case(self, request: web.Request) -> web.StreamResponse:
        case, transitions, actions = await self._api(request).get_case(
            request.match_info["case_id"]
        )
        return _answer(m.CaseDetail.from_rows(case, transitions, actions))

    async def reconnected(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, m.ReconnectedRequest)
        connection_id = request.match_info["connection_id"]
        with _case_conflicts():
            cases = await self._api(request).reconnected(connection_id, body.actor, body.evidence)
        return _answer(m.ReconnectedAnswer(
            connection_id=connection_id, advanced=[m.CaseSummary.from_row(c) for c in cases],
        ))

    async def connections_at_risk(self, request: web.Request) -> web.StreamResponse:
        risks = await self._api(request).connections_at_risk()
        return _answer(m.AtRiskList(connections=[m.AtRiskView.from_risk(r) for r in risks]))

    async def issue_recovery_capability(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, m.IssueCapabilityRequest)
        case_id = request.match_info["case_id"]
        with _case_conflicts():
            minted = await self._api(request).issue_recovery_capability(case_id, body.actor)
        return _answer(m.RecoveryCapability.from_minted(minted, case_id))

    async def abandon_case(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, m.AbandonRequest)
        with _case_conflicts():
            case = await self._api(request).abandon(
                request.match_info["case_id"], body.actor, body.reason
            )
        return _answer(m.CaseSummary.from_row(case))

    # -- webhook -------------------------------------------------------------------------------

    async def nango_webhook(self, request: web.Request) -> web.StreamResponse:
        body = await _within(self._body_timeout, _bounded_body(request, _MAX_WEBHOOK_BYTES))
        with _case_conflicts():
            outcome = await self._api(request).nango_webhook(body, request.headers)
        return _answer(m.NangoWebhookAnswer.from_outcome(outcome))

    # -- browser -------------------------------------------------------------------------------

    async def connect(self, request: web.Request) -> web.StreamResponse:
        if not _is_loopback(request.remote):
            raise BadRequest(
                "the connect flow starts only from a loopback peer: open it on the sidecar's "
                "host or through a port-forward"
            )
        connection_id = request.match_info["connection_id"]
        # The address this socket really answers on, never the Host header: a forged Host
        # would send the provider's authorization code to a stranger's server.
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname:
            raise BadRequest("the connect flow needs the listener's address")
        redirect_uri = URL.build(
            scheme="http", host=sockname[0], port=sockname[1],
            path=f"/v1/connections/{connection_id}/callback",
        )
        location = await self._api(request).begin_connect(connection_id, str(redirect_uri))
        return web.Response(
            status=302, headers={"Location": location, **_PAGE_HEADERS}
        )

    async def connect_callback(self, request: web.Request) -> web.StreamResponse:
        connection_id = request.match_info["connection_id"]
        params = request.query
        if len(set(params.keys())) != len(params):
            # RFC 6749 §3.1: parameters must not repeat; a repeat smells of injection.
            raise BadRequest("a callback parameter appears more than once")
        with _case_conflicts():
            cases = await self._api(request).complete_connect(connection_id, dict(params))
        n = len(cases)
        page = (
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Revive</title></head>"
            f"<body><p>Reconnected {html.escape(connection_id)}; {n} "
            f"case{'' if n == 1 else 's'} advanced.</p></body></html>"
        )
        return web.Response(text=page, content_type="text/html", headers=_PAGE_HEADERS)

    # -- public --------------------------------------------------------------------------------

    async def jwks(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            self._api(request).jwks(), headers={"Cache-Control": "public, max-age=60"}
        )

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._openapi, content_type="application/json")


# -- helpers ------------------------------------------------------------------------------------


async def _within(seconds: float, reading: Awaitable[_T]) -> _T:
    try:
        async with asyncio.timeout(seconds):
            return await reading
    except TimeoutError:
        raise body_too_slow(seconds) from None


async def _body(request: web.Request, model: type[_M]) -> _M:
    raw = await request.read()
    if not raw.strip():
        raw = b"{}"  # routes whose fields all have defaults take an empty body
    elif not (request.content_type == "application/json"
              or request.content_type.endswith("+json")):
        raise BadRequest("send the body as Content-Type: application/json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc, "body") from None


async def _bounded_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refused past ``limit`` bytes without reading the rest into memory."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes")
    return bytes(body)


def _query(request: web.Request, model: type[_M]) -> _M:
    if len(set(request.query.keys())) != len(request.query):
        raise BadRequest("a query parameter appears more than once")
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise _invalid(exc, "query") from None


def _invalid(exc: ValidationError, where: str) -> BadRequest:
    # include_input=False: the rejected value may be a capability; never echo it.
    errors = [
        {"field": ".".join(str(part) for part in e["loc"]) or where, "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return BadRequest(f"invalid {where}: {detail}", errors=errors)


def _answer(model: BaseModel) -> web.Response:
    return web.Response(
        body=model.model_dump_json().encode(),
        content_type="application/json", headers=_NO_STORE,
    )


@contextmanager
def _case_conflicts() -> Iterator[None]:
    """A case that moved under the call, or an event its state refuses, is the caller's 400."""
    try:
        yield
    except ConflictError as exc:
        raise BadRequest(
            f"the {exc.entity} moved: expected {exc.expected}, found {exc.actual}",
            state=exc.actual,
        ) from exc
    except TransitionNotAllowed as exc:
        raise BadRequest(
            str(exc), state=str(exc.state), allowed=sorted(str(e) for e in exc.allowed)
        ) from exc


@functools.lru_cache(maxsize=1024)
def _is_loopback(remote: str | None) -> bool:
    try:
        address = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 on a dual-stack socket
    return address.is_loopback


def _loopback_only(handler: _Handler) -> _Handler:
    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        if not _is_loopback(request.remote):
            raise BadRequest("worker routes answer only on loopback")
        return await handler(request)

    return checked


def _admin_only(handler: _Handler, admin_key: web.AppKey[AdminAuth]) -> _Handler:
    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        try:
            request.config_dict[admin_key].check(request)
        except Unauthorized as exc:
            answer = problem_response(exc, request.path)
            answer.headers["WWW-Authenticate"] = 'Bearer realm="revive-admin"'  # RFC 6750 §3
            return answer
        return await handler(request)

    return checked
