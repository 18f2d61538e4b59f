"""The ``CredentialSource`` seam: who turns a connection into a usable provider access token.

The proxy only ever asks a source for a :class:`Lease` and, when the provider rejects one, for a
fresh lease. Which identity layer stands behind the source (a static file, the built-in OAuth 2.0
refresher, Nango, ...) is chosen once at start-up by ``revive.sources.factory.build_source``.

The token-endpoint classifier is reached through :class:`RefreshClassifier`, a structural
Protocol, so that this package does not import ``revive.classify`` (siblings stay independent;
``revive.classify.Policy`` satisfies it as is).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

TOKEN_REFRESH = "token_refresh"
"""The classifier phase a source asks about; equal to ``revive.classify.Phase.TOKEN_REFRESH``."""


@dataclass(frozen=True, slots=True)
class Lease:
    """One access token handed out for one connection, held in memory only.

    Attributes:
        connection_id: the connection the token belongs to.
        generation: the grant generation (DESIGN §4): refreshing keeps it, a reconnect bumps it.
        access_token: the provider token; excluded from ``repr``/``str`` so it never reaches logs.
        expires_at: unix time after which the provider rejects the token; ``None`` if unknown.
    """

    connection_id: str
    generation: int
    access_token: str = field(repr=False)
    expires_at: float | None

    def expired(self, now: float | None = None, skew: float = 0.0) -> bool:
        """Whether the token is expired, or will be within ``skew`` seconds of ``now``.

        A lease whose expiry is unknown never expires locally; the provider's 401 decides.
        """
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) + skew >= self.expires_at


def superseded(current: Lease | None, observed: Lease | None, now: float | None = None) -> bool:
    """Whether ``current`` is a valid lease that replaced ``observed``: the single-flight test.

    A caller that saw ``observed`` and then waited for a refresh in progress uses this to take
    the result instead of refreshing a second time.
    """
    if current is None or current.expired(now):
        return False
    return observed is None or current.access_token != observed.access_token


def same_token(a: Lease | None, b: Lease | None) -> bool:
    """Whether two (possibly absent) leases carry the same access token."""
    if a is None or b is None:
        return a is b
    return a.access_token == b.access_token


class CredentialSource(Protocol):
    """Hands out leases for one connection and renews them when the provider rejects one.

    Every failure is one of ``revive.errors.DeadGrant`` (only a human reconnect helps),
    ``CredentialUnavailable`` (transient: retry later, the grant is kept) or
    ``CredentialMisconfigured`` (operator fault: alert, do not disconnect the user). Each carries
    ``provider_code`` and a redacted ``provider_message``; no token ever appears in any message.
    """

    connection_id: str

    async def lease(self) -> Lease:
        """Return the current lease, refreshing first if it is expired or absent.

        Concurrent callers that find an expired lease share one refresh (single flight). A lease
        that is still valid but close to expiry is returned at once, and a single background
        refresh is started so that the next caller finds a fresh one.

        Returns:
            A lease that was not expired when it was obtained.

        Raises:
            DeadGrant: no grant is on record, or the identity layer declared it dead.
            CredentialUnavailable: the identity layer failed transiently; ``retry_after`` may
                say when to try again.
            CredentialMisconfigured: the sidecar's own configuration is wrong (missing file,
                rejected client secret).
        """
        ...

    async def refresh(self, stale: Lease | None, *, claims: str | None = None) -> Lease:
        """Force a new lease because ``stale`` was rejected by the provider.

        Single flight: if another caller already replaced ``stale`` (the current lease's token
        differs and is not expired) and ``claims`` is ``None``, the current lease is returned
        without contacting the identity layer, so a burst of 401s costs one refresh.

        Args:
            stale: the lease the provider rejected; ``None`` if the caller held none.
            claims: a decoded CAE claims challenge (JSON text). It always bypasses the cache and
                is sent to the token endpoint as the ``claims`` parameter.

        Returns:
            The new lease (its generation is unchanged unless a reconnect happened meanwhile).

        Raises:
            DeadGrant: the identity layer declared the grant dead (``provider_code`` says why).
            CredentialUnavailable: transient failure; the grant is kept.
            CredentialMisconfigured: operator fault; the grant is kept.
        """
        ...

    async def close(self) -> None:
        """Cancel background work. The source must not be used afterwards."""
        ...


@dataclass(frozen=True, slots=True)
class GrantRisk:
    """A grant that still works but is about to die: the signal to reconnect before a run fails.

    Attributes:
        connection_id: the connection whose grant is at risk.
        reason: a stable slug: ``idle-grant-expiring`` (the provider drops refresh tokens unused
            for too long, Entra after 90 days), ``refresh-failing`` (refreshes fail transiently
            over and over), ``identity-layer-auth-failed`` (the identity layer reported a
            failed refresh or re-authorization, e.g. a Nango ``auth`` webhook with
            ``success: false``).
        detail: a short human sentence, free of secrets.
        expires_at: unix time the grant is expected to die, when known.
    """

    connection_id: str
    reason: str
    detail: str
    expires_at: float | None = None


class ReportsGrantRisk(Protocol):
    """Implemented by sources that can tell, without a provider call, whether their grant is at
    risk; the ``/metrics`` collector and ``GET /v1/connections/at-risk`` ask them."""

    def grant_risk(self, now: float | None = None) -> GrantRisk | None:
        """The risk to this source's grant at ``now`` (default: the current time), or ``None``."""
        ...


class RefreshVerdict(Protocol):
    """What the classifier says about one token-endpoint answer (read-only view)."""

    @property
    def failure_class(self) -> str:
        """One of ``ok``, ``refreshable``, ``transient``, ``dead_grant``, ``permanent``."""
        ...

    @property
    def provider_code(self) -> str | None:
        """The most specific code the provider gave (``invalid_grant``, ``AADSTS700082``)."""
        ...

    @property
    def retry_after(self) -> float | None:
        """Seconds the provider asked us to wait, if it said."""
        ...

    @property
    def message(self) -> str | None:
        """The provider's human text, already redacted by the classifier."""
        ...


class RefreshClassifier(Protocol):
    """Classifies token-endpoint answers; ``revive.classify.Policy`` satisfies this."""

    def classify(
        self,
        phase: Any,
        status: int | None,
        headers: Mapping[str, str],
        body: bytes | str | None,
        /,
    ) -> RefreshVerdict:
        """Classify one answer.

        Args:
            phase: always the token-refresh phase here (``TOKEN_REFRESH`` or the enum member).
            status: the HTTP status, or ``None`` when no answer arrived.
            headers: the answer's headers (case-insensitive mapping when it comes from aiohttp).
            body: the answer's body, bounded by the caller.

        Returns:
            The verdict; its ``failure_class`` decides which error a source raises.
        """
        ...
