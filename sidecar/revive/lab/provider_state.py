"""In-memory state of the fake Microsoft provider: grants, tokens, codes, mails, faults, calls.

One ``ProviderState`` per app, stored under ``PROVIDER_STATE`` (no module globals), so two
providers in one test process never share anything. Tokens are opaque random strings
(``lab_at_``/``lab_rt_`` prefixes make them recognisable in tests); they are dictionary keys
here and nowhere else: no ``repr`` or log line of this module contains one.

Lifetimes imitate "Refresh tokens in the Microsoft identity platform"
(https://learn.microsoft.com/entra/identity-platform/refresh-tokens): a grant (the
refresh-token chain) outlives its access tokens, rotation hands out a new refresh token on
each redemption, and a grant that died (inactivity, revocation) stays dead until the user
signs in again.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

__all__ = [
    "AUTH_CODE_TTL",
    "CALL_NOTE",
    "PROVIDER_STATE",
    "AccessToken",
    "AuthCode",
    "CallNote",
    "CallRecord",
    "Faults",
    "Grant",
    "ProviderConfig",
    "ProviderState",
    "RefreshOutcome",
    "SentMail",
    "TokenCheck",
    "iso_now",
]

#: Entra authorization codes live about ten minutes
#: (https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow).
AUTH_CODE_TTL = 600.0


@dataclass(frozen=True)
class ProviderConfig:
    """Settings of one fake provider; the defaults are what the lab and tests expect."""

    tenant: str = "lab"
    client_id: str = "revive-lab"
    client_secret: str = field(default="lab-secret", repr=False)
    access_token_ttl: int = 3600
    rotate_refresh_tokens: bool = True


class TokenCheck(enum.Enum):
    """What Graph concludes about a presented access token."""

    MISSING = "missing"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    CHALLENGED = "challenged"
    VALID = "valid"


class RefreshOutcome(enum.Enum):
    """Why a refresh-token redemption failed (success returns tokens instead)."""

    UNKNOWN = "unknown"  # never issued, or already rotated away
    DEAD = "dead"  # the grant died (AADSTS700082)


@dataclass
class Grant:
    """One user consent: a refresh-token chain and the access tokens minted from it."""

    id: str
    scope: str
    issued_at: float
    refresh_token: str = field(repr=False)
    alive: bool = True
    #: ``nbf`` of a pending CAE claims challenge; cleared only by a refresh carrying claims.
    challenge_nbf: int | None = None


@dataclass
class AccessToken:
    """Bookkeeping for one issued access token (the token itself is the dict key)."""

    grant_id: str
    issued_at: float
    expires_at: float
    challenge_nbf: int | None = None


@dataclass
class AuthCode:
    """An authorization code and what it was bound to at /authorize (RFC 7636 PKCE)."""

    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    expires_at: float
    used: bool = False


@dataclass(frozen=True)
class SentMail:
    """A mail that really went out: the side effect tests and reconcile look for."""

    id: str
    internet_message_id: str
    idempotency_key: str | None
    subject: str
    to: tuple[str, ...]
    at: str
    saved_to_sent_items: bool
    extended_properties: tuple[tuple[str, str], ...] = ()

    def public(self) -> dict[str, object]:
        """The ``GET /_lab/mails`` row."""
        return {
            "id": self.id,
            "idempotency_key": self.idempotency_key,
            "subject": self.subject,
            "to": list(self.to),
            "at": self.at,
        }


@dataclass(frozen=True)
class CallRecord:
    """One logged request; ``status`` is None when the connection was cut on purpose."""

    at: str
    method: str
    path: str
    status: int | None
    token_valid: bool | None
    grant_type: str | None
    claims: bool

    def public(self) -> dict[str, object]:
        """The ``GET /_lab/calls`` row."""
        return {
            "at": self.at,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "token_valid": self.token_valid,
            "grant_type": self.grant_type,
            "claims": self.claims,
        }


@dataclass
class Faults:
    """Counted faults still to fire on Graph calls; ``latency_left=None`` means until cleared."""

    unavailable: int = 0
    unavailable_retry_after: int | None = None
    rate_limit: int = 0
    rate_limit_retry_after: int = 1
    latency_ms: int = 0
    latency_left: int | None = 0
    commit_then_drop: int = 0
    commit_then_stall: int = 0
    stall_ms: int = 0

    def active(self) -> list[dict[str, object]]:
        """The ``GET /_lab/faults`` listing."""
        out: list[dict[str, object]] = []
        if self.unavailable:
            out.append(
                {
                    "fault": "unavailable",
                    "count": self.unavailable,
                    "retry_after": self.unavailable_retry_after,
                }
            )
        if self.rate_limit:
            out.append(
                {
                    "fault": "rate_limit",
                    "count": self.rate_limit,
                    "retry_after": self.rate_limit_retry_after,
                }
            )
        if self.latency_ms and self.latency_left != 0:
            out.append({"fault": "latency", "ms": self.latency_ms, "count": self.latency_left})
        if self.commit_then_drop:
            out.append({"fault": "commit_then_drop", "count": self.commit_then_drop})
        if self.commit_then_stall:
            out.append(
                {"fault": "commit_then_stall", "count": self.commit_then_stall, "ms": self.stall_ms}
            )
        return out


def iso_now() -> str:
    """UTC now as ``2024-03-08T10:22:05.123456Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ProviderState:
    """Everything one fake provider knows. Not thread-safe: one event loop owns it."""

    def __init__(self, config: ProviderConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.faults = Faults()
        self.grants: dict[str, Grant] = {}
        self.mails: list[SentMail] = []
        self.calls: list[CallRecord] = []
        self._by_refresh: dict[str, Grant] = {}
        self._access: dict[str, AccessToken] = {}
        self._codes: dict[str, AuthCode] = {}

    def __repr__(self) -> str:
        # Counts only: the dict keys are live tokens.
        return (
            f"<ProviderState tenant={self.config.tenant!r} grants={len(self.grants)} "
            f"access_tokens={len(self._access)} mails={len(self.mails)}>"
        )

    def reset(self) -> None:
        """Forget everything (``POST /_lab/reset``)."""
        self.faults = Faults()
        self.grants.clear()
        self.mails.clear()
        self.calls.clear()
        self._by_refresh.clear()
        self._access.clear()
        self._codes.clear()

    # -- grants and tokens -------------------------------------------------------------

    def new_grant(self, scope: str) -> tuple[Grant, str]:
        """Create a live grant (a fresh consent) and its first access token."""
        grant = Grant(
            id=secrets.token_hex(8),
            scope=scope,
            issued_at=self.clock(),
            refresh_token="lab_rt_" + secrets.token_urlsafe(32),
        )
        self.grants[grant.id] = grant
        self._by_refresh[grant.refresh_token] = grant
        return grant, self._mint_access(grant, challenge_nbf=None)

    def refresh(
        self, refresh_token: str, *, with_claims: bool
    ) -> tuple[Grant, str] | RefreshOutcome:
        """Redeem a refresh token; rotates it when configured.

        A pending claims challenge survives a plain refresh (the new token is challenged
        too: the real CAE trap) and is cleared only by a refresh that carries ``claims``.
        """
        grant = self._by_refresh.get(refresh_token)
        if grant is None:
            return RefreshOutcome.UNKNOWN
        if not grant.alive:
            return RefreshOutcome.DEAD
        if with_claims:
            grant.challenge_nbf = None
        if self.config.rotate_refresh_tokens:
            del self._by_refresh[refresh_token]
            grant.refresh_token = "lab_rt_" + secrets.token_urlsafe(32)
            self._by_refresh[grant.refresh_token] = grant
        return grant, self._mint_access(grant, challenge_nbf=grant.challenge_nbf)

    def _mint_access(self, grant: Grant, *, challenge_nbf: int | None) -> str:
        token = "lab_at_" + secrets.token_urlsafe(32)
        now = self.clock()
        self._access[token] = AccessToken(
            grant_id=grant.id,
            issued_at=now,
            expires_at=now + self.config.access_token_ttl,
            challenge_nbf=challenge_nbf,
        )
        return token

    def check_access(self, token: str | None) -> tuple[TokenCheck, AccessToken | None]:
        """Validate a bearer token the way Graph would, expiry before CAE."""
        if not token:
            return TokenCheck.MISSING, None
        record = self._access.get(token)
        if record is None:
            return TokenCheck.UNKNOWN, None
        if record.expires_at <= self.clock():
            return TokenCheck.EXPIRED, record
        if record.challenge_nbf is not None:
            return TokenCheck.CHALLENGED, record
        return TokenCheck.VALID, record

    def expire_access_tokens(self) -> int:
        """Fault ``expire_token``: every issued access token is now past its expiry."""
        now = self.clock()
        for record in self._access.values():
            record.expires_at = min(record.expires_at, now)
        return len(self._access)

    def kill_grants(self) -> int:
        """Fault ``kill_grant``: expire access tokens and kill every live grant."""
        self.expire_access_tokens()
        killed = 0
        for grant in self.grants.values():
            if grant.alive:
                grant.alive = False
                killed += 1
        return killed

    def challenge(self) -> int:
        """Fault ``claims_challenge``: tokens issued until now are revoked by CAE."""
        nbf = int(self.clock())
        for grant in self.grants.values():
            if grant.alive:
                grant.challenge_nbf = nbf
        for record in self._access.values():
            record.challenge_nbf = nbf
        return nbf

    def clear_faults(self) -> None:
        """``DELETE /_lab/faults``: counted faults and claims challenges; dead stays dead."""
        self.faults = Faults()
        for grant in self.grants.values():
            grant.challenge_nbf = None
        for record in self._access.values():
            record.challenge_nbf = None

    # -- authorization codes -----------------------------------------------------------

    def new_code(
        self, *, client_id: str, redirect_uri: str, scope: str, code_challenge: str
    ) -> str:
        """Issue a single-use authorization code bound to its PKCE challenge."""
        code = "lab_code_" + secrets.token_urlsafe(32)
        self._codes[code] = AuthCode(
            client_id=client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            code_challenge=code_challenge,
            expires_at=self.clock() + AUTH_CODE_TTL,
        )
        return code

    def find_code(self, code: str) -> AuthCode | None:
        """Look a code up without redeeming it (validation happens in the token route)."""
        return self._codes.get(code)

    # -- logs --------------------------------------------------------------------------

    def record_call(self, record: CallRecord) -> None:
        """Append to the call log (bounded so a long lab session cannot grow without end)."""
        self.calls.append(record)
        if len(self.calls) > 10_000:
            del self.calls[: len(self.calls) - 10_000]


@dataclass
class CallNote:
    """What a handler tells the call-log middleware about the request it served."""

    token_valid: bool | None = None
    grant_type: str | None = None
    claims: bool = False
    dropped: bool = False


PROVIDER_STATE = web.AppKey("PROVIDER_STATE", ProviderState)
CALL_NOTE = web.RequestKey("CALL_NOTE", CallNote)
