"""A source that reads a ready-made access token from a file: tests, the lab, fixed API keys.

There is no grant to refresh, so ``refresh()`` re-reads the file (an operator may have replaced
it) and returns whatever it now holds. An expired token is still handed out: the provider's
answer, not this file's ``expires_at``, decides whether it works.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import yaml

from revive.errors import CredentialMisconfigured
from revive.sources.base import Lease, superseded


class StaticSource:
    """``CredentialSource`` over a JSON/YAML file ``{"access_token": ..., "expires_at": ...}``."""

    def __init__(self, connection_id: str, tokens_file: Path) -> None:
        self.connection_id = connection_id
        self._file = Path(tokens_file)
        self._lease: Lease | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"StaticSource(connection_id={self.connection_id!r}, tokens_file='{self._file}')"

    async def lease(self) -> Lease:
        """See ``CredentialSource.lease``; re-reads the file once the cached token has expired."""
        current = self._lease
        if current is not None and not current.expired():
            return current
        return await self.refresh(current)

    async def refresh(self, stale: Lease | None, *, claims: str | None = None) -> Lease:
        """See ``CredentialSource.refresh``; ``claims`` cannot be honoured and only forces a read.

        Raises:
            CredentialMisconfigured: the file is missing, unreadable or malformed.
        """
        observed = stale if stale is not None else self._lease
        async with self._lock:
            current = self._lease
            if claims is None and superseded(current, observed):
                assert current is not None
                return current
            self._lease = await asyncio.to_thread(self._read)
            return self._lease

    async def close(self) -> None:
        """Nothing to release."""

    def _read(self) -> Lease:
        # Runs in a worker thread. Errors name the file but never quote it: it holds a token,
        # and YAML parser messages echo the offending line.
        where = f"static tokens file {str(self._file)!r} for connection {self.connection_id!r}"
        try:
            text = self._file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            raise CredentialMisconfigured(f"{where}: {reason}") from None
        data = _parse(text)
        if not isinstance(data, dict):
            raise CredentialMisconfigured(f"{where}: not a JSON or YAML mapping")
        token = data.get("access_token")
        if not isinstance(token, str) or not token.strip():
            raise CredentialMisconfigured(f"{where}: access_token missing or not a string")
        expires_at = data.get("expires_at")
        if expires_at is not None and (
            isinstance(expires_at, bool)
            or not isinstance(expires_at, int | float)
            or not math.isfinite(expires_at)
        ):
            raise CredentialMisconfigured(f"{where}: expires_at must be a unix time")
        return Lease(
            connection_id=self.connection_id,
            generation=1,
            access_token=token.strip(),
            expires_at=None if expires_at is None else float(expires_at),
        )


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None
