"""Grant keep-alive: refresh idle grants before the provider drops them, and say when one is
at risk.

Entra drops a refresh token that went unused for 90 days (AADSTS700082); a connection that a
workflow touches once a quarter then dies although nothing was wrong with it. For a connection
that opts in (``keep_alive.enabled``), one background task per source wakes every
``check_every`` (jittered, so that many sidecars and connections do not refresh in lockstep),
and refreshes the grant when it has not been redeemed for ``idle_refresh_after``. It never runs
on the request path; each check is bounded by a timeout, and ``close()`` stops it.

The same bookkeeping answers ``grant_risk`` (``revive.sources.base.ReportsGrantRisk``) without
any provider call: ``refresh-failing`` once ``failures_before_risk`` checks in a row failed
short of a dead grant (transient errors, timeouts, and also a rejected client configuration,
which kills every grant just as surely if nobody fixes it), else ``idle-grant-expiring``
within ``warn_before`` of ``last used + grant_lifetime``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from revive.config import KeepAliveConfig
from revive.errors import CredentialError, DeadGrant
from revive.redact import redact
from revive.sources.base import GrantRisk

__all__ = ["IDLE_GRANT_EXPIRING", "REFRESH_FAILING", "GrantKeeper"]

log = logging.getLogger("revive.sources.keep_alive")

IDLE_GRANT_EXPIRING = "idle-grant-expiring"
REFRESH_FAILING = "refresh-failing"

_FIRST_CHECK_CAP = 30.0  # seconds: the first check after start, so a restart reports soon


class GrantKeeper:
    """The keep-alive task and failure count of one oauth2 source.

    Args:
        connection_id: the connection whose grant is kept.
        config: the connection's ``keep_alive`` settings.
        refresh_if_idle: reads the grant and refreshes it if idle too long; returns whether
            it refreshed. Raises the source's ``CredentialError`` on failure.
        secrets: what the source knows that must not reach a log line.
        clock: unix time, replaceable in tests.
        rng: a uniform [0, 1) draw for jitter, replaceable in tests.
        check_timeout: the bound on one check (token endpoint, grant store, retries).
    """

    def __init__(
        self,
        connection_id: str,
        config: KeepAliveConfig,
        refresh_if_idle: Callable[[], Awaitable[bool]],
        secrets: Callable[[], list[str]],
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        *,
        check_timeout: float = 60.0,
    ) -> None:
        self.connection_id = connection_id
        self.config = config
        self._refresh_if_idle = refresh_if_idle
        self._secrets = secrets
        self._clock = clock
        self._rng = rng
        self._check_timeout = check_timeout
        self.failures = 0  # checks in a row that failed short of a dead grant
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"GrantKeeper(connection_id={self.connection_id!r}, failures={self.failures})"

    @property
    def running(self) -> bool:
        """Whether the background task is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the background task (idempotent); needs a running event loop."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"keep-alive {self.connection_id}"
            )

    async def close(self) -> None:
        """Stop the background task and wait for it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def refreshed(self) -> None:
        """A refresh succeeded (any caller's): the grant evidently works."""
        self.failures = 0

    async def check(self) -> bool:
        """One keep-alive check now, with failure accounting; returns whether it refreshed.

        Never raises a ``CredentialError``: failures are counted and logged (redacted).
        """
        try:
            async with asyncio.timeout(self._check_timeout):
                refreshed = await self._refresh_if_idle()
        except DeadGrant as dead:
            # Nothing to keep alive; the next run that needs it opens a recovery case.
            log.warning(
                "keep-alive: the grant of %s is dead (%s)",
                self.connection_id, dead.provider_code or "no code",
            )
            return False
        except (CredentialError, TimeoutError) as exc:
            self.failures += 1
            what = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            log.warning(
                "keep-alive check %d in a row for %s failed (%s): %s",
                self.failures, self.connection_id, type(exc).__name__,
                redact(what, self._secrets()),
            )
            return False
        self.failures = 0
        if refreshed:
            log.info("keep-alive refreshed the idle grant of %s", self.connection_id)
        return refreshed

    def due(self, last_used: float, now: float) -> bool:
        """Whether a grant last used at ``last_used`` is idle long enough to refresh."""
        return now - last_used >= self.config.idle_refresh_after.total_seconds()

    def expires_at(self, last_used: float) -> float:
        """When the provider is expected to drop a grant last used at ``last_used``."""
        return last_used + self.config.grant_lifetime.total_seconds()

    def risk(self, last_used: float | None, now: float) -> GrantRisk | None:
        """The risk to the grant at ``now``; ``last_used`` ``None`` when not read yet.

        ``refresh-failing`` wins over ``idle-grant-expiring``: it says why the grant is
        drifting towards its expiry, and carries the same ``expires_at``.
        """
        expires_at = None if last_used is None else self.expires_at(last_used)
        when = "" if expires_at is None else f"; the provider drops it at {_iso(expires_at)}"
        if self.failures >= self.config.failures_before_risk:
            return GrantRisk(
                self.connection_id,
                REFRESH_FAILING,
                f"{self.failures} keep-alive refreshes in a row failed{when}",
                expires_at,
            )
        if expires_at is None or last_used is None:
            return None
        if now >= expires_at - self.config.warn_before.total_seconds():
            return GrantRisk(
                self.connection_id,
                IDLE_GRANT_EXPIRING,
                f"refresh token unused since {_iso(last_used)}{when} unless it is redeemed",
                expires_at,
            )
        return None

    def next_delay(self) -> float:
        """Seconds until the next check: ``check_every`` times ``1 ± jitter``."""
        spread = self.config.jitter * (2 * self._rng() - 1)
        return self.config.check_every.total_seconds() * (1 + spread)

    async def _run(self) -> None:
        first = min(self.config.check_every.total_seconds(), _FIRST_CHECK_CAP)
        await asyncio.sleep(first * self._rng())
        while True:
            await self.check()
            await asyncio.sleep(self.next_delay())


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
