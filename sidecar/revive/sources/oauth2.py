"""The built-in refresher: the sidecar holds the refresh token and redeems it itself.

Refreshes of one connection are serialised by one lock and shared by everyone waiting for them
(single flight), because rotating refresh tokens turn two concurrent refreshes into a dead
grant. Across processes sharing one ``data_dir`` the same holds through
``GrantBackend.refreshing``: a per-connection ``flock`` held from reading the grant, through
the token call, to saving its successor, after which a waiting process reads the grant again
and redeems the successor instead of the token the provider just revoked. The network exchange
runs as its own task that callers only ``shield``-await: a client that hangs up mid-refresh
cannot abort it after the provider has already rotated the token. A rotated refresh token is
persisted before the new access token is handed out.

The grant lives in a ``GrantBackend`` (``grant_store``: encrypted files under ``data_dir``, or
Vault KV v2 shared by several sidecars) behind ``GrantSync``, which writes every rotation
check-and-set against the version read (see ``revive.sources._grant_sync`` for the rules).
What the refresher adds on top:

* Another writer won the race for a rotation: its grant is adopted. Same generation: the
  access token this exchange obtained is still handed out (the provider issued it; it is
  valid). A new generation (a reconnect elsewhere): the adopted grant is redeemed instead.
* The store fails during write-back (Vault down): the refresh raises
  ``CredentialUnavailable`` and the new access token is dropped, but the rotated refresh
  token stays in memory, unsaved. The next refresh (a caller's retry, the proactive refresh
  or the keep-alive task) redeems that token, not the consumed one the store still holds,
  and writes its successor against the original version. Only if the process ends before
  any write succeeds is the rotation lost (with a provider that revokes consumed refresh
  tokens the grant is then dead and needs a reconnect).
* The provider refuses the token although another writer may have rotated it (a Vault
  replica on another host, which no lock reaches): the grant the store holds then is
  redeemed, up to ``_CHASES`` times in a row. Dead only if the store still holds the very
  token the provider refused; a store that kept moving is a transient failure.
* Every successful redemption records ``last_refreshed_at`` (best effort when nothing
  rotated), which keep-alive (``revive.sources.keep_alive``) and ``grant_risk`` read.

A process killed mid-refresh (SIGKILL, OOM, power loss) can still lose a rotation, and no
ordering on our side closes that window. It opens when the refresh-token POST leaves the
socket: the provider may rotate, and revoke the old token, as soon as it reads the request,
even if we die before its answer arrives. It closes when ``GrantStore.write`` has published
the successor with ``os.replace`` (what a restarted or peer process reads; after power loss,
only once the directory is fsynced, which ``write`` also awaits). In between: the answer's
transit, classification, sealing, the write lock, re-reading the record for its version and
fsyncing the temporary file: about 1.3 ms against the local lab provider, 1 ms of it after the
answer arrived, mostly fsync. Nothing is handed out before that save, and the save cannot
start before the successor is known, so the window can only be made shorter, not removed. After such a loss the file still holds the revoked token: a
restarted process (or a peer, once the kernel has dropped the dead holder's ``flock``) redeems
it and gets ``invalid_grant`` (the lab provider's ``AADSTS70000``), and a recovery case opens.
The lab provider revokes at once; Entra keeps a rotated refresh token valid for a while, so
against Entra the restarted process redeems the old token successfully and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

import aiohttp
from pydantic import SecretStr
from yarl import URL

from revive.config import OAuth2SourceConfig
from revive.errors import CredentialError, CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.redact import redact
from revive.sources._grant_sync import GrantSync
from revive.sources.base import (
    TOKEN_REFRESH,
    GrantRisk,
    Lease,
    RefreshClassifier,
    same_token,
    superseded,
)
from revive.sources.grants import Grant, GrantBackend, read_secret_file
from revive.sources.keep_alive import GrantKeeper
from revive.sources.token_endpoint import number, parse_answer, post_form

__all__ = ["OAuth2Source"]

log = logging.getLogger(__name__)

_PROACTIVE_BACKOFF = 5.0  # seconds between failed proactive refreshes, absent a Retry-After
_CHASES = 4  # redemptions in one refresh, each of a token another writer rotated meanwhile


class OAuth2Source:
    """``CredentialSource`` that runs the OAuth 2.0 refresh-token grant against ``token_url``.

    Also ``ReportsGrantRisk``: with ``keep_alive.enabled`` it refreshes idle grants in the
    background (after ``start()``) and reports grants about to die.

    Args:
        connection_id: the connection this source serves.
        config: token endpoint, client, grant store, keep-alive and timing settings.
        grants: where the refresh token lives (files under ``data_dir``, Vault).
        classifier: decides what a token-endpoint answer means (the connection's policy).
        http: a shared client session; the source does not close it.
        clock: unix time, replaceable in tests.
        phase: the value passed to ``classifier.classify`` as the phase.
        rng: uniform [0, 1) draws for the keep-alive jitter, replaceable in tests.
        lock_wait: seconds to wait for another process's refresh of this grant before
            failing transiently; default: two token calls, the settle window and 5 s.
    """

    def __init__(
        self,
        connection_id: str,
        config: OAuth2SourceConfig,
        grants: GrantBackend,
        classifier: RefreshClassifier,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        *,
        phase: Any = TOKEN_REFRESH,
        rng: Callable[[], float] = random.random,
        lock_wait: float | None = None,
    ) -> None:
        self.connection_id = connection_id
        self._config = config
        self._sync = GrantSync(connection_id, grants)
        self._classifier = classifier
        self._http = http
        self._clock = clock
        self._phase = phase
        self._lock = asyncio.Lock()
        if lock_wait is None:
            lock_wait = 2 * config.token_timeout_seconds + grants.settle_seconds + 5
        self._lock_wait = lock_wait
        self._lease: Lease | None = None
        self._client_secret: str | None = None
        self._secret_loaded = False
        self._shared: asyncio.Task[Lease] | None = None  # the plain refresh everyone joins
        self._shared_for: Lease | None = None  # the lease that refresh replaces
        self._tasks: set[asyncio.Task[Lease]] = set()
        self._saves: set[asyncio.Future[Lease]] = set()
        self._proactive_not_before = 0.0
        self._host = URL(config.token_url).host or config.token_url
        self._keeper: GrantKeeper | None = None
        if config.keep_alive.enabled:
            self._keeper = GrantKeeper(
                connection_id,
                config.keep_alive,
                self._refresh_if_idle,
                self._known_secrets,
                clock,
                rng,
                # A wait for the refresh lock, two exchanges, a settle window and a few
                # grant-store calls, with room.
                check_timeout=(
                    self._lock_wait + 2 * config.token_timeout_seconds + grants.settle_seconds + 30
                ),
            )

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
            CredentialUnavailable: the grant store failed transiently, or another process's
                refresh held the grant too long (nothing was stored).
            CredentialError: fetching the first access token failed (only if none was given).
        """
        # Storing alone is check-and-set; redeeming the new token must exclude other processes.
        redeeming = not access_token
        async with self._lock, self._refreshing() if redeeming else nullcontext():
            now = self._clock()
            grant = await self._sync.install(
                lambda generation: Grant(
                    refresh_token=SecretStr(refresh_token),
                    scope=scope,
                    generation=generation,
                    obtained_at=now,
                )
            )
            self._lease = None
            self._proactive_not_before = 0.0
            if self._keeper is not None:
                self._keeper.refreshed()
            if access_token:
                self._lease = Lease(
                    self.connection_id, grant.generation, access_token, _expiry(expires_in, now)
                )
                return self._lease
            return await self._redeem(grant, None)

    def start(self) -> None:
        """Start background work: the keep-alive task when enabled (``build_source`` calls
        this). Needs a running event loop; ``close()`` stops it."""
        if self._keeper is not None:
            self._keeper.start()

    @property
    def keeper(self) -> GrantKeeper | None:
        """The keep-alive bookkeeping, or ``None`` unless ``keep_alive.enabled``."""
        return self._keeper

    def grant_risk(self, now: float | None = None) -> GrantRisk | None:
        """See ``ReportsGrantRisk``: from memory, no provider or grant-store call.

        ``None`` unless ``keep_alive.enabled``, and for a grant known dead (a recovery case
        covers it). A source that has not read its grant yet (just started: the first
        keep-alive check reads it within ``min(check_every, 30 s)``) reports only failures.
        """
        if self._keeper is None or self._sync.dead is not None:
            return None
        grant = self._sync.grant
        last_used = None if grant is None else grant.last_used
        return self._keeper.risk(last_used, self._clock() if now is None else now)

    def grant_expires_at(self) -> float | None:
        """Unix time the provider is expected to drop the grant for disuse, if known.

        ``None`` unless ``keep_alive.enabled`` and the grant was read and is not dead.
        """
        grant = self._sync.grant
        if self._keeper is None or grant is None or self._sync.dead is not None:
            return None
        return self._keeper.expires_at(grant.last_used)

    async def close(self) -> None:
        """Stop keep-alive and cancel any refresh still running (the session is the caller's).

        A refresh whose token answer has arrived is not cancelled but finishes saving: the
        provider may already have rotated the refresh token, and only that save keeps it.
        """
        if self._keeper is not None:
            await self._keeper.close()
        for task in (tasks := list(self._tasks)):
            task.cancel()
        await asyncio.gather(*tasks, *list(self._saves), return_exceptions=True)

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

    def _refreshing(self) -> AbstractAsyncContextManager[None]:
        return self._sync.backend.refreshing(self.connection_id, self._lock_wait)

    async def _refresh_locked(self, observed: Lease | None, claims: str | None) -> Lease:
        async with self._lock:
            current = self._lease
            if claims is None and superseded(current, observed, self._clock()):
                assert current is not None
                return current
            async with self._refreshing():
                # Read inside the lock: the process that held it before may have rotated.
                grant = await self._sync.current(self._seed)
                if self._sync.dead is not None:
                    # Asking again with a token the provider declared dead only earns
                    # throttling (Entra AADSTS50196); a new grant in the store lifts it.
                    grant = await self._sync.newer(grant, self._sync.dead, settle=False)
                for _ in range(_CHASES):
                    try:
                        return await self._redeem(grant, claims)
                    except DeadGrant as dead:
                        # Another writer may have rotated the token under us (PROVIDERS.md
                        # §1.3): the provider then refuses ours although the grant is alive.
                        # ``newer`` raises (and remembers) the verdict if the store agrees.
                        grant = await self._sync.newer(grant, dead, settle=True)
                        log.info(
                            "refresh token of %s was rotated elsewhere; retrying",
                            self.connection_id,
                        )
                raise self._sync.kept_conflicting()

    # -- keep-alive --------------------------------------------------------------------------

    async def _refresh_if_idle(self) -> bool:
        """One keep-alive check: refresh when idle too long, or when a rotation is unsaved."""
        assert self._keeper is not None
        async with self._lock:
            grant = await self._sync.current(self._seed)
            unsaved = self._sync.unsaved
        if not unsaved and not self._keeper.due(grant.last_used, self._clock()):
            return False
        await self._join_refresh(self._lease)
        return True

    # -- one exchange ------------------------------------------------------------------------

    async def _seed(self, version: int) -> Grant | None:
        """Seal ``refresh_token_file`` into the grant store, once, when it holds nothing."""
        path = self._config.refresh_token_file
        if path is None:
            return None
        token = await read_secret_file(path, f"refresh_token_file of {self.connection_id!r}")
        grant = Grant(
            refresh_token=SecretStr(token),
            scope=" ".join(self._config.scopes) or None,
            obtained_at=self._clock(),
        )
        kept = await self._sync.seed(grant, version)
        log.info("sealed refresh_token_file of %s into the grant store", self.connection_id)
        return kept

    async def _secret(self) -> str | None:
        if not self._secret_loaded and self._config.client_secret_file is not None:
            self._client_secret = await read_secret_file(
                self._config.client_secret_file, f"client_secret_file of {self.connection_id!r}"
            )
        self._secret_loaded = True
        return self._client_secret

    def _known_secrets(self) -> list[str]:
        known = [self._client_secret or ""]
        if self._sync.grant is not None:
            known.append(self._sync.grant.refresh_token.get_secret_value())
        if self._lease is not None:
            known.append(self._lease.access_token)
        return known

    async def _redeem(self, grant: Grant, claims: str | None, *, adopted: bool = False) -> Lease:
        """One refresh-token exchange; raises the CredentialError its answer calls for.

        ``adopted``: ``grant`` was just taken from another writer; do not chase a third.
        """
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
            # From here the provider may have rotated the refresh token: saving it must not be
            # cancelled (a shutdown closing the source mid-save would lose the grant).
            save = asyncio.ensure_future(self._accept(grant, headers, body, claims, adopted))
            self._saves.add(save)
            save.add_done_callback(self._saves.discard)
            return await asyncio.shield(save)
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

    async def _accept(
        self,
        grant: Grant,
        headers: Mapping[str, str],
        body: bytes,
        claims: str | None,
        adopted: bool,
    ) -> Lease:
        payload = parse_answer(headers.get("Content-Type", ""), body)
        access_token = payload.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise CredentialUnavailable(
                f"token endpoint {self._host} answered success without an access_token"
            )
        now = self._clock()
        new_rt = payload.get("refresh_token")
        update: dict[str, Any] = {"last_refreshed_at": now}
        rotated = isinstance(new_rt, str) and bool(new_rt)
        if rotated and new_rt != grant.refresh_token.get_secret_value():
            scope = payload.get("scope")
            update["refresh_token"] = SecretStr(str(new_rt))
            update["rotated_at"] = now
            update["scope"] = scope if isinstance(scope, str) and scope else grant.scope
        else:
            rotated = False
        updated = grant.model_copy(update=update)
        if rotated or self._sync.unsaved:
            kept = await self._sync.write_back(grant, updated, required=True)
        else:
            try:
                kept = await self._sync.write_back(grant, updated, required=False)
            except CredentialError as exc:
                kept = updated  # only the refresh time is not on record; nothing is lost
                log.warning(
                    "could not record the refresh time of %s: %s",
                    self.connection_id, redact(str(exc), self._known_secrets()),
                )
        if kept is not updated and kept.generation != grant.generation and not adopted:
            # A reconnect elsewhere replaced the grant while we refreshed the old one.
            return await self._redeem(kept, claims, adopted=True)
        if self._keeper is not None:
            self._keeper.refreshed()  # only now: a rotation Vault refused is still a failure
        expires_at = _expiry(number(payload.get("expires_in")), now)
        self._lease = Lease(self.connection_id, grant.generation, access_token, expires_at)
        self._proactive_not_before = 0.0
        return self._lease


def _expiry(expires_in: float | None, now: float) -> float | None:
    return None if expires_in is None else now + expires_in
