"""The admin token: ``Authorization: Bearer <token>`` on the control routes (DESIGN §6).

The token lives in one file (mode 0600), made with ``secrets.token_urlsafe(32)`` the first time
the sidecar starts; operators read it from there. It is compared in constant time and never
appears in a ``repr``, a log line or an error answer.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import stat
from pathlib import Path

from aiohttp import web

from revive.errors import ConfigError, Unauthorized
from revive.fsutil import fsync_dir

__all__ = ["AdminAuth"]

_MIN_TOKEN_CHARS = 16


class AdminAuth:
    """Checks the admin bearer token; one per application, stored under an ``AppKey``."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        """Hold ``token``.

        Raises:
            ValueError: the token is shorter than 16 characters or holds whitespace.
        """
        token = token.strip()
        if len(token) < _MIN_TOKEN_CHARS or any(ch.isspace() for ch in token):
            raise ValueError("the admin token must be at least 16 characters, no whitespace")
        self._token = token.encode()

    def __repr__(self) -> str:
        return "AdminAuth(token=<redacted>)"

    @classmethod
    async def load_or_create(cls, path: Path) -> AdminAuth:
        """Read the token from ``path``, creating the file (0600) with a new token if missing.

        Args:
            path: usually ``data_dir/admin-token``.

        Raises:
            ConfigError: the file cannot be created or read, or holds no usable token (the
                message names the file, never its content).
        """
        token = await asyncio.to_thread(_load_or_create, Path(path))
        try:
            return cls(token)
        except ValueError as exc:
            raise ConfigError(str(path), "admin_token", str(exc)) from None

    def check(self, request: web.Request) -> None:
        """Let the request through only when it carries the admin bearer token.

        Raises:
            Unauthorized: the header is missing, not ``Bearer``, or names another token.
        """
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("send Authorization: Bearer <admin token>")
        # surrogateescape: a header aiohttp could not decode still compares, and fails.
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                   self._token):
            raise Unauthorized("the admin token is wrong")


def _load_or_create(path: Path) -> str:
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        reason = f"cannot read: {exc.strerror or exc}"
        raise ConfigError(str(path), "admin_token", reason) from None
    token = secrets.token_urlsafe(32)
    # Write a temp file, then link it into place: readers never see a half-written token,
    # and a process that lost the race reads the winner's.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read(path)
        fsync_dir(path.parent)
    except OSError as exc:
        reason = f"cannot create: {exc.strerror or exc}"
        raise ConfigError(str(path), "admin_token", reason) from None
    finally:
        tmp.unlink(missing_ok=True)
    return token


def _read(path: Path) -> str:
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)  # someone loosened it: a readable admin token is a leaked one
    return path.read_text(encoding="utf-8", errors="replace").strip()
