"""Reconnect an ``oauth2`` connection: the authorization-code grant with PKCE (DESIGN §4).

``GET /v1/connections/{id}/connect`` calls :meth:`ConnectFlow.begin` and redirects the human to
the provider; the provider's redirect to the callback calls :meth:`ConnectFlow.complete`, whose
:class:`ConnectResult` the caller hands to ``OAuth2Source.install_grant`` (generation + 1).

Why each piece is there:

* ``state`` (RFC 6749 §4.1.1, §10.12) binds the callback to an authorization this sidecar
  started, for this connection: without it anyone could make the sidecar install *their* grant
  (login CSRF). It is random, single use and short lived.
* PKCE (RFC 7636, ``S256``) binds the code to a verifier that never leaves the sidecar, so a
  code intercepted on its way back (logs, referrers, a hostile app on the redirect URI) is
  useless to whoever intercepted it. RFC 9700 §2.1.1 recommends it for confidential clients too.
* The code is exchanged with the exact ``redirect_uri`` of the request (RFC 6749 §4.1.3), with
  a timeout, without following redirects (a 307 would re-send the code and client secret
  elsewhere) and with a bounded read.

Pending authorizations live in memory, per ``ConnectFlow`` (one per sidecar): after a restart
the human just clicks "reconnect" again. Nothing here writes the grant.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from revive.config import OAuth2SourceConfig
from revive.errors import BadRequest, CredentialMisconfigured, CredentialUnavailable
from revive.redact import redact
from revive.sources.token_endpoint import number, parse_answer, post_form

__all__ = ["ConnectFlow", "ConnectResult", "ConsentDenied", "pkce_challenge"]

MAX_PENDING = 256
PENDING_TTL_SECONDS = 600.0
_MAX_PROVIDER_TEXT = 300  # error_description is attacker-controllable: keep it short
_TRANSIENT_ERRORS = {"server_error", "temporarily_unavailable"}  # RFC 6749 §4.1.2.1


class ConsentDenied(BadRequest):
    """``error=access_denied`` (RFC 6749 §4.1.2.1): the human or tenant policy declined.

    A 400, not a credential error: neither the sidecar nor the old grant is at fault.
    """

    title = "Consent was denied at the provider"


@dataclass(frozen=True, slots=True)
class ConnectResult:
    """The grant obtained by a completed connect flow, for ``OAuth2Source.install_grant``.

    ``refresh_token`` and ``access_token`` (``None`` if the exchange gave none) are excluded
    from ``repr``; ``expires_in`` (seconds) and ``scope`` (space-separated) are ``None`` if the
    provider did not say.
    """

    connection_id: str
    refresh_token: str = field(repr=False)
    access_token: str | None = field(repr=False)
    expires_in: float | None
    scope: str | None


@dataclass(frozen=True, slots=True)
class _Pending:
    connection_id: str
    config: OAuth2SourceConfig  # as of begin: the code is redeemed where it was requested
    redirect_uri: str
    verifier: str = field(repr=False)
    expires_at: float


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 §4.2 ``S256``: ``BASE64URL(SHA256(ASCII(verifier)))`` without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class ConnectFlow:
    """Pending authorizations of one sidecar, and the two halves of the code flow.

    Args:
        clock: monotonic seconds, replaceable in tests (expiry only; never wall time).
        ttl_seconds: how long a started authorization may take to come back.
        max_pending: bound on started-but-unfinished authorizations; the oldest is dropped first
            so that abandoned tabs cannot grow memory without limit.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        ttl_seconds: float = PENDING_TTL_SECONDS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._clock = clock
        self._ttl = ttl_seconds
        self._max = max_pending
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        # Digests of spent states, only so a replay gets a precise message; same bound.
        self._spent: OrderedDict[str, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"ConnectFlow(pending={len(self._pending)})"

    def begin(self, connection_id: str, config: OAuth2SourceConfig, redirect_uri: str) -> str:
        """Start an authorization for ``connection_id``; return the URL to send the human to.

        The request follows RFC 6749 §4.1.1 plus RFC 7636 §4.3. ``prompt=consent`` asks the
        provider to show consent again, which is what gets a fresh refresh token from providers
        that otherwise skip it; servers that do not know it must ignore it (RFC 6749 §3.1).

        Raises:
            CredentialMisconfigured: the connection has no ``authorize_url``.
        """
        if not config.authorize_url:
            raise CredentialMisconfigured(f"connection {connection_id!r} has no authorize_url")
        now = self._clock()
        self._prune(now)
        while len(self._pending) >= self._max:
            self._pending.popitem(last=False)
        state = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 chars of [A-Za-z0-9_-]: RFC 7636 §4.1
        expires_at = now + self._ttl
        self._pending[state] = _Pending(connection_id, config, redirect_uri, verifier, expires_at)
        query = {
            "response_type": "code",
            "client_id": config.client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": pkce_challenge(verifier),
            "code_challenge_method": "S256",
            "prompt": "consent",
        }
        if config.scopes:
            query["scope"] = " ".join(config.scopes)
        return str(URL(config.authorize_url).update_query(query))

    async def complete(
        self,
        connection_id: str,
        params: Mapping[str, str],
        http: aiohttp.ClientSession,
        client_secret: str | None,
    ) -> ConnectResult:
        """Finish the authorization the callback ``params`` answer, and redeem its code.

        ``state`` is checked before anything else (RFC 6749 §10.12) and spent whatever follows.

        Raises:
            BadRequest: ``state`` missing, unknown, expired, used or another connection's; no code.
            ConsentDenied: the provider answered ``error=access_denied``.
            CredentialUnavailable: the provider or its token endpoint failed transiently (5xx).
            CredentialMisconfigured: the request or code was refused (4xx), or no refresh token.
        """
        pending = self._take(connection_id, params.get("state"))
        config = pending.config
        if error := params.get("error"):
            raise _authorization_error(connection_id, error, params.get("error_description"))
        code = params.get("code")
        if not code:
            raise BadRequest(f"the callback for {connection_id!r} carries neither code nor error")
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.verifier,
            "client_id": config.client_id,
        }
        if client_secret:
            form["client_secret"] = client_secret
        known = [code, pending.verifier, client_secret or ""]
        host = URL(config.token_url).host or "token endpoint"
        status, headers, body = await post_form(http, config, form, host)
        payload = parse_answer(headers.get("Content-Type", ""), body)
        if not 200 <= status < 300:
            raise _exchange_error(status, headers, payload, host, known)
        refresh_token = payload.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            why = "no refresh_token; do the scopes ask for offline access?"
            raise CredentialMisconfigured(f"token endpoint {host} issued {why}")
        access_token, scope = payload.get("access_token"), payload.get("scope")
        return ConnectResult(
            connection_id,
            refresh_token,
            access_token if isinstance(access_token, str) and access_token else None,
            number(payload.get("expires_in")),
            scope if isinstance(scope, str) and scope else None,
        )

    def _take(self, connection_id: str, state: str | None) -> _Pending:
        """Spend ``state`` and return its authorization, or say precisely why it is refused."""
        if not state:
            raise BadRequest(f"the callback for {connection_id!r} carries no state")
        now = self._clock()
        pending = self._pending.pop(state, None)
        digest = hashlib.sha256(state.encode()).hexdigest()
        replayed = digest in self._spent
        if pending is not None:
            self._spent[digest] = None
            while len(self._spent) > self._max:
                self._spent.popitem(last=False)
        self._prune(now)
        # The state value itself is never echoed: it would let a log reader replay it.
        if pending is None:
            why = "was already used" if replayed else "is unknown (or expired long ago)"
            raise BadRequest(f"connect state {why}; start the connect flow for it again")
        if pending.connection_id != connection_id:
            raise BadRequest(f"connect state belongs to another connection than {connection_id!r}")
        if pending.expires_at <= now:
            why = f"expired after {self._ttl:.0f}s; start the connect flow again"
            raise BadRequest(f"connect state for {connection_id!r} {why}")
        return pending

    def _prune(self, now: float) -> None:
        for state in [s for s, p in self._pending.items() if p.expires_at <= now]:
            del self._pending[state]


def _text(value: object, known: list[str], limit: int = _MAX_PROVIDER_TEXT) -> str | None:
    """Provider-supplied text, redacted and cut short (it is attacker-controllable)."""
    return redact(value, known)[:limit] if isinstance(value, str) and value else None


def _exchange_error(
    status: int, headers: Mapping[str, str], payload: Mapping[str, Any], host: str, known: list[str]
) -> CredentialUnavailable | CredentialMisconfigured:
    """RFC 6749 §5.2 error answer → transient (5xx, 429) or misconfigured (other 4xx)."""
    code = _text(payload.get("error"), known, 64)
    message = _text(payload.get("error_description"), known)
    what = f"token endpoint {host} answered {status} ({code or 'no code'}) to the code exchange"
    if status >= 500 or status == 429:
        return CredentialUnavailable(
            f"{what}: try connecting again later",
            provider_code=code,
            provider_message=message,
            retry_after=number(headers.get("Retry-After")),
        )
    hint = "start the connect flow again" if code == "invalid_grant" else "check the client config"
    return CredentialMisconfigured(f"{what}: {hint}", provider_code=code, provider_message=message)


def _authorization_error(
    connection_id: str, error: str, description: str | None
) -> BadRequest | CredentialUnavailable | CredentialMisconfigured:
    """RFC 6749 §4.1.2.1 error redirect → a typed error; the provider's text is redacted."""
    code, message = redact(error)[:64], _text(description, [])
    what = f"the provider refused to authorize {connection_id!r} ({code})"
    if error == "access_denied":
        return ConsentDenied(
            f"consent for {connection_id!r} was denied at the provider; nothing changed",
            provider_code=code,
            provider_message=message,
        )
    if error in _TRANSIENT_ERRORS:
        return CredentialUnavailable(f"{what}: retry", provider_code=code, provider_message=message)
    return CredentialMisconfigured(f"{what}: check the client config", provider_code=code,
                                   provider_message=message)
