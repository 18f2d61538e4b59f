"""Grants at risk, and Nango's webhooks that report reconnects and failures (issue #7).

A grant is *at risk* when it still works but is expected to die: an identity layer reported a
failed refresh (Nango's ``auth`` webhook with ``success: false``), or a source sees it coming
(``ReportsGrantRisk``: an idle refresh token about to be dropped). Marks reported by webhook
are kept in the store, not in memory: the webhook may reach another replica than the one
leasing the grant. Nothing here opens a case: only a run that meets a dead grant does.

``POST /v1/webhooks/nango`` (:func:`nango_webhook`) decides, in order:

1. the ``X-Nango-Hmac-Sha256`` signature must verify under the signing key of some configured
   ``nango`` connection, else 401 ``webhook-signature-invalid`` and nothing changes;
2. a body that is not a JSON object, or an ``auth`` webhook without its fields, is a 400;
3. any other ``type`` (``sync``, ``forward``...) or an unknown ``operation`` is acknowledged,
   unhandled: Nango adds types without notice and retries every non-2xx;
4. an ``auth`` webhook for a Nango connection no configured source matches (under the key that
   signed it) is acknowledged unhandled too: answering an error would have Nango retry a
   webhook this sidecar will never want;
5. ``success: true`` (a creation, an override: a re-authorization; or a refresh that recovered):
   the source forgets its cached token and dead verdict; if cases wait for a reconnect
   (``open``, ``awaiting_reconnect``) or the connection is marked dead, the same path as
   ``POST /v1/connections/{id}/reconnected`` runs, which probes the new grant, records a new
   generation and advances every case; the at-risk mark is cleared. A repeated delivery (Nango
   retries a webhook whose answer it missed) finds nothing waiting and bumps nothing;
6. ``success: false``: the connection is marked at risk (``identity-layer-auth-failed``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeGuard, get_args

from revive.errors import BadRequest, CredentialError, WebhookSignatureInvalid
from revive.recovery.machine import CaseState
from revive.redact import redact
from revive.sources.base import ReportsGrantRisk
from revive.sources.nango import (
    AuthOperation,
    NangoAuthEvent,
    NangoSource,
    parse_auth_webhook,
    verify_nango_webhook,
)
from revive.store import CaseRow

if TYPE_CHECKING:
    from revive.recovery.service import RecoveryService

__all__ = [
    "IDENTITY_LAYER_AUTH_FAILED",
    "NANGO_WEBHOOK_ACTOR",
    "AtRisk",
    "WebhookOutcome",
    "connections_at_risk",
    "nango_webhook",
]

log = logging.getLogger("revive.recovery")

IDENTITY_LAYER_AUTH_FAILED = "identity-layer-auth-failed"
"""The at-risk reason for a failed refresh or re-authorization the identity layer reported."""

NANGO_WEBHOOK_ACTOR = "nango-webhook"
"""The actor recorded in the incident record for moves Nango's webhook caused."""

_OPERATIONS = frozenset(get_args(AuthOperation))
_WAITING = frozenset({CaseState.OPEN, CaseState.AWAITING_RECONNECT})
_DETAIL_CHARS = 300

WebhookAction = Literal["ignored", "reconnected", "cleared", "at_risk"]


@dataclass(frozen=True, slots=True)
class AtRisk:
    """One connection at risk, from the store's marks or from a source's own report.

    Attributes:
        connection_id, reason, detail, expires_at: as in ``revive.sources.GrantRisk``.
        since: when the store's mark was first made (``None`` for a source's live report).
        origin: ``store`` (a durable mark, e.g. from a webhook) or ``source`` (computed now).
    """

    connection_id: str
    reason: str
    detail: str
    expires_at: float | None
    since: float | None
    origin: Literal["store", "source"]


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """What one webhook did, answered to Nango (which only looks at the status).

    Attributes:
        handled: whether the webhook changed anything here.
        webhook_type: Nango's ``type`` (``auth``, ``sync``...), bounded; ``None`` if absent.
        action: ``ignored``, ``reconnected`` (cases advanced / new generation), ``cleared``
            (a success with nothing to recover: only the at-risk mark went), ``at_risk``.
        connections: the Revive connections it applied to.
        advanced: the cases it advanced, in their new state.
        note: a short sentence for whoever reads Nango's webhook log.
    """

    handled: bool
    webhook_type: str | None
    action: WebhookAction
    connections: tuple[str, ...] = ()
    advanced: tuple[CaseRow, ...] = ()
    note: str = ""


async def nango_webhook(
    service: RecoveryService, body: bytes, headers: Mapping[str, str]
) -> WebhookOutcome:
    """Verify and act on one webhook from Nango (the module docstring gives the rules).

    Raises:
        WebhookSignatureInvalid: no configured signing key verifies the signature.
        BadRequest: a signed body that is not a JSON object, or an unreadable auth payload.
        RecoveryRequired, UpstreamUnavailable: the reported new grant failed its probe.
    """
    sources = [
        (cid, b.source) for cid, b in service.bindings.items() if isinstance(b.source, NangoSource)
    ]
    keys: dict[str, bytes] = {}
    for cid, source in sources:
        try:
            keys[cid] = await source.webhook_signing_key()
        except CredentialError as exc:  # its message names the file, never the key
            log.warning("nango webhook: no signing key for %s: %s", cid, exc)
    signed_for = {cid for cid, key in keys.items() if verify_nango_webhook(key, body, headers)}
    if not signed_for:
        raise WebhookSignatureInvalid(
            "X-Nango-Hmac-Sha256 is missing or matches no configured nango signing key"
        )
    kind, event = _read(body)
    if event is None:
        return WebhookOutcome(False, kind, "ignored", note=f"{kind or 'untyped'} webhook ignored")
    targets = [(cid, s) for cid, s in sources if cid in signed_for and s.matches(event)]
    if not targets:
        return WebhookOutcome(
            False, kind, "ignored", note="no configured connection is this nango connection"
        )
    ids = tuple(cid for cid, _ in targets)
    if not event.success:
        detail = _detail(event, [k.decode("utf-8", "replace") for k in keys.values()])
        for cid in ids:
            await service.store.mark_at_risk(cid, IDENTITY_LAYER_AUTH_FAILED, detail)
        log.warning("nango reports a failed %s for %s: at risk", event.operation, ", ".join(ids))
        return WebhookOutcome(True, kind, "at_risk", ids, note=detail)
    advanced: list[CaseRow] = []
    reconnected = False
    for cid, source in targets:
        moved = await _grant_works(service, cid, source, event)
        if moved is not None:
            reconnected, advanced = True, advanced + moved
    action: WebhookAction = "reconnected" if reconnected else "cleared"
    return WebhookOutcome(
        True, kind, action, ids, tuple(advanced), note=f"{len(advanced)} case(s) advanced"
    )


async def _grant_works(
    service: RecoveryService, cid: str, source: NangoSource, event: NangoAuthEvent
) -> list[CaseRow] | None:
    """The cases advanced, or ``None`` when there was nothing to reconnect."""
    conn = await service.store.ensure_connection(cid)
    cases = await service.store.list_cases(connection_id=cid, open_only=True)
    waiting = [c for c in cases if c.state in _WAITING]
    advanced: list[CaseRow] | None = None
    if waiting or conn.state == "dead":
        # The lease the probe takes must come from Nango, not from the dead verdict in memory.
        source.grant_replaced(conn.generation + 1)
        evidence = {
            "nango_operation": event.operation,
            "provider_config_key": event.provider_config_key,
        }
        advanced = await service.reconnected(cid, NANGO_WEBHOOK_ACTOR, evidence)
    else:
        source.grant_replaced(conn.generation)  # nothing to recover: only drop the cached token
    if await service.store.clear_at_risk(cid):
        log.info("nango reports a successful %s for %s: no longer at risk", event.operation, cid)
    return advanced


def _read(body: bytes) -> tuple[str | None, NangoAuthEvent | None]:
    """``(type, auth event)``; the event is ``None`` for what is acknowledged and ignored."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the webhook body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the webhook body is not a JSON object")
    kind = data.get("type")
    kind = kind[:64] if isinstance(kind, str) else None
    if kind != "auth":
        return kind, None
    event = parse_auth_webhook(body)
    if event is not None:
        return kind, event
    operation = data.get("operation")
    if isinstance(operation, str) and operation not in _OPERATIONS:
        return kind, None  # an operation added after this code: acknowledge, do not fail
    raise BadRequest(
        "the auth webhook needs connectionId, providerConfigKey, operation and success"
    )


def _detail(event: NangoAuthEvent, secrets: list[str]) -> str:
    why = event.error_type or "no error type"
    text = f"nango reported a failed {event.operation} ({why})"
    if event.error_description:
        text += ": " + event.error_description
    return redact(text, secrets)[:_DETAIL_CHARS]


def _reports_risk(source: object) -> TypeGuard[ReportsGrantRisk]:
    return callable(getattr(source, "grant_risk", None))


async def connections_at_risk(service: RecoveryService, now: float | None = None) -> list[AtRisk]:
    """The store's marks and every source's own report, one entry per (connection, reason).

    A source's report is computed at call time (no provider call); where it repeats a stored
    mark's reason, the stored mark wins because it knows since when.
    """
    found: dict[tuple[str, str], AtRisk] = {}
    for mark in await service.store.list_at_risk():
        found[(mark.connection_id, mark.reason)] = AtRisk(
            mark.connection_id, mark.reason, mark.detail, mark.expires_at, mark.marked_at, "store"
        )
    for binding in service.bindings.values():
        if not _reports_risk(binding.source):
            continue
        risk = binding.source.grant_risk(now)
        if risk is not None:
            found.setdefault(
                (risk.connection_id, risk.reason),
                AtRisk(risk.connection_id, risk.reason, risk.detail, risk.expires_at, None,
                       "source"),
            )
    return [found[key] for key in sorted(found)]
