"""A fake of the parts of Nango's API the ``nango`` source uses, served over real HTTP.

Built from Nango's public documentation and, where the docs leave the error shapes out, from
Nango's own server code (read 2026-11):

- GET connection: https://nango.dev/docs/reference/backend/http-api/connection/get
  (``GET /connection/{connectionId}?provider_config_key=&force_refresh=&refresh_token=``,
  ``Authorization: Bearer <secret key>``, the answer's ``credentials.access_token`` /
  ``credentials.expires_at``; "Every time you fetch the connection ... Nango will check if the
  access token has expired. If it has, it will refresh it").
  Error bodies: ``NangoHQ/nango:packages/server/lib/controllers/connection/connectionId/
  getConnection.ts`` and ``packages/server/lib/services/connectionRetrieval.service.ts``
  (``400 unknown_provider_config``, ``404 not_found``, and a failed refresh as
  ``{"error": {"code": "invalid_credentials", "message", "payload": {..., "connection"}}}``
  with the refresh error's status); NangoHQ/nango#4122 (424 once refresh attempts are
  exhausted); NangoHQ/nango#5505 (``connection_refresh_backoff`` for 30 s after a failure,
  bypassed by ``force_refresh``); ``refresh_token_external_error`` is a 400 whose payload carries
  the upstream's OAuth error (https://nango.dev/docs/guides/platform/common-issues).
  Refresh margin: tokens expiring within 15 minutes are refreshed on read
  (https://nango.dev/docs/guides/auth/token-refreshing, ``REFRESH_MARGIN_MS``).
- Secret-key auth: 401 ``{"error": {"code": "unknown_account", ...}}`` for a key that matches
  no environment (``NangoError('unknown_account')`` in ``packages/shared/lib/utils/error.ts``).
- Upstream mode and the connect flow (``revive.testing.fake_nango_connect``): a connection
  holds a real refresh token of the fake provider and is refreshed at its token endpoint.
- Webhooks: https://nango.dev/docs/guides/platform/webhooks-from-nango — POST, JSON body with
  stable key order, ``X-Nango-Hmac-Sha256`` = hex HMAC-SHA256(signing key, body) plus the legacy
  ``X-Nango-Signature`` = hex SHA-256(key + body); ``auth`` payload with ``operation``
  creation/override/refresh, ``success`` and, on failure, ``error.type``/``error.description``.

    async with running_fake_nango(secret_key="sk") as nango:
        nango.add_connection("acme", "microsoft")
        nango.fail_refresh("acme", "invalid_grant")

    async with running_fake_nango(secret_key="sk") as nango:  # upstream mode
        nango.upstreams["microsoft"] = UpstreamOAuth(token_url, authorize_url, "id", "secret")
        nango.add_upstream_connection("acme", "microsoft", refresh_token=grant["refresh_token"])
        nango.webhook_url = sidecar_url + "/v1/webhooks/nango"
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
from aiohttp import web

from revive.sources._nango_webhooks import LEGACY_SIGNATURE_HEADER, SIGNATURE_HEADER
from revive.testing.fake_nango_connect import (
    PendingConnect,
    UpstreamOAuth,
    add_connect_routes,
    refresh_upstream,
)

__all__ = [
    "FakeNango",
    "FakeNangoConnection",
    "UpstreamOAuth",
    "WebhookDelivery",
    "running_fake_nango",
    "send_auth_webhook",
    "webhook_body",
]

RefreshMode = Literal["ok", "invalid_grant", "invalid_client", "upstream_down", "exhausted"]
_REFRESH_MARGIN = 15 * 60
_BACKOFF = 30.0


@dataclass
class FakeNangoConnection:
    """One connection as Nango stores it (OAuth 2)."""

    connection_id: str
    provider_config_key: str
    access_token: str
    expires_at: float
    record_id: int
    provider: str = "microsoft"
    refresh_mode: RefreshMode = "ok"
    refresh_exhausted: bool = False
    last_refresh_failure: float | None = None
    refreshes: int = 0
    refresh_token: str | None = field(default=None, repr=False)  # upstream mode only


@dataclass(frozen=True)
class WebhookDelivery:
    """One webhook the fake POSTed, with the receiver's answer."""

    body: bytes
    status: int
    answer: bytes


@dataclass
class FakeNango:
    """State and HTTP handlers of the fake; ``url`` is set once it is serving."""

    secret_key: str
    clock: Callable[[], float] = time.time
    url: str = ""
    connections: dict[tuple[str, str], FakeNangoConnection] = field(default_factory=dict)
    integrations: set[str] = field(default_factory=set)
    calls: list[dict[str, Any]] = field(default_factory=list)
    server_error: int | None = None  # answer every API call with this 5xx while set
    delay: float = 0.0  # seconds each GET connection waits before answering
    upstreams: dict[str, UpstreamOAuth] = field(default_factory=dict)  # integration → client
    pending: dict[str, PendingConnect] = field(default_factory=dict)  # connect flows by state
    webhook_url: str | None = None  # where auth webhooks go; none are sent while unset
    webhook_signing_key: str | None = field(default=None, repr=False)  # default: secret key
    webhooks: list[WebhookDelivery] = field(default_factory=list)
    http: aiohttp.ClientSession | None = None  # for the provider and webhooks; set when served
    _next_id: int = 1

    # -- control (tests call these directly) -----------------------------------------------

    def add_connection(
        self,
        connection_id: str,
        provider_config_key: str,
        *,
        expires_in: float = 3600,
        provider: str = "microsoft",
    ) -> FakeNangoConnection:
        """Create (or re-create: a new record id) a connection with a fresh token."""
        self.integrations.add(provider_config_key)
        conn = FakeNangoConnection(
            connection_id=connection_id,
            provider_config_key=provider_config_key,
            access_token=_token(),
            expires_at=self.clock() + expires_in,
            record_id=self._next_id,
            provider=provider,
        )
        self._next_id += 1
        self.connections[(provider_config_key, connection_id)] = conn
        return conn

    def add_upstream_connection(
        self, connection_id: str, provider_config_key: str, *, refresh_token: str,
        access_token: str | None = None, expires_in: float = 3600,
    ) -> FakeNangoConnection:
        """A connection whose grant the provider issued; without an access token, the first
        read refreshes it at the provider. ``upstreams[provider_config_key]`` must be set."""
        assert provider_config_key in self.upstreams, "configure the integration's client first"
        conn = self.add_connection(connection_id, provider_config_key)
        conn.refresh_token = refresh_token
        if access_token is None:
            conn.expires_at = 0.0
        else:
            conn.access_token, conn.expires_at = access_token, self.clock() + expires_in
        return conn

    def install_grant(
        self, connection_id: str, provider_config_key: str, access_token: str,
        refresh_token: str, expires_in: float,
    ) -> FakeNangoConnection:
        """Store a grant from the connect flow: same record on an override, failures cleared."""
        conn = self.connections.get((provider_config_key, connection_id))
        if conn is None:
            conn = self.add_connection(connection_id, provider_config_key)
        conn.access_token, conn.refresh_token = access_token, refresh_token
        conn.expires_at = self.clock() + expires_in
        conn.refresh_mode, conn.refresh_exhausted, conn.last_refresh_failure = "ok", False, None
        return conn

    def connect_url(self, provider_config_key: str, connection_id: str) -> str:
        """The link a human opens to (re-)authorize a connection in Nango's connect UI."""
        return f"{self.url}/oauth/connect/{provider_config_key}?connection_id={connection_id}"

    async def notify_auth(
        self, connection_id: str, provider_config_key: str, *, operation: str, success: bool,
        error_type: str | None = None, error_description: str | None = None,
    ) -> WebhookDelivery | None:
        """POST a signed ``auth`` webhook to ``webhook_url``, as Nango does after auth events."""
        if self.webhook_url is None:
            return None
        body = webhook_body(
            connection_id, provider_config_key, operation=operation, success=success,
            error_type=error_type, error_description=error_description,
        )
        status, answer = await send_auth_webhook(
            self.webhook_url, self.webhook_signing_key or self.secret_key, body, session=self.http
        )
        delivery = WebhookDelivery(body, status, answer)
        self.webhooks.append(delivery)
        return delivery

    async def background_refresh(self, connection_id: str, provider_config_key: str) -> bool:
        """Nango's own periodic refresh, no caller involved; a failure sends the webhook.

        Returns:
            Whether the refresh succeeded.
        """
        conn = self.connection(connection_id, provider_config_key)
        return await self._refresh_if_needed(conn, force=True) is None

    def connection(self, connection_id: str, provider_config_key: str) -> FakeNangoConnection:
        return self.connections[(provider_config_key, connection_id)]

    def fail_refresh(
        self, connection_id: str, provider_config_key: str, mode: RefreshMode = "invalid_grant"
    ) -> None:
        """Make the upstream answer every refresh of this connection with ``mode``.

        ``exhausted`` marks the connection as Nango does after days of failed refreshes.
        """
        conn = self.connection(connection_id, provider_config_key)
        conn.refresh_mode = mode
        conn.refresh_exhausted = mode == "exhausted"

    def reauthorize(self, connection_id: str, provider_config_key: str) -> FakeNangoConnection:
        """The user re-authorized in Nango (``override``): new token, failure state cleared."""
        conn = self.connection(connection_id, provider_config_key)
        conn.access_token = _token()
        conn.expires_at = self.clock() + 3600
        conn.refresh_mode = "ok"
        conn.refresh_exhausted = False
        conn.last_refresh_failure = None
        return conn

    def expire(self, connection_id: str, provider_config_key: str) -> None:
        """Let the stored access token run out."""
        self.connection(connection_id, provider_config_key).expires_at = self.clock() - 1

    def force_refresh_calls(self) -> int:
        """How many GET connection calls asked for ``force_refresh=true``."""
        return sum(1 for c in self.calls if c.get("force_refresh") == "true")

    # -- HTTP ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/connection/{connectionId}", self._get_connection)
        add_connect_routes(app, self)
        return app

    async def _get_connection(self, request: web.Request) -> web.Response:
        query = request.query
        self.calls.append(
            {
                "path": request.path,
                "connection_id": request.match_info["connectionId"],
                "provider_config_key": query.get("provider_config_key"),
                "force_refresh": query.get("force_refresh"),
                "authorization": request.headers.get("Authorization", ""),
            }
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        auth = request.headers.get("Authorization")
        if auth is None:
            return _error(
                401,
                "missing_auth_header",
                "Authentication failed. The request is missing the Authorization header.",
            )
        scheme, _, key = auth.partition(" ")
        if scheme != "Bearer" or not key:
            return _error(
                401,
                "malformed_auth_header",
                "Authentication failed. The Authorization header is malformed.",
            )
        if key != self.secret_key:
            return _error(
                401,
                "unknown_account",
                "Authentication failed. The provided secret/public key does not match any account.",
            )
        if self.server_error is not None:
            return _error(self.server_error, "server_error", "Internal server error")
        unknown = set(query) - {
            "provider_config_key",
            "force_refresh",
            "refresh_token",
            "refresh_github_app_jwt_token",
        }
        key_param = query.get("provider_config_key")
        if unknown or not key_param or query.get("force_refresh", "false") not in ("true", "false"):
            return web.json_response(
                {"error": {"code": "invalid_query_params", "errors": sorted(unknown)}}, status=400
            )
        if key_param not in self.integrations:
            return _error(400, "unknown_provider_config", "Provider does not exists")
        conn = self.connections.get((key_param, request.match_info["connectionId"]))
        if conn is None:
            return _error(404, "not_found", "Failed to find connection")
        force = query.get("force_refresh") == "true"
        failure = await self._refresh_if_needed(conn, force)
        if failure is not None:
            status, message, payload = failure
            return web.json_response(
                {
                    "error": {
                        "code": "invalid_credentials",
                        "message": message,
                        "payload": {**payload, "connection": self._public(conn, credentials=False)},
                    }
                },
                status=status,
            )
        return web.json_response(self._public(conn, credentials=True))

    async def _refresh_if_needed(
        self, conn: FakeNangoConnection, force: bool
    ) -> tuple[int, str, dict[str, Any]] | None:
        now = self.clock()
        if not force:
            if conn.refresh_exhausted:
                return 424, "Connection refresh attempts exhausted", {}
            if conn.last_refresh_failure is not None and now - conn.last_refresh_failure < _BACKOFF:
                return 424, "A recent refresh attempt failed. Backing off before retrying.", {}
            if conn.expires_at - now > _REFRESH_MARGIN:
                return None
        upstream = self.upstreams.get(conn.provider_config_key)
        if upstream is not None and conn.refresh_token is not None:
            failure = await refresh_upstream(self, conn, upstream)
        else:
            failure = self._refresh_scripted(conn, now)
        if failure is not None:
            # Nango tells the app about every failed refresh with an auth webhook.
            await self.notify_auth(
                conn.connection_id, conn.provider_config_key, operation="refresh",
                success=False, error_type="refresh_token_external_error",
                error_description=failure[1][:200],
            )
        return failure

    def _refresh_scripted(
        self, conn: FakeNangoConnection, now: float
    ) -> tuple[int, str, dict[str, Any]] | None:
        """A refresh decided by ``refresh_mode`` (no provider behind the connection)."""
        if conn.refresh_mode == "ok":
            conn.access_token = _token()
            conn.expires_at = now + 3600
            conn.refreshes += 1
            conn.last_refresh_failure = None
            return None
        conn.last_refresh_failure = now
        upstream: dict[str, Any]
        if conn.refresh_mode in ("invalid_grant", "exhausted"):
            upstream = {
                "error": "invalid_grant",
                "error_description": "Token has been expired or revoked.",
            }
            status = 400
        elif conn.refresh_mode == "invalid_client":
            upstream = {"error": "invalid_client", "error_description": "Client secret expired."}
            status = 401
        else:
            upstream = {"message": "Response Error: 503 Service Unavailable"}
            status = 503
        payload = {
            "external_message": f"Response Error: {status}",
            "external_request_details": {"statusCode": status},
            "dataMessage": upstream,
        }
        message = (
            "The external API returned an error when trying to refresh the access token. "
            "Please try again later. " + json.dumps(payload, indent=2)
        )
        return 400, message, payload

    def _public(self, conn: FakeNangoConnection, *, credentials: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": conn.record_id,
            "connection_id": conn.connection_id,
            "provider_config_key": conn.provider_config_key,
            "provider": conn.provider,
            "errors": []
            if conn.last_refresh_failure is None and not conn.refresh_exhausted
            else [{"type": "auth", "log_id": "log_" + secrets.token_hex(4)}],
            "end_user": None,
            "metadata": None,
            "connection_config": {},
            "created_at": _iso(self.clock()),
            "updated_at": _iso(self.clock()),
            "last_fetched_at": _iso(self.clock()),
        }
        if credentials:
            body["credentials"] = {
                "type": "OAUTH2",
                "access_token": conn.access_token,
                "expires_at": _iso(conn.expires_at),
                "raw": {
                    "token_type": "Bearer",
                    "access_token": conn.access_token,
                    "expires_in": max(0, int(conn.expires_at - self.clock())),
                },
            }
        return body


@asynccontextmanager
async def running_fake_nango(
    secret_key: str = "nango-secret-key-fake", clock: Callable[[], float] = time.time
) -> AsyncIterator[FakeNango]:
    """Serve a ``FakeNango`` on ``127.0.0.1`` at an ephemeral port for the ``with`` block."""
    fake = FakeNango(secret_key=secret_key, clock=clock)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        fake.url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            fake.http = http
            yield fake
    finally:
        await runner.cleanup()


def webhook_body(
    connection_id: str,
    provider_config_key: str,
    *,
    operation: str = "override",
    success: bool = True,
    error_type: str | None = None,
    error_description: str | None = None,
    provider: str = "microsoft",
) -> bytes:
    """An ``auth`` webhook body as Nango sends it (stable key order, compact JSON)."""
    payload: dict[str, Any] = {
        "type": "auth",
        "operation": operation,
        "connectionId": connection_id,
        "authMode": "OAUTH2",
        "providerConfigKey": provider_config_key,
        "provider": provider,
        "environment": "DEV",
        "success": success,
        "tags": {"end_user_id": "user-1"},
    }
    if not success:
        payload["error"] = {
            "type": error_type or "refresh_token_external_error",
            "description": error_description or "Token has been expired or revoked.",
        }
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


async def send_auth_webhook(
    url: str,
    signing_key: str | bytes,
    body: bytes,
    *,
    forged: bool = False,
    session: aiohttp.ClientSession | None = None,
) -> tuple[int, bytes]:
    """POST ``body`` to ``url`` signed as Nango signs it; ``forged`` signs with a wrong key.

    Returns:
        The receiver's status and body.
    """
    key = signing_key.encode() if isinstance(signing_key, str) else signing_key
    if forged:
        key = b"forged-" + key
    headers = {
        "content-type": "application/json",
        "user-agent": "nango/fake",
        SIGNATURE_HEADER: hmac.new(key, body, hashlib.sha256).hexdigest(),
        LEGACY_SIGNATURE_HEADER: hashlib.sha256(key + body).hexdigest(),
    }
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        async with http.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.read()
    finally:
        if own:
            await http.close()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _token() -> str:
    return "nango-at-" + secrets.token_urlsafe(24)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
