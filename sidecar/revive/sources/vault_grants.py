"""The oauth2 refresher's grant kept in HashiCorp Vault KV v2, shared by several sidecars.

A file under ``data_dir`` serves one host. When several sidecars (replicas, pods) refresh the
same grant and the provider rotates refresh tokens, they must agree on the current token, or
one of them presents a consumed token and the grant looks dead. Vault is the shared record:
every write is KV v2 check-and-set (``options.cas``) against the version that was read, so a
writer that lost the race gets :class:`~revive.sources.grants.GrantConflict` instead of
overwriting the winner's rotation, and reads the winner's grant.

Sidecars on different hosts share no lock, so unlike the file store nothing stops two of them
from redeeming one refresh token at once (``refreshing`` holds nothing). The loser is covered
after the fact: when the provider refuses its token, ``GrantSync.newer`` re-reads Vault for up
to ``settle_seconds`` until the winner's rotation shows up, and ``OAuth2Source`` redeems
that, chasing a few rotations in a row before it gives up transiently; it calls a grant dead
only when Vault still holds the very token the provider refused once the window has passed.

The record at ``{mount}/data/{path}`` is the grant's plain fields plus ``connection_id`` and
``format``; the refresh token is in clear inside Vault (Vault encrypts at rest and guards it
with its own policies), and never in any text this module produces.

API shapes: https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2 (read answers
404 with ``data.metadata`` for a deleted latest version; ``cas`` must equal the latest
version, deleted or not).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from revive.config import VaultGrantStoreConfig
from revive.errors import CredentialMisconfigured
from revive.sources._vault_client import VaultClient
from revive.sources.grants import Grant, GrantConflict, StoredGrant
from revive.sources.vault import VaultCasConflict, write_with_cas

__all__ = ["VaultGrantStore"]

_FORMAT = 1


class VaultGrantStore:
    """``GrantBackend`` over one KV v2 secret per connection (``grant_store: {kind: vault}``).

    Args:
        config: address, path and auth settings (the ``vault`` source's own).
        http: a shared client session; the store does not close it.
        clock: unix time, replaceable in tests (Vault token renewal).
        owner: who this store serves, for Vault's log lines (a connection id).
    """

    shared = True

    def __init__(
        self,
        config: VaultGrantStoreConfig,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        *,
        owner: str = "grants",
    ) -> None:
        self._config = config
        self._http = http
        self._client = VaultClient(config, http, clock, owner=f"grant store of {owner!r}")
        self._lock = asyncio.Lock()  # the client renews and re-logs in; one call at a time
        self._path = f"{quote(config.mount)}/data/{quote(config.path)}"

    def __repr__(self) -> str:
        c = self._config
        return f"VaultGrantStore(address={c.address!r}, path={self._path!r}, auth={c.auth!r})"

    @property
    def settle_seconds(self) -> float:
        """See ``GrantBackend.settle_seconds`` (``grant_store.settle_seconds``)."""
        return self._config.settle_seconds

    def refreshing(
        self, connection_id: str, wait: float
    ) -> AbstractAsyncContextManager[None]:
        """See ``GrantBackend.refreshing``: nothing to hold, since replicas on other hosts
        could not see it; check-and-set and the settle window cover the race (module doc)."""
        return nullcontext()

    async def read(self, connection_id: str) -> StoredGrant:
        """See ``GrantBackend.read``.

        Raises:
            CredentialUnavailable: Vault sealed, failing or unreachable.
            CredentialMisconfigured: Vault refused the credentials, or the secret is not a
                grant of ``connection_id`` (two connections must not share one path).
        """
        async with self._lock:
            status, headers, payload = await self._client.call("GET", self._path)
        outer = payload.get("data")
        metadata = outer.get("metadata") if isinstance(outer, dict) else None
        raw_version = metadata.get("version") if isinstance(metadata, dict) else None
        version = raw_version if isinstance(raw_version, int) else 0
        if status == 404:
            return StoredGrant(None, version)  # never written, or latest version deleted
        if status != 200:
            raise self._client.fail(status, headers, payload, self._path)
        inner = outer.get("data") if isinstance(outer, dict) else None
        if inner is None:
            return StoredGrant(None, version)
        return StoredGrant(self._parse(inner, connection_id), version)

    async def write(self, connection_id: str, grant: Grant, expected_version: int | None) -> int:
        """See ``GrantBackend.write``: a KV v2 write with ``cas = expected_version``.

        ``None`` (only after an unreadable record) reads the current version and writes on
        top of it, still check-and-set.

        Raises:
            GrantConflict: Vault's "check-and-set parameter did not match" answer.
            CredentialUnavailable: Vault sealed, failing or unreachable; the write may have
                happened (its answer lost), so the caller reads before deciding again.
            CredentialMisconfigured: Vault refused the credentials.
        """
        if expected_version is None:
            expected_version = (await self.read(connection_id)).version
        data = {"format": _FORMAT, "connection_id": connection_id, **grant.record()}
        self._client.remember_secret(grant.refresh_token.get_secret_value())
        try:
            async with self._lock:
                return await write_with_cas(
                    self._http, self._config, data, expected_version, client=self._client
                )
        except VaultCasConflict as exc:
            raise GrantConflict(
                str(exc), provider_code=exc.provider_code, provider_message=exc.provider_message
            ) from None

    def _parse(self, inner: Mapping[str, Any], connection_id: str) -> Grant:
        where = f"vault {self._client.host} secret {self._path}"
        token = inner.get("refresh_token")
        if isinstance(token, str):
            self._client.remember_secret(token)
        if inner.get("connection_id") != connection_id:
            raise CredentialMisconfigured(
                f"{where} holds no grant of connection {connection_id!r}"
                " (each connection needs its own path)"
            )
        fields = {k: inner.get(k) for k in Grant.model_fields if inner.get(k) is not None}
        try:
            return Grant.model_validate(fields)
        except ValidationError:
            # ValidationError text quotes its input, i.e. the refresh token: never chain it.
            raise CredentialMisconfigured(f"{where} is not a valid grant record") from None
