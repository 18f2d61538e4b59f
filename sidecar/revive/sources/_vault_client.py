"""A minimal HashiCorp Vault HTTP client: token or Kubernetes auth, renew-self, KV v2.

Shared by ``VaultSource`` (reads) and ``write_with_cas`` (the oauth2 refresher's write-back).
Every request is bounded (answer size, timeout), never follows redirects (a 307 would carry
``X-Vault-Token`` elsewhere) and raises only ``revive.errors.CredentialError`` subclasses whose
text names the Vault host, the path and Vault's own (redacted) error strings, never a token.

API shapes: https://developer.hashicorp.com/vault/api-docs (status codes, ``{"errors": []}``),
https://developer.hashicorp.com/vault/api-docs/auth/kubernetes#login,
https://developer.hashicorp.com/vault/api-docs/auth/token#renew-a-token-self,
https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from revive.config import VaultAccessConfig
from revive.errors import CredentialMisconfigured, CredentialUnavailable
from revive.redact import redact
from revive.sources.grants import read_secret_file
from revive.sources.token_endpoint import number

log = logging.getLogger("revive.sources.vault")

MAX_ANSWER_BYTES = 256 * 1024
_RENEW_FRACTION = 2 / 3  # renew the Vault token once this much of its lease has passed


def vault_errors(payload: Mapping[str, Any]) -> str | None:
    """Vault's ``{"errors": [...]}`` joined, or ``None`` if it gave none."""
    errors = payload.get("errors")
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)[:500]
    return None


class VaultClient:
    """Holds one Vault token for one config: logs in, renews, re-logs in once on 403.

    Not safe for concurrent use by itself; ``VaultSource`` serialises calls under its lock.
    """

    def __init__(
        self,
        config: VaultAccessConfig,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        *,
        owner: str = "vault",
    ) -> None:
        self._config = config
        self._http = http
        self._clock = clock
        self._owner = owner
        self._base = URL(config.address.rstrip("/") + "/")
        self.host = self._base.host or config.address
        self._token: str | None = None
        self._token_expires_at: float | None = None  # None: unknown or never
        self._renew_at: float | None = None
        self._renewable = False
        self._full_lease: float | None = None  # the lease the last login granted
        self._extra_secrets: list[str] = []

    def __repr__(self) -> str:
        return f"VaultClient(address={self._config.address!r}, auth={self._config.auth!r})"

    def secrets(self) -> list[str]:
        """Everything this client knows that must never reach text."""
        return [s for s in (self._token, *self._extra_secrets) if s]

    def remember_secret(self, value: str) -> None:
        """Register a value (e.g. a secret read from Vault) for redaction."""
        if value and value not in self._extra_secrets:
            self._extra_secrets = [*self._extra_secrets[-7:], value]

    # -- requests ------------------------------------------------------------------------------

    async def call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, Mapping[str, str], dict[str, Any]]:
        """An authenticated request; on 403 logs in again (or re-reads the token) once.

        Returns status, headers and the parsed JSON object (``{}`` if none).
        """
        token = await self._ensure_token()
        status, headers, payload = await self._send(method, path, body, token)
        if status == 403:
            log.info("vault %s answered 403 for %s; authenticating again", self.host, path)
            token = await self._login(forced=True)
            status, headers, payload = await self._send(method, path, body, token)
        return status, headers, payload

    async def _send(
        self, method: str, path: str, body: Mapping[str, Any] | None, token: str | None
    ) -> tuple[int, Mapping[str, str], dict[str, Any]]:
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["X-Vault-Token"] = token
        if self._config.namespace:
            headers["X-Vault-Namespace"] = self._config.namespace
        url = self._base.join(URL("v1/" + path, encoded=False))
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_seconds)
        try:
            async with self._http.request(
                method,
                url,
                json=None if body is None else dict(body),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                raw = bytearray()
                while len(raw) <= MAX_ANSWER_BYTES:
                    chunk = await resp.content.read(MAX_ANSWER_BYTES + 1 - len(raw))
                    if not chunk:
                        break
                    raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    raise CredentialUnavailable(
                        f"vault {self.host} answered more than {MAX_ANSWER_BYTES} bytes"
                        f" for {path}",
                        provider_code="vault_answer_too_large",
                    )
                try:
                    payload = json.loads(bytes(raw)) if raw else {}
                except ValueError:
                    payload = {}
                return resp.status, resp.headers, payload if isinstance(payload, dict) else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CredentialUnavailable(
                f"vault {self.host} unreachable for {path}: {type(exc).__name__}",
                provider_code="vault_unreachable",
            ) from None

    def fail(
        self,
        status: int,
        headers: Mapping[str, str],
        payload: Mapping[str, Any],
        path: str,
    ) -> CredentialUnavailable | CredentialMisconfigured:
        """The error a non-2xx answer (other than the caller's own special cases) calls for."""
        message = vault_errors(payload)
        if message is not None:
            message = redact(message, self.secrets())
        what = f"vault {self.host} answered {status} for {path}"
        if message:
            what += f": {message}"
        retry_after = number(headers.get("Retry-After"))
        if status == 503 and message and "sealed" in message.lower():
            return CredentialUnavailable(
                what, provider_code="vault_sealed", provider_message=message,
                retry_after=retry_after,
            )
        if status in (412, 429, 472, 473) or status >= 500:
            # 412: a performance standby has not caught up yet; 429: rate limited or standby.
            return CredentialUnavailable(
                what, provider_code=f"vault_http_{status}", provider_message=message,
                retry_after=retry_after,
            )
        if status == 403:
            return CredentialMisconfigured(
                f"{what} (even after authenticating again)",
                provider_code="vault_permission_denied", provider_message=message,
            )
        return CredentialMisconfigured(
            what, provider_code=f"vault_http_{status}", provider_message=message
        )

    # -- authentication ------------------------------------------------------------------------

    async def _ensure_token(self) -> str:
        if self._token is None:
            return await self._login(forced=False)
        now = self._clock()
        if self._token_expires_at is not None and now >= self._token_expires_at:
            return await self._login(forced=False)
        if self._renew_at is not None and now >= self._renew_at:
            await self._renew()
            assert self._token is not None
        return self._token

    async def _renew(self) -> None:
        """Renew before the lease ends: renew-self when renewable, else log in again."""
        if not self._renewable or self._config.auth == "token":
            # A token from a file cannot be re-issued by us; re-read it (Vault Agent rewrites it).
            await self._login(forced=False)
            return
        path = "auth/token/renew-self"
        try:
            status, _, payload = await self._send("POST", path, {}, self._token)
        except CredentialUnavailable:
            if self._still_valid():
                self._renew_at = None if self._token_expires_at is None else self._clock() + 5
                return
            raise
        auth = payload.get("auth") if status == 200 else None
        if isinstance(auth, dict) and auth.get("client_token") in (None, self._token):
            full = self._full_lease
            self._adopt(self._token, auth)
            granted = number(auth.get("lease_duration"))
            if full is not None and (granted is None or granted < full * (1 - _RENEW_FRACTION)):
                # Near its max TTL Vault grants ever shorter renewals: start a new token.
                log.info("vault token of %s is near its max TTL; logging in again", self._owner)
                await self._login(forced=False)
                return
            log.debug("renewed the vault token of %s", self._owner)
            return
        log.info("vault %s refused renew-self (%s); logging in again", self.host, status)
        await self._login(forced=False)

    def _still_valid(self) -> bool:
        return self._token_expires_at is None or self._clock() < self._token_expires_at

    async def _login(self, *, forced: bool) -> str:
        config = self._config
        if config.auth == "token":
            assert config.token_file is not None
            token = await read_secret_file(config.token_file, f"token_file of {self._owner}")
            self._token, self._token_expires_at, self._renew_at = token, None, None
            self._renewable = False
            return token
        assert config.kubernetes_role is not None
        jwt = await read_secret_file(
            config.kubernetes_jwt_file, f"kubernetes_jwt_file of {self._owner}"
        )
        self.remember_secret(jwt)
        path = f"auth/{config.kubernetes_mount}/login"
        status, headers, payload = await self._send(
            "POST", path, {"role": config.kubernetes_role, "jwt": jwt}, None
        )
        auth = payload.get("auth") if status == 200 else None
        issued = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(issued, str) or not issued:
            if status == 200:
                raise CredentialUnavailable(
                    f"vault {self.host} answered {path} without auth.client_token",
                    provider_code="vault_bad_answer",
                )
            error = self.fail(status, headers, payload, path)
            if isinstance(error, CredentialMisconfigured):
                # 400 (unknown role) or 403 (JWT refused): the sidecar's own setup is wrong.
                error.provider_code = "vault_login_refused"
            raise error
        assert isinstance(auth, dict)
        self._adopt(issued, auth)
        self._full_lease = number(auth.get("lease_duration"))
        if forced:
            log.info("logged in to vault %s again for %s", self.host, self._owner)
        return issued

    def _adopt(self, token: str | None, auth: Mapping[str, Any]) -> None:
        now = self._clock()
        self._token = token
        self.remember_secret(token or "")
        lease = number(auth.get("lease_duration"))
        self._renewable = bool(auth.get("renewable"))
        if lease is None:  # 0: a root-like token that never expires
            self._token_expires_at = self._renew_at = None
        else:
            self._token_expires_at = now + lease
            self._renew_at = now + lease * _RENEW_FRACTION
