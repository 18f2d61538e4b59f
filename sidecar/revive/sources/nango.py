"""The ``nango`` source: Nango holds the grant and refreshes it; the sidecar leases from it.

Each lease is one ``GET {base_url}/connection/{connection_id}?provider_config_key=...`` with
``Authorization: Bearer <secret key>``; ``refresh()`` adds ``force_refresh=true``. Nango answers
the connection with ``credentials.access_token`` and ``credentials.expires_at`` (ISO 8601), or,
when its own refresh failed, ``{"error": {"code": "invalid_credentials", "message", "payload"}}``
with HTTP 424 once its refresh attempts are exhausted (it gives up after several days of
failures) and the failed refresh's 4xx otherwise. How answers map onto Revive's classes:

==========================================================  =================================
Nango's answer                                              raised
==========================================================  =================================
424 ``invalid_credentials`` (refresh attempts exhausted)    ``DeadGrant``
4xx ``invalid_credentials`` naming ``invalid_grant`` & co.  ``DeadGrant``
4xx ``invalid_credentials`` naming ``invalid_client``       ``CredentialMisconfigured``
4xx ``invalid_credentials``, cause unknown, or "backing      ``CredentialUnavailable``
off" after a recent failure
404 ``not_found`` (connection deleted in Nango)             ``DeadGrant`` (``not_found``)
401 / 403 (secret key rejected / lacks scope), 400 other    ``CredentialMisconfigured``
429, 5xx, timeout, connection error, unreadable 200         ``CredentialUnavailable``
==========================================================  =================================

Sources (read 2026-11): https://nango.dev/docs/reference/backend/http-api/connection/get
(``NangoHQ/nango:packages/server/lib/controllers/connection/connectionId/getConnection.ts`` and
``.../services/connectionRetrieval.service.ts`` for the error body), NangoHQ/nango#4122 (424 when
refresh attempts are exhausted), NangoHQ/nango#5505 (``connection_refresh_backoff``: 30 s after a
failure, skipped by ``force_refresh``), https://nango.dev/docs/guides/platform/common-issues
(``refresh_token_external_error`` carrying the upstream's ``invalid_grant``) and
https://nango.dev/docs/guides/auth/token-refreshing.

Generations: Nango keeps the connection id across a re-authorization, so a new grant is learnt
from the ``auth`` webhook (``grant_replaced()``), from Nango's connection record being replaced
(its numeric ``id`` changes), or from a different token appearing after a dead verdict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import aiohttp
from yarl import URL

from revive.config import NangoSourceConfig
from revive.errors import CredentialError, CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.redact import redact
from revive.sources._nango_webhooks import (
    LEGACY_SIGNATURE_HEADER,
    SIGNATURE_HEADER,
    AuthOperation,
    NangoAuthEvent,
    parse_auth_webhook,
    sign_nango_webhook,
    verify_nango_webhook,
)
from revive.sources.base import Lease, superseded
from revive.sources.grants import read_secret_file

__all__ = [
    "LEGACY_SIGNATURE_HEADER",
    "SIGNATURE_HEADER",
    "AuthOperation",
    "NangoAuthEvent",
    "NangoSource",
    "NangoSourceConfig",
    "parse_auth_webhook",
    "sign_nango_webhook",
    "verify_nango_webhook",
]

log = logging.getLogger(__name__)

_MAX_BODY = 256 * 1024
_DEAD_RECHECK = 30.0  # seconds a dead verdict is served from memory before Nango is asked again
_BACKOFF_RETRY = 30.0  # Nango's REFRESH_FAILURE_COOLDOWN_MS
# Upstream OAuth errors after which only a new authorization helps (RFC 6749 §5.2, OIDC).
_DEAD_CODES = (
    "invalid_grant",
    "consent_required",
    "interaction_required",
    "login_required",
    "access_denied",
    "invalid_scope",
)
# Upstream errors that blame the OAuth client Nango is configured with: an operator fault.
_CLIENT_CODES = ("invalid_client", "unauthorized_client")
_CODE_RE = re.compile(r"\b(" + "|".join(_DEAD_CODES + _CLIENT_CODES) + r")\b")
_AADSTS_RE = re.compile(r"\bAADSTS\d{5,6}\b")


class NangoSource:
    """``CredentialSource`` that leases a connection's access token from Nango.

    Args:
        connection_id: Revive's connection id (what the proxy and the store call it).
        config: where Nango is and which of its connections this is.
        http: a shared client session; the source does not close it.
        clock: unix time, replaceable in tests.
        generation: the store's generation for this connection at start-up.
    """

    def __init__(
        self,
        connection_id: str,
        config: NangoSourceConfig,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        *,
        generation: int = 1,
    ) -> None:
        self.connection_id = connection_id
        self._config = config
        self._http = http
        self._clock = clock
        self._generation = generation
        self._url = URL(config.base_url.rstrip("/")) / "connection" / config.connection_id
        self._host = self._url.host or config.base_url
        self._secret: str | None = None
        self._webhook_key: bytes | None = None
        self._lease: Lease | None = None
        self._record_id: object = None  # Nango's numeric id of the connection record
        self._dead: DeadGrant | None = None
        self._dead_token: str | None = None  # the token in hand when the grant was declared dead
        self._dead_recheck_at = 0.0
        self._inflight: asyncio.Task[Lease] | None = None
        self._inflight_force = False
        self._tasks: set[asyncio.Task[Lease]] = set()

    def __repr__(self) -> str:
        return (
            f"NangoSource(connection_id={self.connection_id!r}, base_url={self._config.base_url!r}, "
            f"nango_connection_id={self._config.connection_id!r}, "
            f"provider_config_key={self._config.provider_config_key!r})"
        )

    @property
    def config(self) -> NangoSourceConfig:
        """The settings this source was built from (paths only, no secret)."""
        return self._config

    @property
    def generation(self) -> int:
        """The grant generation leases are currently stamped with."""
        return self._generation

    # -- CredentialSource ------------------------------------------------------------------

    async def lease(self) -> Lease:
        """See ``CredentialSource.lease``; a token within ``refresh_skew_seconds`` is re-fetched."""
        current = self._lease
        if current is not None and not current.expired(
            self._clock(), self._config.refresh_skew_seconds
        ):
            return current
        return await self._join(current, force=False)

    async def refresh(self, stale: Lease | None, *, claims: str | None = None) -> Lease:
        """See ``CredentialSource.refresh``: asks Nango with ``force_refresh=true``.

        ``claims`` cannot be passed through Nango; it only makes the refresh unconditional.
        """
        observed = stale if stale is not None else self._lease
        if claims is not None:
            observed = self._lease  # bypass the "someone already refreshed" shortcut
            self._lease = None
        return await self._join(observed, force=True)

    async def close(self) -> None:
        """Cancel a fetch still running (the client session is the caller's)."""
        for task in (tasks := list(self._tasks)):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- reconnects and webhooks -----------------------------------------------------------

    def grant_replaced(self, generation: int | None = None) -> None:
        """A reconnect happened in Nango: forget the cached lease and any dead verdict.

        Args:
            generation: the store's new generation, if known; otherwise the current one + 1.
        """
        self._generation = generation if generation is not None else self._generation + 1
        self._lease = None
        self._dead = self._dead_token = None
        self._dead_recheck_at = 0.0

    def matches(self, event: NangoAuthEvent) -> bool:
        """Whether an auth webhook is about this source's Nango connection."""
        return (
            event.connection_id == self._config.connection_id
            and event.provider_config_key == self._config.provider_config_key
        )

    async def webhook_signing_key(self) -> bytes:
        """The key Nango signs webhooks with: ``webhook_secret_file``, else the secret key.

        Raises:
            CredentialMisconfigured: the file is missing, unreadable or empty.
        """
        if self._webhook_key is None:
            path = self._config.webhook_secret_file
            if path is None:
                self._webhook_key = (await self._secret_key()).encode()
            else:
                what = f"webhook_secret_file of {self.connection_id!r}"
                self._webhook_key = (await read_secret_file(path, what)).encode()
        return self._webhook_key

    # -- single flight ---------------------------------------------------------------------

    async def _join(self, observed: Lease | None, *, force: bool) -> Lease:
        while True:
            current = self._lease
            if superseded(current, observed, self._clock()):
                assert current is not None
                return current
            task = self._inflight
            if task is None or task.done():
                task = self._spawn(self._fetch(force))
                self._inflight, self._inflight_force = task, force
                return await asyncio.shield(task)
            if force and not self._inflight_force:
                # A plain fetch may hand back the very token the provider just rejected:
                # let it finish, then force one unless it brought a new token.
                await asyncio.wait({task})
                continue
            return await asyncio.shield(task)

    def _spawn(self, coro: Coroutine[Any, Any, Lease]) -> asyncio.Task[Lease]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Lease]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the awaiters report it

    # -- one call to Nango -----------------------------------------------------------------

    async def _fetch(self, force: bool) -> Lease:
        now = self._clock()
        if self._dead is not None:
            if now < self._dead_recheck_at:
                raise _copy(self._dead)
            # Forcing a refresh of a grant Nango declared dead only hammers the provider;
            # a plain read is enough to notice a reconnect.
            force = False
        try:
            lease = await self._call(force)
        except DeadGrant as dead:
            if self._dead is None:  # keep the token seen at the first verdict
                self._dead_token = self._lease.access_token if self._lease is not None else None
            self._dead = dead
            self._dead_recheck_at = self._clock() + _DEAD_RECHECK
            self._lease = None
            raise
        except CredentialError:
            if self._dead is not None:
                self._dead_recheck_at = self._clock() + _DEAD_RECHECK
            raise
        if self._dead is not None:
            if lease.access_token == self._dead_token:
                # Nango still hands out the token from before its refresh failed.
                self._dead_recheck_at = self._clock() + _DEAD_RECHECK
                raise _copy(self._dead)
            log.info("nango connection of %s works again; new grant generation", self.connection_id)
            self._generation += 1
            lease = Lease(
                self.connection_id, self._generation, lease.access_token, lease.expires_at
            )
            self._dead = self._dead_token = None
        self._lease = lease
        return lease

    async def _call(self, force: bool) -> Lease:
        secret = await self._secret_key()
        params = {
            "provider_config_key": self._config.provider_config_key,
            "force_refresh": "true" if force else "false",
        }
        headers = {"Authorization": f"Bearer {secret}", "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_seconds)
        try:
            async with self._http.get(
                self._url, params=params, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                body = await resp.content.read(_MAX_BODY)
        except TimeoutError:
            raise CredentialUnavailable(
                f"nango {self._host} did not answer within {self._config.timeout_seconds:g}s",
                provider_code="timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise CredentialUnavailable(
                f"nango {self._host} unreachable ({type(exc).__name__})",
                provider_code="connection_error",
            ) from None
        if status == 200:
            return self._accept(body)
        raise self._failure(status, body, retry_after)

    def _accept(self, body: bytes) -> Lease:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
        credentials = data.get("credentials") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(credentials, dict):
            raise CredentialUnavailable(f"nango {self._host} answered 200 without credentials")
        token = credentials.get("access_token")
        if not isinstance(token, str) or not token:
            mode = credentials.get("type")
            raise CredentialMisconfigured(
                f"nango connection {self._config.connection_id!r} has no access token "
                f"(auth mode {mode if isinstance(mode, str) else 'unknown'!s})",
                provider_code="no_access_token",
            )
        record_id = data.get("id")
        if self._record_id is not None and record_id is not None and record_id != self._record_id:
            # Deleted and created again in Nango: a new grant under the same connection id.
            self._generation += 1
        if record_id is not None:
            self._record_id = record_id
        return Lease(
            self.connection_id,
            self._generation,
            token,
            _expiry(credentials.get("expires_at"), credentials.get("expires_in"), self._clock()),
        )

    def _failure(self, status: int, body: bytes, retry_after: float | None) -> CredentialError:
        code, message, text = self._error_fields(body)
        what = f"nango {self._host} answered {status} ({code or 'no code'})"
        if status in (401, 403):
            return CredentialMisconfigured(
                f"{what}: the secret key was rejected or lacks the connection scopes",
                provider_code=code,
                provider_message=message,
            )
        if status == 429 or status >= 500:
            return CredentialUnavailable(
                f"{what}: Nango is failing transiently",
                provider_code=code,
                provider_message=message,
                retry_after=retry_after,
            )
        if status == 404 and code in (None, "not_found", "unknown_connection"):
            return DeadGrant(
                f"{what}: connection {self._config.connection_id!r} does not exist in Nango "
                "(deleted, or never connected); connect it first",
                provider_code=code or "not_found",
                provider_message=message,
            )
        if code != "invalid_credentials":
            return CredentialMisconfigured(
                f"{what}: Nango rejected the request for {self._config.connection_id!r}",
                provider_code=code,
                provider_message=message,
            )
        upstream = _upstream_code(text)
        if "backing off" in text.lower() or "connection_refresh_backoff" in text:
            return CredentialUnavailable(
                f"{what}: a refresh failed moments ago and Nango is backing off",
                provider_code=upstream or "connection_refresh_backoff",
                provider_message=message,
                retry_after=retry_after or _BACKOFF_RETRY,
            )
        if status == 424:
            return DeadGrant(
                f"{what}: Nango exhausted its refresh attempts; the grant of "
                f"{self.connection_id!r} is dead",
                provider_code=upstream or "connection_refresh_exhausted",
                provider_message=message,
            )
        if upstream in _CLIENT_CODES:
            return CredentialMisconfigured(
                f"{what}: the provider rejected the OAuth client configured in Nango",
                provider_code=upstream,
                provider_message=message,
            )
        if upstream is not None:
            return DeadGrant(
                f"{what}: the provider refused to refresh; the grant of {self.connection_id!r} "
                "is dead",
                provider_code=upstream,
                provider_message=message,
            )
        return CredentialUnavailable(
            f"{what}: Nango's refresh failed for an unknown reason; it will retry",
            provider_code="refresh_failed",
            provider_message=message,
            retry_after=retry_after,
        )

    def _error_fields(self, body: bytes) -> tuple[str | None, str | None, str]:
        """``(code, redacted message, redacted text to search)`` of a Nango error body."""
        secrets = self._known_secrets()
        text = redact(body.decode("utf-8", "replace"), secrets)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None, text[:500] or None, text
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, str):
            return redact(error, secrets)[:100], None, text
        if not isinstance(error, dict):
            return None, None, text
        code = error.get("code")
        message = error.get("message")
        payload = error.get("payload")
        if isinstance(payload, dict):
            # The connection echoed back in the payload is noise for the message.
            payload = {k: v for k, v in payload.items() if k != "connection"}
        parts = [message if isinstance(message, str) else None]
        if payload:
            parts.append(json.dumps(payload, sort_keys=True, default=str))
        joined = " ".join(p for p in parts if p)
        return (
            redact(code, secrets)[:100] if isinstance(code, str) else None,
            redact(joined, secrets)[:1000] or None,
            text,
        )

    async def _secret_key(self) -> str:
        if self._secret is None:
            self._secret = await read_secret_file(
                self._config.secret_key_file, f"secret_key_file of {self.connection_id!r}"
            )
        return self._secret

    def _known_secrets(self) -> list[str]:
        known = [self._secret or ""]
        if self._webhook_key is not None:
            known.append(self._webhook_key.decode("utf-8", "replace"))
        if self._lease is not None:
            known.append(self._lease.access_token)
        return known


def _copy(dead: DeadGrant) -> DeadGrant:
    return DeadGrant(
        str(dead), provider_code=dead.provider_code, provider_message=dead.provider_message
    )


def _upstream_code(text: str) -> str | None:
    if match := _AADSTS_RE.search(text):
        return match.group(0)
    if match := _CODE_RE.search(text):
        return match.group(1)
    return None


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _expiry(expires_at: object, expires_in: object, now: float) -> float | None:
    """Nango's ``expires_at`` (ISO 8601; epoch seconds or ms tolerated) as unix time."""
    if isinstance(expires_at, str) and expires_at:
        try:
            return datetime.fromisoformat(expires_at).timestamp()
        except ValueError:
            return None
    if isinstance(expires_at, int | float) and not isinstance(expires_at, bool):
        value = float(expires_at)
        if math.isfinite(value) and value > 0:
            return value / 1000 if value > 1e11 else value
    if (
        isinstance(expires_in, int | float)
        and not isinstance(expires_in, bool)
        and math.isfinite(expires_in)
    ):
        return now + float(expires_in)
    return None
