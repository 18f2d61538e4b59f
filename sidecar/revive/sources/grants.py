"""Refresh tokens at rest: one Fernet-encrypted file per connection under ``data_dir``.

Layout (directories 0700, files 0600)::

    data_dir/keys/grants.key             Fernet key, created on first save
    data_dir/grants/<connection_id>.grant

A save is atomic (temp file in the same directory, fsync, ``os.replace``, fsync the directory),
so a reader, another process or a crash sees either the old grant or the new one, never half of
either: losing a rotated refresh token kills the grant. All file work runs in a worker thread.

Where a grant lives is the :class:`GrantBackend` seam: :class:`GrantStore` (these files) or
``revive.sources.vault_grants.VaultGrantStore`` (Vault KV v2, shared by several sidecars).
Both version every write and refuse one whose expected version is stale
(:class:`GrantConflict`), so a rotation can never overwrite a newer one. The file store
checks the version under an exclusive ``flock`` on ``data_dir/locks/<connection_id>.lock``,
which also covers several processes sharing one ``data_dir``.

CAS alone cannot stop two processes from *redeeming* one refresh token: the loser learns it
lost only when the provider, which revokes a rotated token at once, refuses it. So the file
store also offers :meth:`GrantStore.refreshing`, a second per-connection ``flock``
(``data_dir/locks/<connection_id>.refresh``) that the refresher holds from reading the grant
to saving its successor; a separate file because the write lock is taken inside that span.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from revive.errors import CredentialMisconfigured, CredentialUnavailable
from revive.fsutil import fsync_dir
from revive.sources._flock import exclusive_flock

__all__ = [
    "Grant",
    "GrantBackend",
    "GrantConflict",
    "GrantStore",
    "StoredGrant",
    "read_secret_file",
]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FORMAT = 1


class Grant(BaseModel):
    """The long-lived part of a connection: its refresh token and where it came from.

    Attributes:
        refresh_token: the secret; ``repr``/``str`` show ``**********``.
        scope: the scopes granted (space-separated) if the provider said.
        generation: bumped by each reconnect (DESIGN §4), kept by refreshes and rotations.
        obtained_at: unix time the grant was installed.
        rotated_at: unix time the provider last rotated the refresh token.
        last_refreshed_at: unix time the refresh token was last redeemed; persisted so that
            the idle clock (Entra drops refresh tokens unused for 90 days) survives restarts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    refresh_token: SecretStr
    scope: str | None = None
    generation: int = Field(default=1, ge=1)
    obtained_at: float
    rotated_at: float | None = None
    last_refreshed_at: float | None = None

    @property
    def last_used(self) -> float:
        """When the provider last saw this refresh token: install, rotation or redemption."""
        return max(self.obtained_at, self.rotated_at or 0.0, self.last_refreshed_at or 0.0)

    def record(self) -> dict[str, object]:
        """The plain fields as stored (the refresh token in clear: callers seal or vault it)."""
        return {
            "refresh_token": self.refresh_token.get_secret_value(),
            "scope": self.scope,
            "generation": self.generation,
            "obtained_at": self.obtained_at,
            "rotated_at": self.rotated_at,
            "last_refreshed_at": self.last_refreshed_at,
        }


@dataclass(frozen=True, slots=True)
class StoredGrant:
    """What a backend holds for one connection, and at which version.

    Attributes:
        grant: the grant, or ``None`` when nothing is stored (never saved, or deleted).
        version: the backend's version of the record; ``0`` when it was never written. A
            write that expects this version succeeds only if nobody wrote in between.
    """

    grant: Grant | None
    version: int


class GrantConflict(CredentialUnavailable):
    """A versioned write lost: someone wrote the grant after the version the writer expected.

    Transient by class (nothing is broken), but the writer must read again before deciding:
    the other writer's grant (e.g. its rotated refresh token) is now the current one.
    """


class GrantBackend(Protocol):
    """Where the built-in oauth2 refresher keeps its grants (``grant_store`` in its config).

    Every write names the version it expects to replace, so that two writers (two sidecars,
    a refresh and a reconnect) cannot silently overwrite each other's refresh token.
    """

    @property
    def shared(self) -> bool:
        """Whether other processes routinely write this grant (read it before each refresh)."""
        ...

    @property
    def settle_seconds(self) -> float:
        """How long to keep re-reading after the provider rejects the stored token: another
        writer may have redeemed it and not yet saved the successor."""
        ...

    def refreshing(
        self, connection_id: str, wait: float
    ) -> AbstractAsyncContextManager[None]:
        """Hold the right to redeem ``connection_id``'s refresh token, wherever the backend
        can lock across processes.

        The refresher holds it from reading the grant, through the token call, to storing
        the rotated successor, and reads the grant again once inside: whoever held it before
        may have rotated the token meanwhile. It never guards writes (``write`` is
        check-and-set on its own), so a reconnect that only stores a grant needs no lock.

        Args:
            connection_id: whose grant.
            wait: seconds to wait for another holder before giving up.

        Raises (on entry):
            CredentialUnavailable: another holder kept it for over ``wait`` seconds
                (``grant_lock_timeout``): transient, the grant is untouched.
            CredentialMisconfigured: the lock cannot be taken at all.
        """
        ...

    async def read(self, connection_id: str) -> StoredGrant:
        """The current grant and its version.

        Raises:
            CredentialUnavailable: the backend is failing transiently.
            CredentialMisconfigured: the record is unreadable or the backend refused us.
        """
        ...

    async def write(self, connection_id: str, grant: Grant, expected_version: int | None) -> int:
        """Store ``grant`` if the current version is still ``expected_version``; durable on
        return.

        Args:
            connection_id: whose grant.
            grant: the new record.
            expected_version: the version read before deciding to write (``0``: only if none
                exists); ``None`` writes whatever is there (replacing an unreadable record).

        Returns:
            The version written.

        Raises:
            GrantConflict: the version moved on; read again.
            CredentialUnavailable: transient failure; the write may or may not have happened.
            CredentialMisconfigured: the backend cannot be written at all.
        """
        ...


class GrantStore:
    """Encrypted, atomically replaced grant files; safe to share between sources and processes.

    A :class:`GrantBackend`; ``load``/``save`` are the unversioned shortcuts.
    """

    # Sidecars on one host may share data_dir, and a file read costs far less than the token
    # call it precedes, so the refresher reads the file before every redemption.
    shared = True
    # A peer saves its rotation before it releases the refresh lock, so once the lock is ours
    # there is nothing left to wait for.
    settle_seconds = 0.0

    def __init__(self, data_dir: Path) -> None:
        self._dir = Path(data_dir)
        self._fernet: Fernet | None = None

    def __repr__(self) -> str:
        return f"GrantStore(data_dir={str(self._dir)!r})"

    @property
    def key_path(self) -> Path:
        return self._dir / "keys" / "grants.key"

    def path(self, connection_id: str) -> Path:
        """Where ``connection_id``'s grant lives; refuses ids that could escape the directory."""
        if not _ID.match(connection_id):
            raise CredentialMisconfigured(
                f"connection id {connection_id!r} is not a safe file name"
            )
        return self._dir / "grants" / f"{connection_id}.grant"

    def lock_path(self, connection_id: str) -> Path:
        """The file whose ``flock`` serialises versioned writes of ``connection_id``."""
        return self._dir / "locks" / f"{self.path(connection_id).stem}.lock"

    def refresh_lock_path(self, connection_id: str) -> Path:
        """The file whose ``flock`` :meth:`refreshing` holds."""
        return self._dir / "locks" / f"{self.path(connection_id).stem}.refresh"

    def refreshing(
        self, connection_id: str, wait: float
    ) -> AbstractAsyncContextManager[None]:
        """See ``GrantBackend.refreshing``: an exclusive ``flock`` shared by every process
        (and every store instance) using this ``data_dir``; a dead holder's lock is freed by
        the kernel."""
        return self._refreshing(self.refresh_lock_path(connection_id), connection_id, wait)

    @asynccontextmanager
    async def _refreshing(self, lock: Path, connection_id: str, wait: float) -> AsyncIterator[None]:
        try:
            await asyncio.to_thread(_private_dir, lock.parent)
        except OSError as exc:
            raise CredentialMisconfigured(
                f"cannot create lock directory {lock.parent}:"
                f" {exc.strerror or type(exc).__name__}"
            ) from None
        async with exclusive_flock(lock, wait, repr(connection_id)):
            yield

    async def load(self, connection_id: str) -> Grant | None:
        """Read and decrypt the grant, or ``None`` if none was ever saved.

        Raises:
            CredentialMisconfigured: the file is unreadable, does not decrypt under the key, or
                belongs to another connection (the message names files, never their content).
        """
        return (await self.read(connection_id)).grant

    async def save(self, connection_id: str, grant: Grant) -> None:
        """Encrypt and atomically replace the grant, whatever is there; durable on return.

        Raises:
            CredentialMisconfigured: the directory or key cannot be written.
        """
        await self.write(connection_id, grant, None)

    async def read(self, connection_id: str) -> StoredGrant:
        """See ``GrantBackend.read``; a file from before versions counts as version 1."""
        return await asyncio.to_thread(self._load, connection_id)

    async def write(self, connection_id: str, grant: Grant, expected_version: int | None) -> int:
        """See ``GrantBackend.write``.

        Raises:
            GrantConflict: the file's version is not ``expected_version``.
            CredentialMisconfigured: the directory, lock or key cannot be written, or the
                current file is unreadable while a version is expected.
        """
        return await asyncio.to_thread(
            self._write_versioned, connection_id, grant, expected_version
        )

    def _write_versioned(self, connection_id: str, grant: Grant, expected: int | None) -> int:
        lock = self.lock_path(connection_id)
        try:
            _private_dir(lock.parent)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CredentialMisconfigured(
                f"cannot open grant lock {lock}: {exc.strerror or type(exc).__name__}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, also if this process dies
            try:
                current = self._load(connection_id).version
            except CredentialMisconfigured:
                if expected is not None:
                    raise
                current = 0  # an unreadable file is what an unconditional write replaces
            if expected is not None and current != expected:
                raise GrantConflict(
                    f"grant file of {connection_id!r} is at version {current}, not {expected}:"
                    " another writer won, re-read",
                    provider_code="grant_version_conflict",
                )
            self._save(connection_id, grant, current + 1)
            return current + 1
        finally:
            os.close(fd)

    def _load(self, connection_id: str) -> StoredGrant:
        path = self.path(connection_id)
        try:
            sealed = path.read_bytes()
        except FileNotFoundError:
            return StoredGrant(None, 0)
        except OSError as exc:
            raise CredentialMisconfigured(
                f"cannot read grant file {path}: {exc.strerror}"
            ) from None
        try:
            plain = self._cipher(create=False).decrypt(sealed)
        except InvalidToken:
            raise CredentialMisconfigured(
                f"grant file {path} does not decrypt with key {self.key_path}"
            ) from None
        try:
            payload = json.loads(plain)
            if payload.get("connection_id") != connection_id:
                raise ValueError("connection mismatch")
            version = payload.get("version", 1)
            if not isinstance(version, int) or version < 1:
                raise ValueError("bad version")
            return StoredGrant(Grant.model_validate(payload["grant"]), version)
        except (ValueError, KeyError, TypeError, AttributeError, ValidationError):
            # ValidationError text quotes its input, i.e. the refresh token: never chain it.
            raise CredentialMisconfigured(
                f"grant file {path} is malformed or belongs to another connection"
            ) from None

    def _save(self, connection_id: str, grant: Grant, version: int) -> None:
        final = self.path(connection_id)
        payload = {
            "format": _FORMAT,
            "connection_id": connection_id,
            "version": version,
            "grant": grant.record(),
        }
        try:
            sealed = self._cipher(create=True).encrypt(json.dumps(payload).encode())
            _private_dir(final.parent)
            _write_atomic(final, sealed)
        except OSError as exc:
            raise CredentialMisconfigured(
                f"cannot write grant file {final}: {exc.strerror or type(exc).__name__}"
            ) from None

    def _cipher(self, *, create: bool) -> Fernet:
        if self._fernet is None:
            path = self.key_path
            try:
                key = path.read_bytes().strip()
            except FileNotFoundError:
                if not create:
                    raise CredentialMisconfigured(
                        f"grant key {path} is missing; existing grant files cannot be read"
                    ) from None
                _private_dir(path.parent)
                _write_atomic(path, Fernet.generate_key(), exclusive=True)
                key = path.read_bytes().strip()
            except OSError as exc:
                raise CredentialMisconfigured(
                    f"cannot read grant key {path}: {exc.strerror}"
                ) from None
            try:
                self._fernet = Fernet(key)
            except ValueError:
                raise CredentialMisconfigured(f"grant key {path} is not a Fernet key") from None
        return self._fernet


def _private_dir(path: Path) -> None:
    """Create ``path`` (and a missing data_dir) as 0700; tighten it if it is wider."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o700)


def _write_atomic(final: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``final`` via a 0600 temp file; ``exclusive`` keeps an existing file.

    ``exclusive`` publishes with ``os.link``, which fails if ``final`` exists, so two processes
    creating the key at once agree on the first one instead of each encrypting with its own.
    """
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, final)
            except FileExistsError:
                pass
        else:
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)


async def read_secret_file(path: Path, what: str) -> str:
    """Read a one-line secret (client secret, seed refresh token) off the loop, stripped.

    Raises:
        CredentialMisconfigured: missing, unreadable or empty; names ``what`` and the path only.
    """

    def read() -> str:
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            raise CredentialMisconfigured(f"{what} ({str(path)!r}): {reason}") from None

    value = await asyncio.to_thread(read)
    if not value:
        raise CredentialMisconfigured(f"{what} ({str(path)!r}) is empty")
    return value
