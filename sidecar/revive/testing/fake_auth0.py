"""A fake Auth0 tenant that answers the Token Vault token exchange over real HTTP, with switches.

Built from the public documentation:

* Token Vault exchange, ``POST /oauth/token`` with ``grant_type=urn:auth0:params:oauth:
  grant-type:token-exchange:federated-connection-access-token``, ``client_id``,
  ``client_secret``, ``subject_token_type`` (``urn:ietf:params:oauth:token-type:
  refresh_token`` or ``...:access_token``), ``subject_token``, ``requested_token_type=
  http://auth0.com/oauth/token-type/federated-connection-access-token``, ``connection``,
  ``login_hint?``; success ``{"access_token", "expires_in", "scope", "token_type",
  "issued_token_type"}``; "Auth0 returns 401 if no user identity matching connection (and
  login_hint) is found"; refresh-token rotation is not supported:
  https://auth0.com/docs/api/authentication/token-vault-token-exchange/get-token
  https://auth0.com/docs/secure/tokens/token-vault/configure-refresh-token-exchange-with-token-vault
* The error codes for a missing linked account (``federated_connection_refresh_token_not_found``,
  401) and a failed upstream refresh (``federated_connection_refresh_token_flow_failed``) are
  the ones Auth0 answers in practice (seen in public Token Vault client code); Auth0's
  ``/oauth/token`` error body is ``{"error", "error_description"}`` (RFC 6749 §5.2), with 403
  ``invalid_grant`` "Unknown or invalid refresh token." for a dead subject token, 401
  ``invalid_client`` for bad client credentials, 403 ``unauthorized_client`` when the grant
  type is not enabled for the application:
  https://auth0.com/docs/api/authentication (Refresh Token, Standard Error Responses)
* Rate limits answer 429 ``too_many_requests`` with ``X-RateLimit-Limit``,
  ``X-RateLimit-Remaining``, ``X-RateLimit-Reset``:
  https://auth0.com/docs/troubleshoot/customer-support/operational-policies/rate-limit-policy

    async with running_fake_auth0() as auth0:
        rt = auth0.add_user("auth0|alice", connections={"google-oauth2"})
        auth0.fail_next.append((429, {"error": "too_many_requests"}, {"Retry-After": "7"}))
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeAuth0", "running_fake_auth0"]

GRANT = "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token"
REQUESTED = "http://auth0.com/oauth/token-type/federated-connection-access-token"
SUBJECT_TYPES = (
    "urn:ietf:params:oauth:token-type:refresh_token",
    "urn:ietf:params:oauth:token-type:access_token",
)


@dataclass
class FakeAuth0:
    """State and switches of one fake tenant.

    Attributes:
        url: ``http://127.0.0.1:PORT`` once started (the ``domain_url``).
        client_id / client_secret: the one application allowed to exchange.
        grant_enabled: whether the Token Vault grant type is enabled for it.
        users: Auth0 refresh token -> user id.
        linked: (user id, connection) -> the federated access token Token Vault holds.
        upstream_failed: (user id, connection) pairs whose upstream refresh now fails.
        expires_in: lifetime of federated tokens handed out.
        fail_next: ``(status, body, headers)`` answers for the next requests.
        requests: every form received (values verbatim: assert shapes in tests).
    """

    url: str = ""
    client_id: str = "client-revive"
    client_secret: str = field(default_factory=lambda: "cs-" + secrets.token_urlsafe(16))
    grant_enabled: bool = True
    users: dict[str, str] = field(default_factory=dict)
    linked: dict[tuple[str, str], str] = field(default_factory=dict)
    upstream_failed: set[tuple[str, str]] = field(default_factory=set)
    expires_in: int = 3600
    fail_next: list[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)

    def add_user(self, user_id: str, connections: set[str] | None = None) -> str:
        """Create a user with linked connections; return their Auth0 refresh token."""
        refresh_token = "v1.M" + secrets.token_urlsafe(24)
        self.users[refresh_token] = user_id
        for connection in connections or set():
            self.link(user_id, connection)
        return refresh_token

    def link(self, user_id: str, connection: str) -> str:
        """Connect an account (the Connected Accounts flow); return its federated token."""
        token = "ya29." + secrets.token_urlsafe(24)
        self.linked[(user_id, connection)] = token
        self.upstream_failed.discard((user_id, connection))
        return token

    def rotate_upstream(self, user_id: str, connection: str) -> str:
        """Token Vault refreshed the upstream token: a new federated access token."""
        return self.link(user_id, connection)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        if request.content_type == "application/json":
            raw = await request.json()
            form = {k: str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        else:
            form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(form)
        if self.fail_next:
            status, body, headers = self.fail_next.pop(0)
            return web.json_response(body, status=status, headers=headers)
        if form.get("client_id") != self.client_id or form.get("client_secret") != (
            self.client_secret
        ):
            return _error(401, "invalid_client", "Client authentication failed.")
        if form.get("grant_type") != GRANT:
            return _error(400, "unsupported_grant_type", "Unsupported grant type")
        if not self.grant_enabled:
            return _error(
                403, "unauthorized_client", f'Grant type "{GRANT}" not allowed for the client.'
            )
        for name in ("subject_token", "subject_token_type", "connection"):
            if not form.get(name):
                return _error(400, "invalid_request", f"Missing required parameter: {name}")
        if form["subject_token_type"] not in SUBJECT_TYPES:
            return _error(400, "invalid_request", "Invalid subject_token_type")
        if form.get("requested_token_type") != REQUESTED:
            return _error(400, "invalid_request", "Invalid requested_token_type")
        user = self.users.get(form["subject_token"])
        if user is None:
            return _error(403, "invalid_grant", "Unknown or invalid refresh token.")
        if form.get("login_hint") not in (None, user):
            return _error(
                401, "federated_connection_refresh_token_not_found",
                "Federated connection Refresh Token not found.",
            )
        key = (user, form["connection"])
        if key not in self.linked:
            return _error(
                401, "federated_connection_refresh_token_not_found",
                "Federated connection Refresh Token not found.",
            )
        if key in self.upstream_failed:
            return _error(
                401, "federated_connection_refresh_token_flow_failed",
                "Failed to refresh the federated connection access token.",
            )
        return web.json_response(
            {
                "access_token": self.linked[key],
                "expires_in": self.expires_in,
                "scope": "https://www.googleapis.com/auth/calendar.events",
                "token_type": "Bearer",
                "issued_token_type": REQUESTED,
            },
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )


def _error(status: int, code: str, description: str) -> web.Response:
    return web.json_response({"error": code, "error_description": description}, status=status)


@asynccontextmanager
async def running_fake_auth0(state: FakeAuth0 | None = None) -> AsyncIterator[FakeAuth0]:
    """Serve ``state`` (a new tenant by default) on 127.0.0.1, an ephemeral port."""
    tenant = state or FakeAuth0()
    runner = web.AppRunner(tenant.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        tenant.url = f"http://{host}:{port}"
        yield tenant
    finally:
        await runner.cleanup()
