"""The built-in refresher: the sidecar holds the (encrypted) refresh token and redeems it itself.

Refreshes of one connection are serialised by one lock and shared by everyone waiting for them
(single flight), because rotating refresh tokens turn two concurrent refreshes into a dead
grant. The network exchange runs as its own task that callers only ``shield``-await: a client
that hangs up mid-refresh cannot abort it after the provider has already rotated the token.
A rotated refresh token is persisted before the new access token is handed out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr
from yarl import URL

from revive.config import OAuth2SourceConfig
from revive.errors import CredentialError, CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.redact import redact
from revive.sources.base import TOKEN_REFRESH, Lease, RefreshClassifier, same_token, superseded
from revive.sources.grants import Grant, GrantStore, read_secret_file
from revive.sources.token_endpoint import number, parse_answer, post_form

log = logging.getLogger(__name__)

_PROACTIVE_BACKOFF = 5.0  # seconds between failed proactive refreshes, absent a Retry-After


class OAuth2Source:
    """``CredentialSource`` that runs the OAuth 2.0 refresh-token grant against ``token_url``.

    Args:
        connection_id: the connection this source serves.
        config: token endpoint, client and timing settings.
        grants: where the encrypted refresh token lives.
        classifier: decides what a token-endpoint answer means (the connection's policy).
        http: a shared client session; the source does not close it.
        clock: unix time, replaceable in tests.
        phase: the value passed to ``classifier.classify`` as the phase.
    """

    def __init__(
        self,
        connection_id: str,
        config: OAuth2SourceConfig,
        grants: GrantStore,
        classifier: RefreshClassifier,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        *,
        phase: Any = TOKEN_REFRESH,
    ) -> None:
        self.connection_id = connection_id
        self._config = config
        self._grants = grants
        self._classifier = classifier
        self._http = http
        self._clock = clock
        self._phase = phase
        self._lock = asyncio.Lock()
        self._lease: Lease | None = None
        self._grant: Grant | None = None  # latest grant known to this process
        self._client_secret: str | None = None
        self._secret_loaded = False
        self._shared: asyncio.Task[Lease] | None = None  # the plain refresh everyone joins
        self._shared_for: Lease | None = None  # the lease that refresh replaces
        self._dead: DeadGrant | None = None  # verdict on self._grant, until the grant changes
        self._tasks: set[asyncio.Task[Lease]] = set()
        self._proactive_not_before = 0.0
        self._host = URL(config.token_url).host or config.token_url

    def __repr__(self) -> str:
        return (
            f"OAuth2Source(connection_id={self.connection_id!r}, "
            f"token_url={self._config.token_url!r})"
        )

    async def lease(self) -> Lease:
        """See ``CredentialSource.lease``."""
        current = self._lease
        now = self._clock()
        if current is not None and not current.expired(now):
            if current.expired(now, self._config.refresh_skew_seconds):
                self._start_proactive(current, now)
            return current
        return await self._join_refresh(current)

    async def refresh(self, stale: Lease | None, *, claims: str | None = None) -> Lease:
        """See ``CredentialSource.refresh``."""
        if claims is not None:
            return await asyncio.shield(self._spawn(self._refresh_locked(stale, claims)))
        return await self._join_refresh(stale if stale is not None else self._lease)

    async def install_grant(
        self,
        refresh_token: str,
        scope: str | None,
        access_token: str | None,
        expires_in: float | None,
    ) -> Lease:
        """Store a new grant from a reconnect (generation + 1) and lease from it.

        Args:
            refresh_token: the refresh token from the authorization-code exchange.
            scope: the scopes granted, if the provider said.
            access_token: the access token from the same exchange; if ``None`` one is fetched.
            expires_in: its lifetime in seconds, if known.

        Returns:
            The first lease of the new generation.

        Raises:
            CredentialMisconfigured: the grant could not be stored.
            CredentialError: fetching the first access token failed (only if none was given).
        """
        async with self._lock:
            try:
                stored = await self._grants.load(self.connection_id)
            except CredentialMisconfigured:
                stored = None  # a reconnect is how an unreadable grant file gets replaced
            # Disk may be ahead of memory when another process reconnected meanwhile.
            known = [g.generation for g in (self._grant, stored) if g is not None]
            now = self._clock()
            grant = Grant(
                refresh_token=SecretStr(refresh_token),
                scope=scope,
                generation=max(known, default=0) + 1,
                obtained_at=now,
            )
            await self._grants.save(self.connection_id, grant)
            self._grant, self._dead = grant, None
            self._lease = None
            self._proactive_not_before = 0.0
            if access_token:
                self._lease = Lease(
                    self.connection_id, grant.generation, access_token, _expiry(expires_in, now)
                )
                return self._lease
            return await self._redeem(grant, None)

    async def close(self) -> None:
        """Cancel any refresh still running (the client session is the caller's)."""
        for task in (tasks := list(self._tasks)):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- single flight -----------------------------------------------------------------------

    async def _join_refresh(self, observed: Lease | None) -> Lease:
        current = self._lease
        if superseded(current, observed, self._clock()):
            assert current is not None
            return current
        if (
            self._shared is None
            or self._shared.done()
            # A refresh that replaces an older lease than ours may hand back ours: queue anew.
            or not same_token(self._shared_for, observed)
        ):
            self._shared = self._spawn(self._refresh_locked(observed, None))
            self._shared_for = observed
        return await asyncio.shield(self._shared)

    def _start_proactive(self, current: Lease, now: float) -> None:
        if now < self._proactive_not_before:
            return
        if self._shared is not None and not self._shared.done():
            return
        self._shared = self._spawn(self._refresh_locked(current, None))
        self._shared_for = current
        self._shared.add_done_callback(self._after_proactive)

    def _after_proactive(self, task: asyncio.Task[Lease]) -> None:
        if task.cancelled() or (exc := task.exception()) is None:
            return
        retry_after = exc.retry_after if isinstance(exc, CredentialError) else None
        self._proactive_not_before = self._clock() + (retry_after or _PROACTIVE_BACKOFF)
        # The still-valid lease keeps being served; a foreground refresh will raise this again.
        log.warning(
            "proactive refresh for %s failed (%s): %s",
            self.connection_id,
            type(exc).__name__,
            redact(str(exc), self._known_secrets()),
        )

    def _spawn(self, coro: Coroutine[Any, Any, Lease]) -> asyncio.Task[Lease]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Lease]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the awaiters (or _after_proactive) report it

    async def _refresh_locked(self, observed: Lease | None, claims: str | None) -> Lease:
        async with self._lock:
            current = self._lease
            if claims is None and superseded(current, observed, self._clock()):
                assert current is not None
                return current
            grant = await self._current_grant()
            if self._dead is not None:
                # Asking again with a token the provider declared dead only earns throttling
                # (Entra AADSTS50196); a new grant on disk (reconnect elsewhere) lifts it.
                grant = await self._newer_grant(grant, self._dead)
            try:
                return await self._redeem(grant, claims)
            except DeadGrant as dead:
                # Another process may have rotated the token under us (PROVIDERS.md §1.3):
                # the provider then rejects ours although the grant is alive.
                grant = await self._newer_grant(grant, dead)
                log.info("refresh token of %s was rotated elsewhere; retrying", self.connection_id)
                try:
                    return await self._redeem(grant, claims)
                except DeadGrant as again:
                    self._dead = again
                    raise

    async def _newer_grant(self, used: Grant, dead: DeadGrant) -> Grant:
        """The stored grant if its token differs from ``used``; else remember and raise ``dead``."""
        stored = await self._grants.load(self.connection_id)
        token = used.refresh_token.get_secret_value()
        if stored is None or stored.refresh_token.get_secret_value() == token:
            self._dead = dead
            raise DeadGrant(
                str(dead), provider_code=dead.provider_code, provider_message=dead.provider_message
            )
        self._grant, self._dead = stored, None
        return stored

    # -- one exchange ------------------------------------------------------------------------

    async def _current_grant(self) -> Grant:
        if self._grant is None:
            grant = await self._grants.load(self.connection_id)
            if grant is None and self._config.refresh_token_file is not None:
                grant = await self._bootstrap(self._config.refresh_token_file)
            if grant is None:
                raise DeadGrant(
                    f"no grant on record for connection {self.connection_id!r}; connect it first",
                    provider_code="no_grant",
                )
            self._grant = grant
        return self._grant

    async def _bootstrap(self, path: Path) -> Grant:
        token = await read_secret_file(path, f"refresh_token_file of {self.connection_id!r}")
        grant = Grant(
            refresh_token=SecretStr(token),
            scope=" ".join(self._config.scopes) or None,
            obtained_at=self._clock(),
        )
        await self._grants.save(self.connection_id, grant)
        log.info("sealed refresh_token_file of %s into the grant store", self.connection_id)
        return grant

    async def _secret(self) -> str | None:
        if not self._secret_loaded and self._config.client_secret_file is not None:
            self._client_secret = await read_secret_file(
                self._config.client_secret_file, f"client_secret_file of {self.connection_id!r}"
            )
        self._secret_loaded = True
        return self._client_secret

    def _known_secrets(self) -> list[str]:
        known = [self._client_secret or ""]
        if self._grant is not None:
            known.append(self._grant.refresh_token.get_secret_value())
        if self._lease is not None:
            known.append(self._lease.access_token)
        return known

    async def _redeem(self, grant: Grant, claims: str | None) -> Lease:
        """One refresh-token exchange; raises the CredentialError its answer calls for."""
        refresh_token = grant.refresh_token.get_secret_value()
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self._config.client_id,
        }
        if secret := await self._secret():
            form["client_secret"] = secret
        if self._config.scopes:
            form["scope"] = " ".join(self._config.scopes)
        if claims is not None:
            form["claims"] = claims
        status, headers, body = await self._post(form)
        verdict = self._classifier.classify(self._phase, status, headers, body)
        kind = str(verdict.failure_class)
        if kind == "ok":
            return await self._accept(grant, headers, body)
        secrets = [refresh_token, *self._known_secrets()]
        code = redact(verdict.provider_code, secrets) if verdict.provider_code else None
        message = redact(verdict.message, secrets) if verdict.message else None
        what = f"token endpoint {self._host} answered {status} ({code or 'no code'})"
        error: type[CredentialError]
        match kind:
            case "dead_grant":
                error, why = DeadGrant, f"the grant of {self.connection_id!r} is dead"
            case "transient" | "refreshable":
                # "refreshable" means nothing at a token endpoint; keep the grant and retry.
                error, why = CredentialUnavailable, "refresh failed transiently"
            case _:
                error, why = CredentialMisconfigured, "the endpoint rejected the client config"
        raise error(
            f"{what}: {why}",
            provider_code=code,
            provider_message=message,
            retry_after=verdict.retry_after,
        )

    async def _post(self, form: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        return await post_form(self._http, self._config, form, self._host)

    async def _accept(self, grant: Grant, headers: Mapping[str, str], body: bytes) -> Lease:
        payload = parse_answer(headers.get("Content-Type", ""), body)
        access_token = payload.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise CredentialUnavailable(
                f"token endpoint {self._host} answered success without an access_token"
            )
        now = self._clock()
        new_rt = payload.get("refresh_token")
        if isinstance(new_rt, str) and new_rt and new_rt != grant.refresh_token.get_secret_value():
            scope = payload.get("scope")
            grant = grant.model_copy(
                update={
                    "refresh_token": SecretStr(new_rt),
                    "rotated_at": now,
                    "scope": scope if isinstance(scope, str) and scope else grant.scope,
                }
            )
            # Kept in memory first: if the disk write fails, the next refresh still has it.
            self._grant = grant
            await self._grants.save(self.connection_id, grant)
        expires_at = _expiry(number(payload.get("expires_in")), now)
        self._lease = Lease(self.connection_id, grant.generation, access_token, expires_at)
        self._proactive_not_before = 0.0
        return self._lease


def _expiry(expires_in: float | None, now: float) -> float | None:
    return None if expires_in is None else now + expires_in
