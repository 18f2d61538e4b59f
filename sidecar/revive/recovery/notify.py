"""Telling the outside world about a case: the ``Notifier`` seam (DESIGN §8, issue #4).

Two moments matter: a case **opened** (a human must reconnect: the event carries the
reconnect URL) and a case became **ready** (the runtime may resume: the event carries a
fresh single-use recovery capability). A notifier never sees a provider token; the
recovery capability it carries names none and expires within minutes.

Implementations: ``NullNotifier`` (nobody listens), ``WebhookNotifier`` (a signed POST
with retries). Runtime adapters (Temporal, LangGraph) implement the same Protocol.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp

from revive.store import CaseRow

log = logging.getLogger("revive.notify")

SIGNATURE_HEADER = "Revive-Signature"
"""``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` — the Stripe scheme, so a
receiver can reject replays older than a few minutes and forgeries alike."""


@dataclass(frozen=True, slots=True)
class CaseNotice:
    """What a notifier is told; everything in it may be logged except ``recovery_capability``."""

    kind: Literal["case.opened", "case.ready"]
    case_id: str
    run_id: str
    connection_id: str
    checkpoint_id: str
    action_key: str
    provider_code: str | None
    workflow: str | None = None
    reconnect_url: str | None = None
    recovery_capability: str | None = field(default=None, repr=False)
    outcome: str | None = None

    @classmethod
    def for_case(
        cls,
        kind: Literal["case.opened", "case.ready"],
        case: CaseRow,
        *,
        reconnect_url: str | None = None,
        capability: str | None = None,
        outcome: str | None = None,
    ) -> CaseNotice:
        """The notice about ``case``: its joins, and what the receiver may act on."""
        return cls(
            kind, case.case_id, case.run_id, case.connection_id, case.checkpoint_id,
            case.action_key, case.provider_code, case.workflow, reconnect_url, capability,
            outcome,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "case_id": self.case_id,
            "run_id": self.run_id,
            "connection_id": self.connection_id,
            "checkpoint_id": self.checkpoint_id,
            "action_key": self.action_key,
            "provider_code": self.provider_code,
            "workflow": self.workflow,
            "reconnect_url": self.reconnect_url,
            "recovery_capability": self.recovery_capability,
            "outcome": self.outcome,
        }


class Notifier(Protocol):
    """Delivers case events to whoever must act on them."""

    async def notify(self, event: CaseNotice) -> bool:
        """Deliver ``event``.

        Returns:
            True when the receiver acknowledged it; False when every attempt failed (the
            case stays actionable through the API either way).

        Raises:
            Nothing: delivery failures are logged, never raised into the recovery path.
        """
        ...


class NullNotifier:
    """Nobody listens; operators use the API and the lab."""

    async def notify(self, event: CaseNotice) -> bool:
        return False


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Revive-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, *, now: float, tolerance: float = 300) -> bool:
    """Receiver side of :func:`sign`: right secret, right body, not older than ``tolerance``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass
class WebhookNotifier:
    """POSTs each event as signed JSON; retries with exponential backoff and jitter."""

    url: str
    secret: bytes = field(repr=False)
    http: aiohttp.ClientSession
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout: float = 10.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.time

    async def notify(self, event: CaseNotice) -> bool:
        body = json.dumps(event.to_json(), separators=(",", ":")).encode()
        for attempt in range(1, self.attempts + 1):
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(self.secret, body, int(self.clock())),
                "Revive-Event": event.kind,
                "Revive-Delivery-Attempt": str(attempt),
            }
            try:
                async with self.http.post(
                    self.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                ) as resp:
                    if 200 <= resp.status < 300:
                        return True
                    why = f"status {resp.status}"
                    if 400 <= resp.status < 500 and resp.status not in (408, 409, 425, 429):
                        log.error("webhook refused %s for case %s: %s", event.kind, event.case_id, why)
                        return False  # the receiver says no; asking again changes nothing
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                why = type(exc).__name__
            if attempt < self.attempts:
                ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                await self.sleep(random.uniform(ceiling / 2, ceiling))
        log.error(
            "webhook gave up on %s for case %s after %d attempts: %s",
            event.kind, event.case_id, self.attempts, why,
        )
        return False
