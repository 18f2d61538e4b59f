"""Ed25519 signing keys for capabilities, kept as PEM files under ``data_dir/keys/``.

Layout (directory 0700, files 0600)::

    data_dir/keys/<created_ns>-<kid>.pem   PKCS#8 private key, one per key

The newest file (by the zero-padded creation time that starts its name) signs; every file
verifies, which is what rotation needs: tokens minted a minute before a rotation stay valid for
the rest of their short life. Retiring a key deletes its file. Other files in the directory (the
grant store keeps ``grants.key`` there) are ignored.

The ``kid`` is the RFC 7638 JWK thumbprint of the public key, so it is recomputed from the key
itself and a renamed file cannot make a key claim another's id. All file work runs in a worker
thread (DESIGN §9: nothing blocks the event loop).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from revive.errors import ConfigError
from revive.fsutil import fsync_dir

__all__ = ["Keyring", "jwk_thumbprint"]

_KEY_FILE = re.compile(r"^(\d{20})-[A-Za-z0-9_-]{43}\.pem$")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def jwk_thumbprint(key: Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint of an OKP key: SHA-256 of the canonical ``{crv, kty, x}`` JSON.

    Args:
        key: the public key.

    Returns:
        The digest, base64url without padding (43 characters).
    """
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url(_raw_public(key))},
        separators=(",", ":"),
        sort_keys=True,
    )
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


class Keyring:
    """The sidecar's capability keys: one signs, all verify.

    Build it with :meth:`load_or_create`. The private keys never leave this object except
    through :meth:`signing_key`, which only the capability issuer calls; ``repr`` names the
    directory and the kids, nothing else.
    """

    def __init__(self, keys_dir: Path, keys: dict[str, Ed25519PrivateKey]) -> None:
        """Wrap already loaded keys; ``keys`` is ordered oldest first, the last one signs.

        Raises:
            ValueError: ``keys`` is empty.
        """
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._dir = Path(keys_dir)
        self._keys: dict[str, Ed25519PrivateKey] = dict(keys)
        self._public: dict[str, Ed25519PublicKey] = {
            kid: key.public_key() for kid, key in keys.items()
        }

    def __repr__(self) -> str:
        return f"Keyring(keys_dir={str(self._dir)!r}, kids={list(self._keys)!r})"

    @classmethod
    async def load_or_create(cls, keys_dir: Path) -> Keyring:
        """Load every key in ``keys_dir``; create the directory and a first key when absent.

        Args:
            keys_dir: usually ``data_dir/keys``.

        Raises:
            ConfigError: the directory cannot be created or read, or a key file is not an
                Ed25519 private key (the message names the file, never its content).
        """
        keys = await asyncio.to_thread(_load_or_create, Path(keys_dir))
        return cls(Path(keys_dir), keys)

    @property
    def keys_dir(self) -> Path:
        return self._dir

    @property
    def kids(self) -> tuple[str, ...]:
        """Every kid that verifies, oldest first; the last one signs."""
        return tuple(self._keys)

    @property
    def signer_kid(self) -> str:
        return next(reversed(self._keys))

    def __contains__(self, kid: object) -> bool:
        return kid in self._public

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The current signer as ``(kid, private key)``; for the capability issuer only."""
        kid = self.signer_kid
        return kid, self._keys[kid]

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        """The verifying key named ``kid``, or ``None`` if the ring does not hold it."""
        return self._public.get(kid)

    async def rotate(self) -> str:
        """Create and persist a new key that signs from now on; older keys keep verifying.

        Returns:
            The new key's kid.

        Raises:
            ConfigError: the key file cannot be written.
        """
        kid, key = await asyncio.to_thread(_create_key, self._dir)
        self._keys[kid] = key
        self._public[kid] = key.public_key()
        return kid

    async def retire(self, kid: str) -> None:
        """Stop verifying with ``kid`` and delete its file; unknown kids are ignored.

        Tokens it signed are refused from now on (a verifier's cache checks the kid too).

        Raises:
            ValueError: ``kid`` is the signing key; rotate first.
            ConfigError: the file cannot be deleted.
        """
        if kid not in self._keys:
            return
        if kid == self.signer_kid:
            raise ValueError("cannot retire the signing key; rotate first")
        await asyncio.to_thread(_delete_key, self._dir, kid)
        del self._keys[kid]
        del self._public[kid]

    def jwks(self) -> dict[str, Any]:
        """The public JWK set served at ``GET /v1/jwks`` (no private member, ever)."""
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": _b64url(_raw_public(public)),
                    "kid": kid,
                    "alg": "EdDSA",
                    "use": "sig",
                }
                for kid, public in self._public.items()
            ]
        }


# -- file work (runs in a worker thread) ------------------------------------------------------


def _load_or_create(keys_dir: Path) -> dict[str, Ed25519PrivateKey]:
    try:
        _private_dir(keys_dir)
        keys = _load_all(keys_dir)
        if not keys:
            _create_key(keys_dir)
            # Re-read: another process starting at the same moment may have added its own key.
            keys = _load_all(keys_dir)
    except OSError as exc:
        raise ConfigError(
            str(keys_dir), "data_dir", f"cannot use key directory: {exc.strerror or exc}"
        ) from None
    return keys


def _load_all(keys_dir: Path) -> dict[str, Ed25519PrivateKey]:
    found = sorted(p for p in keys_dir.iterdir() if _KEY_FILE.match(p.name))
    keys: dict[str, Ed25519PrivateKey] = {}
    for path in found:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError):
            # The exception text may quote the file; name the path only.
            raise ConfigError(str(path), "keys", "not a readable PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(str(path), "keys", "not an Ed25519 private key")
        keys[jwk_thumbprint(key.public_key())] = key
    return keys


def _create_key(keys_dir: Path) -> tuple[str, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    kid = jwk_thumbprint(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        _private_dir(keys_dir)
        _write_private(keys_dir / f"{time.time_ns():020d}-{kid}.pem", pem)
    except OSError as exc:
        raise ConfigError(
            str(keys_dir), "keys", f"cannot write key file: {exc.strerror or exc}"
        ) from None
    return kid, key


def _delete_key(keys_dir: Path, kid: str) -> None:
    try:
        for path in keys_dir.glob(f"*-{kid}.pem"):
            path.unlink(missing_ok=True)
        fsync_dir(keys_dir)
    except OSError as exc:
        raise ConfigError(
            str(keys_dir), "keys", f"cannot delete key file: {exc.strerror or exc}"
        ) from None


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o700)


def _write_private(final: Path, data: bytes) -> None:
    """Publish ``data`` at ``final`` as a complete 0600 file or not at all (temp + link)."""
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, final)  # fails rather than overwrite: a key file is never replaced
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)
