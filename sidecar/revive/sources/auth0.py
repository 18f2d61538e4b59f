"""A source that leases a federated connection's access token from Auth0 Token Vault.

Auth0 keeps the upstream grant (e.g. a user's Google refresh token); the sidecar holds only the
user's Auth0 refresh token (``subject_token_file``) and exchanges it, per RFC 8693, for the
upstream access token at ``POST {domain_url}/oauth/token`` with grant type
``urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token``.
Token Vault does not rotate the subject refresh token, so nothing is ever written back.

https://auth0.com/docs/api/authentication/token-vault-token-exchange/get-token

What Auth0's answers mean here:

* no linked account for the connection (``federated_connection_refresh_token_not_found``, or
  any other 401 that is not client authentication: "Auth0 returns 401 if no user identity
  matching connection and login_hint is found"), the upstream refresh failed
  (``federated_connection_refresh_token_flow_failed``), or the Auth0 refresh token itself is
  dead (``invalid_grant``) -> ``DeadGrant(provider_code=<Auth0's error>)``;
* ``invalid_client``, ``unauthorized_client``, ``access_denied``, ``invalid_request``,
  ``unsupported_grant_type`` -> ``CredentialMisconfigured``;
* 429, 5xx, timeouts -> ``CredentialUnavailable`` with ``Retry-After`` (or Auth0's
  ``X-RateLimit-Reset``) as ``retry_after``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import aiohttp
from yarl import URL

from revive.config import Auth0SourceConfig
from revive.errors import CredentialError, CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.redact import redact
from revive.sources.base import Lease, superseded
from revive.sources.grants import read_secret_file
from revive.sources.token_endpoint import number, parse_answer, post_bounded_form

__all__ = [
    "FEDERATED_TOKEN_TYPE",
    "TOKEN_VAULT_GRANT",
    "Auth0Source",
    "Auth0SourceConfig",
]

log = logging.getLogger(__name__)

TOKEN_VAULT_GRANT = (
    "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token"
)
FEDERATED_TOKEN_TYPE = "http://auth0.com/oauth/token-type/federated-connection-access-token"

_DEAD_CODES = frozenset(
    {
        "federated_connection_refresh_token_not_found",
        "federated_connection_refresh_token_flow_failed",
        "tokenset_not_found",
        "invalid_grant",
    }
)
_MISCONFIGURED_CODES = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "access_denied",
        "invalid_request",
        "unsupported_grant_type",
        "invalid_scope",
    }
)


class Auth0Source:
    """``CredentialSource`` over Auth0 Token Vault's federated-connection token exchange.

    Args:
        connection_id: the Revive connection this source serves.
        config: tenant, client, Auth0 connection and subject-token settings.
        http: a shared client session; the source does not close it.
        clock: unix time, replaceable in tests.
    """

    def __init__(
        self,
        connection_id: str,
        config: Auth0SourceConfig,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection_id = connection_id
        self._config = config
        self._http = http
        self._clock = clock
        self._lock = asyncio.Lock()
        self._lease: Lease | None = None
        self._client_secret: str | None = None
        self._subject: str | None = None  # last subject token read, for redaction only
        self._host = URL(config.domain_url).host or config.domain_url

    def __repr__(self) -> str:
        return (
            f"Auth0Source(connection_id={self.connection_id!r}, "
            f"domain_url={self._config.domain_url!r}, connection={self._config.connection!r})"
        )

    async def lease(self) -> Lease:
        """See ``CredentialSource.lease``; exchanges when the cached token is (nearly) expired.

        A token that is close to expiry but still valid is kept if the exchange fails
        transiently.
        """
        current = self._lease
        now = self._clock()
        if current is not None and not current.expired(now, self._config.refresh_skew_seconds):
            return current
        try:
            return await self._exchange_once(current)
        except CredentialUnavailable:
            if current is not None and not current.expired(self._clock()):
                log.warning(
                    "token vault exchange for %s failed transiently; serving the cached token",
                    self.connection_id,
                )
                return current
            raise

    async def refresh(self, stale: Lease | None, *, claims: str | None = None) -> Lease:
        """See ``CredentialSource.refresh``; ``claims`` cannot be passed to Token Vault and only
        forces a new exchange."""
        observed = stale if stale is not None else self._lease
        return await self._exchange_once(observed, force=claims is not None)

    async def close(self) -> None:
        """No background work; the client session is the caller's."""

    async def _exchange_once(self, observed: Lease | None, *, force: bool = False) -> Lease:
        async with self._lock:
            current = self._lease
            now = self._clock()
            if not force and superseded(current, observed, now):
                assert current is not None
                return current  # another caller exchanged while we waited
            self._lease = await self._exchange()
            return self._lease

    # -- one exchange --------------------------------------------------------------------------

    def _secrets(self) -> list[str]:
        known = [self._client_secret or "", self._subject or ""]
        if self._lease is not None:
            known.append(self._lease.access_token)
        return known

    async def _exchange(self) -> Lease:
        config = self._config
        if self._client_secret is None:
            self._client_secret = await read_secret_file(
                config.client_secret_file, f"client_secret_file of {self.connection_id!r}"
            )
        self._subject = await read_secret_file(
            config.subject_token_file, f"subject_token_file of {self.connection_id!r}"
        )
        form = {
            "grant_type": TOKEN_VAULT_GRANT,
            "client_id": config.client_id,
            "client_secret": self._client_secret,
            "subject_token_type": config.subject_token_type,
            "subject_token": self._subject,
            "requested_token_type": FEDERATED_TOKEN_TYPE,
            "connection": config.connection,
        }
        if config.login_hint:
            form["login_hint"] = config.login_hint
        status, headers, body = await self._post(form)
        payload = parse_answer(headers.get("Content-Type", ""), body)
        if status == 200:
            token = payload.get("access_token")
            if not isinstance(token, str) or not token:
                raise CredentialUnavailable(
                    f"auth0 {self._host} answered the exchange without an access_token",
                    provider_code="auth0_bad_answer",
                )
            now = self._clock()
            expires_in = number(payload.get("expires_in"))
            return Lease(
                connection_id=self.connection_id,
                generation=1,
                access_token=token,
                expires_at=None if expires_in is None else now + expires_in,
            )
        raise self._error(status, headers, payload)

    def _error(
        self, status: int, headers: Mapping[str, str], payload: Mapping[str, object]
    ) -> CredentialError:
        secrets = self._secrets()
        raw_code = payload.get("error")
        raw_message = payload.get("error_description")
        code = redact(raw_code, secrets)[:200] if isinstance(raw_code, str) else None
        message = redact(raw_message, secrets)[:500] if isinstance(raw_message, str) else None
        what = (
            f"auth0 {self._host} refused the token vault exchange for connection"
            f" {self._config.connection!r} ({self.connection_id!r}): {status}"
            f" {code or 'no error code'}"
        )
        if message:
            what += f": {message}"
        if status == 429 or status >= 500:
            return CredentialUnavailable(
                what,
                provider_code=code or f"http_{status}",
                provider_message=message,
                retry_after=self._retry_after(headers),
            )
        if code in _DEAD_CODES or (status == 401 and code not in _MISCONFIGURED_CODES):
            return DeadGrant(
                what, provider_code=code or "no_linked_identity", provider_message=message
            )
        return CredentialMisconfigured(
            what, provider_code=code or f"http_{status}", provider_message=message
        )

    def _retry_after(self, headers: Mapping[str, str]) -> float | None:
        retry = number(headers.get("Retry-After"))
        if retry is not None:
            return retry
        reset = number(headers.get("X-RateLimit-Reset"))  # unix time the bucket refills
        if reset is not None:
            return max(reset - self._clock(), 0.0) or None
        return None

    async def _post(self, form: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        return await post_bounded_form(
            self._http, self._config.token_url, form,
            timeout_seconds=self._config.timeout_seconds, what=f"auth0 {self._host}",
            code_prefix="auth0",
        )
