"""The fake provider's control API under ``/_lab``: faults, mails, calls, grants, reset.

Plain JSON for tests and the lab UI. The sidecar never exposes it: it is the lab's hand on
the provider, standing in for what in production would be an admin revoking sessions, a
90-day idle grant, or an outage.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .provider_state import PROVIDER_STATE, Faults, ProviderState

__all__ = ["FAULTS", "routes"]

routes = web.RouteTableDef()

#: Every fault name ``POST /_lab/faults`` accepts.
FAULTS = frozenset(
    {
        "expire_token",
        "kill_grant",
        "claims_challenge",
        "unavailable",
        "rate_limit",
        "latency",
        "commit_then_drop",
        "commit_then_stall",
    }
)
_KEYS = frozenset({"fault", "count", "retry_after", "ms"})


def _problem(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _non_negative(body: dict[str, Any], key: str, *, positive: bool = False) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        raise ValueError(f"{key!r} must be a{' positive' if positive else ' non-negative'} integer")
    return value


def _apply(state: ProviderState, fault: str, body: dict[str, Any]) -> dict[str, Any]:
    count = _non_negative(body, "count", positive=True)
    retry_after = _non_negative(body, "retry_after")
    ms = _non_negative(body, "ms")
    faults: Faults = state.faults
    match fault:
        case "expire_token":
            return {"expired_access_tokens": state.expire_access_tokens()}
        case "kill_grant":
            return {"killed_grants": state.kill_grants()}
        case "claims_challenge":
            return {"nbf": state.challenge()}
        case "unavailable":
            faults.unavailable = count or 1
            faults.unavailable_retry_after = retry_after
        case "rate_limit":
            faults.rate_limit = count or 1
            faults.rate_limit_retry_after = 1 if retry_after is None else retry_after
        case "latency":
            if ms is None:
                raise ValueError("'latency' needs 'ms'")
            faults.latency_ms = ms
            faults.latency_left = count
        case "commit_then_drop":
            faults.commit_then_drop = count or 1
        case "commit_then_stall":
            if ms is None:
                raise ValueError("'commit_then_stall' needs 'ms'")
            faults.commit_then_stall = count or 1
            faults.stall_ms = ms
    return {}


@routes.post("/_lab/faults")
async def add_fault(request: web.Request) -> web.Response:
    """Arm one fault; immediate ones (expire, kill, challenge) act at once."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _problem("body must be a JSON object")
    if not isinstance(body, dict):
        return _problem("body must be a JSON object")
    unknown = set(body) - _KEYS
    if unknown:
        return _problem(f"unknown keys: {sorted(unknown)}")
    fault = body.get("fault")
    if fault not in FAULTS:
        return _problem(f"'fault' must be one of {sorted(FAULTS)}")
    state = request.app[PROVIDER_STATE]
    try:
        detail = _apply(state, fault, body)
    except ValueError as exc:
        return _problem(str(exc))
    return web.json_response({"fault": fault, **detail, "active": state.faults.active()})


@routes.get("/_lab/faults")
async def list_faults(request: web.Request) -> web.Response:
    """Counted faults still pending, and grants with a pending claims challenge or dead."""
    state = request.app[PROVIDER_STATE]
    active = state.faults.active()
    if any(g.challenge_nbf is not None for g in state.grants.values()):
        active.append({"fault": "claims_challenge"})
    dead = sum(1 for g in state.grants.values() if not g.alive)
    if dead:
        active.append({"fault": "kill_grant", "dead_grants": dead})
    return web.json_response(active)


@routes.delete("/_lab/faults")
async def clear_faults(request: web.Request) -> web.Response:
    """Clear counted faults and claims challenges. Dead grants stay dead (re-consent heals)."""
    request.app[PROVIDER_STATE].clear_faults()
    return web.json_response([])


@routes.get("/_lab/mails")
async def mails(request: web.Request) -> web.Response:
    """Every mail that actually went out, including ones whose answer was dropped."""
    return web.json_response([m.public() for m in request.app[PROVIDER_STATE].mails])


@routes.get("/_lab/calls")
async def calls(request: web.Request) -> web.Response:
    """The request log, optionally ``?path_prefix=/lab/oauth2``; it never holds tokens."""
    prefix = request.query.get("path_prefix", "")
    rows = [c.public() for c in request.app[PROVIDER_STATE].calls if c.path.startswith(prefix)]
    return web.json_response(rows)


@routes.post("/_lab/grants")
async def new_grant(request: web.Request) -> web.Response:
    """Mint a live grant without the browser flow (seeds tests and the lab)."""
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return _problem("body must be a JSON object")
    if not isinstance(body, dict) or not isinstance(body.get("scope", ""), str):
        return _problem("body must be a JSON object with an optional string 'scope'")
    state = request.app[PROVIDER_STATE]
    grant, access_token = state.new_grant(
        body.get("scope") or "offline_access User.Read Mail.Send Calendars.Read"
    )
    return web.json_response(
        {
            "refresh_token": grant.refresh_token,
            "access_token": access_token,
            "expires_in": state.config.access_token_ttl,
        }
    )


@routes.post("/_lab/reset")
async def reset(request: web.Request) -> web.Response:
    """Forget grants, tokens, codes, mails, calls and faults."""
    request.app[PROVIDER_STATE].reset()
    return web.json_response({"reset": True})
