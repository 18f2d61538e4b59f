"""The fake Nango's upstream mode: grants held against a real (fake) OAuth provider.

In this mode a connection holds a refresh token the provider issued, and the fake Nango
refreshes it at the provider's token endpoint, as real Nango does, so a provider-side fault
(``kill_grant``) surfaces through Nango the documented way: a 400 ``invalid_credentials``
whose payload carries the provider's own error body. A re-authorization goes through Nango's
connect flow: Nango sends the browser to the provider's consent page with its own callback,
exchanges the code (PKCE S256), stores the new grant under the same connection and then POSTs
the signed ``auth`` webhook (``operation: override``, ``success: true``) by itself.

Sources (read 2026-11): https://nango.dev/docs/guides/auth/token-refreshing (Nango refreshes
with the stored refresh token and reports a failure with an ``auth`` webhook,
``operation: refresh``, ``success: false``); https://nango.dev/docs/guides/platform/
webhooks-from-nango (``override`` after a re-authorization of an existing connection,
``creation`` for a new one); Nango's public ``GET /oauth/connect/{providerConfigKey}``
(``connection_id`` query) and ``GET /oauth/callback`` routes
(``NangoHQ/nango:packages/server/lib/controllers/oauth.controller.ts``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from yarl import URL

if TYPE_CHECKING:
    from revive.testing.fake_nango import FakeNango, FakeNangoConnection

__all__ = ["PendingConnect", "UpstreamOAuth", "add_connect_routes", "exchange", "refresh_upstream"]

Failure = tuple[int, str, dict[str, Any]]
"""``(Nango's status, message, payload)`` of a failed refresh, as the fake answers it."""

_TIMEOUT = aiohttp.ClientTimeout(total=10)
_PAGE = "<!doctype html><html><body><p>{}</p></body></html>"


@dataclass(frozen=True)
class UpstreamOAuth:
    """An integration's OAuth client as Nango holds it (the "provider config")."""

    token_url: str
    authorize_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PendingConnect:
    """One connect flow between the redirect to the provider and its callback."""

    provider_config_key: str
    connection_id: str
    verifier: str = field(repr=False)
    redirect_uri: str


async def exchange(
    http: aiohttp.ClientSession, upstream: UpstreamOAuth, form: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """POST one grant to the provider's token endpoint: ``(status, JSON body or {})``."""
    data = {**form, "client_id": upstream.client_id, "client_secret": upstream.client_secret}
    if upstream.scopes:
        data.setdefault("scope", " ".join(upstream.scopes))
    try:
        async with http.post(upstream.token_url, data=data, timeout=_TIMEOUT) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {}
            return resp.status, body if isinstance(body, dict) else {}
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 503, {"message": f"Response Error: {type(exc).__name__}"}


async def refresh_upstream(
    fake: FakeNango, conn: FakeNangoConnection, upstream: UpstreamOAuth
) -> Failure | None:
    """Refresh ``conn`` at the provider; store the rotated grant, or describe the failure."""
    assert fake.http is not None, "serve the fake with running_fake_nango"
    assert conn.refresh_token is not None, "an upstream connection holds a refresh token"
    status, body = await exchange(
        fake.http, upstream, {"grant_type": "refresh_token", "refresh_token": conn.refresh_token}
    )
    now = fake.clock()
    token = body.get("access_token")
    if status == 200 and isinstance(token, str):
        conn.access_token = token
        conn.refresh_token = str(body.get("refresh_token") or conn.refresh_token)
        conn.expires_at = now + float(body.get("expires_in") or 3600)
        conn.refreshes += 1
        conn.last_refresh_failure = None
        return None
    conn.last_refresh_failure = now
    # Nango's refresh_token_external_error: the provider's own body travels in the payload.
    payload = {
        "external_message": f"Response Error: {status}",
        "external_request_details": {"statusCode": status},
        "dataMessage": body,
    }
    message = (
        "The external API returned an error when trying to refresh the access token. "
        "Please try again later. " + json.dumps(payload, indent=2)
    )
    return 400, message, payload


def add_connect_routes(app: web.Application, fake: FakeNango) -> None:
    """Nango's connect flow: ``/oauth/connect/{providerConfigKey}`` and ``/oauth/callback``."""

    async def connect(request: web.Request) -> web.Response:
        key = request.match_info["providerConfigKey"]
        connection_id = request.query.get("connection_id")
        upstream = fake.upstreams.get(key)
        if upstream is None or not connection_id:
            return web.Response(status=400, text=_PAGE.format("unknown integration"),
                                content_type="text/html")
        state = secrets.token_urlsafe(16)
        verifier = secrets.token_urlsafe(48)
        redirect_uri = f"{fake.url}/oauth/callback"
        fake.pending[state] = PendingConnect(key, connection_id, verifier, redirect_uri)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        location = URL(upstream.authorize_url).with_query({
            "client_id": upstream.client_id, "response_type": "code",
            "redirect_uri": redirect_uri, "scope": " ".join(upstream.scopes), "state": state,
            "code_challenge": challenge.rstrip(b"=").decode(), "code_challenge_method": "S256",
        })
        raise web.HTTPFound(str(location))

    async def callback(request: web.Request) -> web.Response:
        pending = fake.pending.pop(request.query.get("state", ""), None)
        if pending is None:
            return web.Response(status=400, text=_PAGE.format("unknown or used state"),
                                content_type="text/html")
        upstream = fake.upstreams[pending.provider_config_key]
        existing = fake.connections.get((pending.provider_config_key, pending.connection_id))
        operation = "override" if existing is not None else "creation"
        code = request.query.get("code")
        status, body = (400, {"error": request.query.get("error", "missing code")})
        if code:
            assert fake.http is not None
            status, body = await exchange(fake.http, upstream, {
                "grant_type": "authorization_code", "code": code,
                "redirect_uri": pending.redirect_uri, "code_verifier": pending.verifier,
            })
        token, refresh = body.get("access_token"), body.get("refresh_token")
        if status != 200 or not isinstance(token, str) or not isinstance(refresh, str):
            await fake.notify_auth(pending.connection_id, pending.provider_config_key,
                                   operation=operation, success=False,
                                   error_type="oauth_exchange_failed",
                                   error_description=str(body.get("error", status)))
            return web.Response(status=400, text=_PAGE.format("authorization failed"),
                                content_type="text/html")
        fake.install_grant(pending.connection_id, pending.provider_config_key, token, refresh,
                           float(body.get("expires_in") or 3600))
        await fake.notify_auth(pending.connection_id, pending.provider_config_key,
                               operation=operation, success=True)
        return web.Response(text=_PAGE.format("Connection successful. You can close this window."),
                            content_type="text/html")

    app.router.add_get("/oauth/connect/{providerConfigKey}", connect)
    app.router.add_get("/oauth/callback", callback)
