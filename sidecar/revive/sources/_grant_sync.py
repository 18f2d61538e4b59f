"""One process's view of one connection's grant, kept in step with its ``GrantBackend``.

The oauth2 refresher (``revive.sources.oauth2``) decides when to redeem; this decides which
grant to redeem and how a redeemed one goes back to the store. Every write names the version
it replaces:

* A rotation is written with the version that was read. On ``GrantConflict`` the store is
  read again. If it holds the very token this exchange redeemed (an earlier write of ours
  landed although its answer was lost), ours is written on top. Otherwise another writer
  rotated or reconnected first: its grant is adopted, never overwritten.
* If the write fails (Vault down), the rotated token stays in memory marked ``unsaved`` with
  the version it replaces, and :meth:`GrantSync.current` keeps returning it: the store's copy
  was consumed by redeeming it, so the next redemption must use ours.
* A shared store is read before every redemption, so a sidecar does not present a token
  another one already rotated; :meth:`GrantSync.newer` re-reads for up to
  ``settle_seconds`` when the provider rejects the token the store still holds.

Not safe for concurrent use: the source calls it under its refresh lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from revive.errors import CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.sources.grants import Grant, GrantBackend, GrantConflict, StoredGrant

__all__ = ["GrantSync"]

log = logging.getLogger("revive.sources.oauth2")

_WRITE_ATTEMPTS = 3  # versioned writes in a row that may lose before giving up (transient)


class GrantSync:
    """The latest grant this process knows, its store version and its dead verdict.

    Attributes:
        grant: the grant to redeem next, ``None`` before the first read.
        version: the store version ``grant`` was read at or written as.
        unsaved: ``grant`` is a rotation the store does not hold yet.
        dead: the provider's verdict on ``grant``, kept until the grant changes.
    """

    def __init__(self, connection_id: str, backend: GrantBackend) -> None:
        self.connection_id = connection_id
        self.backend = backend
        self.grant: Grant | None = None
        self.version = 0
        self.unsaved = False
        self.dead: DeadGrant | None = None

    def __repr__(self) -> str:
        return (
            f"GrantSync(connection_id={self.connection_id!r}, version={self.version},"
            f" unsaved={self.unsaved}, dead={self.dead is not None})"
        )

    async def current(self, seed: Callable[[int], Awaitable[Grant | None]]) -> Grant:
        """The grant to redeem: memory, or the store when it is shared or nothing is known.

        Args:
            seed: makes a first grant (from ``refresh_token_file``) when the store has none,
                written against the version given; returns ``None`` when there is no seed.

        Raises:
            DeadGrant: no grant anywhere (``no_grant``).
            CredentialError: the store failed.
        """
        if self.grant is not None and (self.unsaved or not self.backend.shared):
            return self.grant
        stored = await self.backend.read(self.connection_id)
        if stored.grant is not None:
            return self.adopt(stored)
        if self.grant is None and (seeded := await seed(stored.version)) is not None:
            return seeded
        raise DeadGrant(
            f"no grant on record for connection {self.connection_id!r}; connect it first",
            provider_code="no_grant",
        )

    async def seed(self, grant: Grant, version: int) -> Grant:
        """Write a first grant over ``version``; adopt another process's if it was faster."""
        try:
            written = await self.backend.write(self.connection_id, grant, version)
        except GrantConflict:
            stored = await self.backend.read(self.connection_id)
            if stored.grant is None:
                raise self.kept_conflicting() from None
            return self.adopt(stored)
        return self.adopt(StoredGrant(grant, written))

    async def newer(self, used: Grant, dead: DeadGrant, *, settle: bool) -> Grant:
        """The stored grant if its token differs from ``used``; else remember and raise ``dead``.

        With ``settle``, the store is read again for up to ``settle_seconds``: another sidecar
        may have redeemed the token and not yet written its successor.
        """
        token = used.refresh_token.get_secret_value()
        pauses = _settle_pauses(self.backend.settle_seconds) if settle else []
        for pause in (*pauses, None):
            stored = await self.backend.read(self.connection_id)
            if stored.grant is not None and stored.grant.refresh_token.get_secret_value() != token:
                return self.adopt(stored)
            if pause is not None:
                await asyncio.sleep(pause)
        self.dead = dead
        raise DeadGrant(
            str(dead), provider_code=dead.provider_code, provider_message=dead.provider_message
        )

    def adopt(self, stored: StoredGrant) -> Grant:
        """Make the store's grant ours; a different token or generation lifts a dead verdict."""
        grant = stored.grant
        assert grant is not None
        old = self.grant
        if (
            old is None
            or old.generation != grant.generation
            or old.refresh_token.get_secret_value() != grant.refresh_token.get_secret_value()
        ):
            self.dead = None
        self.grant, self.version, self.unsaved = grant, stored.version, False
        return grant

    async def write_back(self, base: Grant, updated: Grant, *, required: bool) -> Grant:
        """Store ``updated`` (redeemed from ``base``) over ``base``'s version.

        Args:
            base: the grant that was redeemed.
            updated: ``base`` after the exchange (rotated token, refresh time).
            required: the store must get it (a rotation): until it does, ``updated`` stays in
                memory as ``unsaved``. Otherwise (only the refresh time changed) a failure
                is the caller's to log.

        Returns:
            The grant now kept: ``updated``, or after a lost race the other writer's.

        Raises:
            DeadGrant: the record vanished from the store meanwhile (``no_grant``).
            CredentialError: the store failed (``unsaved`` kept if ``required``).
        """
        self.grant = updated
        self.unsaved = self.unsaved or required
        expected = self.version
        base_token = base.refresh_token.get_secret_value()
        for _ in range(_WRITE_ATTEMPTS):
            try:
                version = await self.backend.write(self.connection_id, updated, expected)
            except GrantConflict:
                stored = await self.backend.read(self.connection_id)
                theirs = stored.grant
                if theirs is None:
                    self.grant, self.unsaved = None, False
                    raise DeadGrant(
                        f"the grant of {self.connection_id!r} was removed from its store"
                        " during a refresh",
                        provider_code="no_grant",
                    ) from None
                if (
                    theirs.generation == base.generation
                    and theirs.refresh_token.get_secret_value() == base_token
                ):
                    expected = stored.version  # it holds our predecessor: ours goes on top
                    continue
                log.info(
                    "another writer replaced the grant of %s first; using its grant",
                    self.connection_id,
                )
                return self.adopt(stored)
            self.grant, self.version, self.unsaved = updated, version, False
            return updated
        raise self.kept_conflicting()

    async def install(self, make: Callable[[int], Grant]) -> Grant:
        """Write a reconnect's grant with a generation above every one on record.

        Args:
            make: builds the grant for a given generation.

        Raises:
            CredentialError: the store failed, or kept changing under other writers.
        """
        for _ in range(_WRITE_ATTEMPTS):
            stored: StoredGrant | None
            try:
                stored = await self.backend.read(self.connection_id)
            except CredentialMisconfigured:
                stored = None  # a reconnect is how an unreadable grant file gets replaced
            # The store may be ahead of memory when another process reconnected meanwhile.
            on_record = None if stored is None else stored.grant
            known = [g.generation for g in (self.grant, on_record) if g is not None]
            grant = make(max(known, default=0) + 1)
            expected = None if stored is None else stored.version
            try:
                version = await self.backend.write(self.connection_id, grant, expected)
            except GrantConflict:
                continue  # someone wrote meanwhile: read again, take a generation above
            self.grant, self.version, self.unsaved, self.dead = grant, version, False, None
            return grant
        raise self.kept_conflicting()

    def kept_conflicting(self) -> CredentialUnavailable:
        """The transient error for a store that kept changing under concurrent writers."""
        return CredentialUnavailable(
            f"the grant of {self.connection_id!r} kept changing under concurrent writers",
            provider_code="grant_version_conflict",
        )


def _settle_pauses(total: float) -> list[float]:
    """Growing pauses (50 ms, 100 ms, ...) that add up to ``total`` seconds."""
    pauses: list[float] = []
    pause, left = 0.05, total
    while left > 1e-3:
        pauses.append(min(pause, left))
        left -= pauses[-1]
        pause *= 2
    return pauses
