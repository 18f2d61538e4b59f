"""A source that leases an access token kept in HashiCorp Vault's KV v2 secrets engine.

Someone else (an operator, a job, another sidecar's oauth2 refresher via ``write_with_cas``)
keeps ``{mount}/data/{path}`` up to date; this source reads ``field`` from its latest version.
It authenticates with a token file (e.g. a Vault Agent sink) or the Kubernetes auth method and
keeps its own Vault token alive (renew-self while renewable, otherwise a new login).

What Vault's answers mean here:

* 404, a deleted latest version, or a secret without ``field``: nobody holds a grant for this
  connection -> ``DeadGrant(provider_code="vault_secret_missing")``.
* 403: the Vault token is bad -> one new login (or re-read of the token file), then
  ``CredentialMisconfigured(provider_code="vault_permission_denied")``.
* 5xx, 503 sealed, 412/429 standby answers, timeouts -> ``CredentialUnavailable``.

The secret may say when its token expires (``expires_at``, unix time); a positive
``lease_duration`` on the read also bounds how long the value is cached.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from revive.errors import CredentialUnavailable, DeadGrant
from revive.config import VaultAccessConfig, VaultSourceConfig
from revive.sources._vault_client import VaultClient, vault_errors
from revive.sources.base import Lease, superseded
from revive.sources.token_endpoint import number

__all__ = [
    "VaultCasConflict",
    "VaultSecret",
    "VaultSource",
    "VaultSourceConfig",
    "read_secret",
    "write_with_cas",
]

_REREAD_FLOOR = 5.0  # seconds between re-reads that keep returning the same expired token


class VaultCasConflict(CredentialUnavailable):
    """A check-and-set write lost: the secret's version was no longer ``expected_version``.

    Transient by class (nothing is broken), but the writer must re-read before retrying: the
    winner's value (e.g. a rotated refresh token) is now the current one.
    """


@dataclass(frozen=True)
class VaultSecret:
    """One KV v2 version: its key/value data, version number and read lease (0 = none)."""

    data: dict[str, Any] = field(repr=False)
    version: int
    lease_duration: float | None = None


def _data_path(config: VaultAccessConfig) -> str:
    return f"{quote(config.mount)}/data/{quote(config.path)}"


async def _read(client: VaultClient, config: VaultSourceConfig, owner: str) -> VaultSecret:
    path = _data_path(config)
    status, headers, payload = await client.call("GET", path)
    if status == 404:
        raise DeadGrant(
            f"vault {client.host} has no secret at {path} for {owner}",
            provider_code="vault_secret_missing",
            provider_message=vault_errors(payload),
        )
    if status != 200:
        raise client.fail(status, headers, payload, path)
    outer = payload.get("data")
    inner = outer.get("data") if isinstance(outer, dict) else None
    metadata = outer.get("metadata") if isinstance(outer, dict) else None
    if not isinstance(inner, dict):
        # KV v2 answers a deleted (not destroyed) latest version with data null.
        raise DeadGrant(
            f"vault {client.host}: the latest version at {path} is deleted ({owner})",
            provider_code="vault_secret_missing",
        )
    version = metadata.get("version") if isinstance(metadata, dict) else None
    for value in inner.values():
        if isinstance(value, str):
            client.remember_secret(value)
    return VaultSecret(
        data=inner,
        version=version if isinstance(version, int) else 0,
        lease_duration=number(payload.get("lease_duration")),
    )


async def read_secret(
    http: aiohttp.ClientSession,
    config: VaultSourceConfig,
    *,
    clock: Callable[[], float] = time.time,
) -> VaultSecret:
    """Read the latest version at ``config.path`` (for a writer that needs its version).

    Raises:
        DeadGrant: no secret there (``vault_secret_missing``).
        CredentialUnavailable: Vault sealed, failing or unreachable.
        CredentialMisconfigured: the Vault credentials were refused.
    """
    client = VaultClient(config, http, clock, owner=f"vault path {config.path!r}")
    return await _read(client, config, f"path {config.path!r}")


async def write_with_cas(
    http: aiohttp.ClientSession,
    config: VaultAccessConfig,
    data: dict[str, Any],
    expected_version: int,
    *,
    clock: Callable[[], float] = time.time,
    client: VaultClient | None = None,
) -> int:
    """Write ``data`` as a new version only if the latest is still ``expected_version``.

    KV v2 check-and-set (``{"options": {"cas": n}, "data": {...}}``): ``expected_version`` 0
    writes only if the key does not exist yet. Two sidecars that rotate the same refresh token
    cannot both win: the loser gets ``VaultCasConflict`` and must re-read.

    Returns:
        The version Vault created.

    Raises:
        VaultCasConflict: the version moved on (Vault's 400 check-and-set mismatch).
        CredentialUnavailable: Vault sealed, failing or unreachable; the write may not have
            happened (re-read before retrying).
        CredentialMisconfigured: the Vault credentials were refused.
    """
    if expected_version < 0:
        raise ValueError("expected_version must be >= 0")
    vault = client or VaultClient(config, http, clock, owner=f"vault path {config.path!r}")
    path = _data_path(config)
    status, headers, payload = await vault.call(
        "POST", path, {"options": {"cas": expected_version}, "data": data}
    )
    message = vault_errors(payload)
    if status == 400 and message and "check-and-set" in message:
        raise VaultCasConflict(
            f"vault {vault.host}: {path} is no longer at version {expected_version};"
            " another writer won, re-read",
            provider_code="vault_cas_mismatch",
            provider_message=message,
        )
    if status not in (200, 204):
        raise vault.fail(status, headers, payload, path)
    outer = payload.get("data")
    version = outer.get("version") if isinstance(outer, dict) else None
    if not isinstance(version, int):
        raise CredentialUnavailable(
            f"vault {vault.host} answered the write to {path} without a version",
            provider_code="vault_bad_answer",
        )
    return version


class VaultSource:
    """``CredentialSource`` over one KV v2 secret.

    Args:
        connection_id: the connection this source serves.
        config: address, path, field and auth settings.
        http: a shared client session; the source does not close it.
        clock: unix time, replaceable in tests.
    """

    def __init__(
        self,
        connection_id: str,
        config: VaultSourceConfig,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connection_id = connection_id
        self._config = config
        self._clock = clock
        self._client = VaultClient(config, http, clock, owner=f"connection {connection_id!r}")
        self._http = http
        self._lock = asyncio.Lock()
        self._lease: Lease | None = None
        self._reread_at: float | None = None  # the read lease ends; read again after it
        self._last_read = -math.inf
        self._version = 0

    def __repr__(self) -> str:
        c = self._config
        return (
            f"VaultSource(connection_id={self.connection_id!r}, address={c.address!r}, "
            f"path='{c.mount}/data/{c.path}', field={c.field!r}, auth={c.auth!r})"
        )

    @property
    def version(self) -> int:
        """The KV version the current lease was read from (0 before the first read)."""
        return self._version

    async def lease(self) -> Lease:
        """See ``CredentialSource.lease``; reads Vault when the cached value is stale."""
        current = self._lease
        if current is not None and not self._stale(current, self._clock()):
            return current
        return await self._reread(current, force=False)

    async def refresh(self, stale: Lease | None, *, claims: str | None = None) -> Lease:
        """See ``CredentialSource.refresh``: re-read Vault (another writer may have replaced
        the token). If the value is unchanged it is returned as is, and the proxy relays the
        provider's rejection. ``claims`` cannot be honoured by a stored token.
        """
        return await self._reread(stale if stale is not None else self._lease, force=True)

    async def write_with_cas(self, data: dict[str, Any], expected_version: int) -> int:
        """``write_with_cas`` through this source's own (already authenticated) Vault token."""
        async with self._lock:
            return await write_with_cas(
                self._http, self._config, data, expected_version, client=self._client
            )

    async def close(self) -> None:
        """No background work to cancel; the client session is the caller's."""

    def _stale(self, lease: Lease, now: float) -> bool:
        if self._reread_at is not None and now >= self._reread_at:
            return True
        # An expired token that Vault still holds is re-read at most every few seconds.
        return lease.expired(now) and now - self._last_read >= _REREAD_FLOOR

    async def _reread(self, observed: Lease | None, *, force: bool) -> Lease:
        async with self._lock:
            current = self._lease
            now = self._clock()
            if superseded(current, observed, now):
                assert current is not None
                return current
            if not force and current is not None and not self._stale(current, now):
                return current  # another caller read while we waited for the lock
            secret = await _read(self._client, self._config, f"connection {self.connection_id!r}")
            self._lease = self._to_lease(secret, self._clock())
            return self._lease

    def _to_lease(self, secret: VaultSecret, now: float) -> Lease:
        where = f"{self._config.mount}/data/{self._config.path}"
        token = secret.data.get(self._config.field)
        if not isinstance(token, str) or not token.strip():
            raise DeadGrant(
                f"vault secret {where} has no field {self._config.field!r}"
                f" for connection {self.connection_id!r}",
                provider_code="vault_secret_missing",
            )
        expires_at = number(secret.data.get("expires_at"))
        self._reread_at = None if secret.lease_duration is None else now + secret.lease_duration
        self._last_read = now
        self._version = secret.version
        return Lease(
            connection_id=self.connection_id,
            generation=1,
            access_token=token.strip(),
            expires_at=expires_at,
        )

