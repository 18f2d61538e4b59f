"""Refresh tokens at rest: one Fernet-encrypted file per connection under ``data_dir``.

Layout (directories 0700, files 0600)::

    data_dir/keys/grants.key             Fernet key, created on first save
    data_dir/grants/<connection_id>.grant

A save is atomic (temp file in the same directory, fsync, ``os.replace``, fsync the directory),
so a reader, another process or a crash sees either the old grant or the new one, never half of
either: losing a rotated refresh token kills the grant. All file work runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from revive.errors import CredentialMisconfigured
from revive.fsutil import fsync_dir

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
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    refresh_token: SecretStr
    scope: str | None = None
    generation: int = Field(default=1, ge=1)
    obtained_at: float
    rotated_at: float | None = None


class GrantStore:
    """Encrypted, atomically replaced grant files; safe to share between sources and processes."""

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

    async def load(self, connection_id: str) -> Grant | None:
        """Read and decrypt the grant, or ``None`` if none was ever saved.

        Raises:
            CredentialMisconfigured: the file is unreadable, does not decrypt under the key, or
                belongs to another connection (the message names files, never their content).
        """
        return await asyncio.to_thread(self._load, connection_id)

    async def save(self, connection_id: str, grant: Grant) -> None:
        """Encrypt and atomically replace the grant; durable when this returns.

        Raises:
            CredentialMisconfigured: the directory or key cannot be written.
        """
        await asyncio.to_thread(self._save, connection_id, grant)

    def _load(self, connection_id: str) -> Grant | None:
        path = self.path(connection_id)
        try:
            sealed = path.read_bytes()
        except FileNotFoundError:
            return None
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
            return Grant.model_validate(payload["grant"])
        except (ValueError, KeyError, TypeError, AttributeError, ValidationError):
            # ValidationError text quotes its input, i.e. the refresh token: never chain it.
            raise CredentialMisconfigured(
                f"grant file {path} is malformed or belongs to another connection"
            ) from None

    def _save(self, connection_id: str, grant: Grant) -> None:
        final = self.path(connection_id)
        payload = {
            "format": _FORMAT,
            "connection_id": connection_id,
            "grant": {
                "refresh_token": grant.refresh_token.get_secret_value(),
                "scope": grant.scope,
                "generation": grant.generation,
                "obtained_at": grant.obtained_at,
                "rotated_at": grant.rotated_at,
            },
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
