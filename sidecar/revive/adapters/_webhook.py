"""Receiving the sidecar's case webhooks: verify, parse, hand ``case.ready`` to the runtime.

The sidecar's webhook notifier POSTs each case event as JSON signed with
``Revive-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``. A runtime adapter
mounts :func:`case_webhook` on its own aiohttp app and resumes the run the event names. The
few lines of verification are repeated here on purpose: adapters depend on the worker side
only, never on the server's modules.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "SIGNATURE_HEADER",
    "CaseEvent",
    "OnCaseEvent",
    "ResumeGone",
    "case_webhook",
    "verify_signature",
]

log = logging.getLogger("revive.adapters")

SIGNATURE_HEADER = "Revive-Signature"

OnCaseEvent = Callable[["CaseEvent"], Awaitable[None]]
"""``async (event) -> None``: what a receiver does with a verified event."""

_MAX_BODY = 64 * 1024
_REMEMBERED = 1024


def verify_signature(
    secret: bytes, body: bytes, header: str, *, now: float, tolerance: float = 300.0
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret``, no older than ``tolerance`` seconds.

    Args:
        secret: the webhook secret shared with the sidecar.
        body: the raw request body, byte for byte.
        header: the ``Revive-Signature`` value.
        now: the receiver's unix time.
        tolerance: how far the signed timestamp may be from ``now`` (replays, clock skew).

    Returns:
        True for a genuine, recent delivery; False for anything else.
    """
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass(frozen=True, slots=True)
class CaseEvent:
    """One case event, as the sidecar's webhook sends it.

    Attributes:
        kind: ``case.opened`` (a human must reconnect) or ``case.ready`` (the run may resume).
        case_id: the recovery case.
        run_id: the parked run: the Temporal workflow id, the LangGraph thread id.
        connection_id, checkpoint_id, action_key: where the run met the dead grant.
        provider_code: the identity provider's code (e.g. ``AADSTS700082``), when known.
        workflow: the runtime's workflow name, when the run gave one.
        reconnect_url: where a human reconnects (``case.opened``).
        outcome: the failed action's settled outcome (``case.ready``).
        recovery_capability: the single-use capability to resume with (``case.ready``); it
            names no provider token, but is kept out of ``repr`` and logs all the same.
    """

    kind: str
    case_id: str
    run_id: str
    connection_id: str | None = None
    checkpoint_id: str | None = None
    action_key: str | None = None
    provider_code: str | None = None
    workflow: str | None = None
    reconnect_url: str | None = None
    outcome: str | None = None
    recovery_capability: str | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, body: Any) -> CaseEvent:
        """Parse a decoded webhook body.

        Args:
            body: the JSON document the sidecar sent.

        Returns:
            the event.

        Raises:
            ValueError: not an object, or ``type``, ``case_id`` or ``run_id`` missing.
        """
        if not isinstance(body, dict):
            raise ValueError("a case event is a JSON object")

        def text(name: str) -> str | None:
            value = body.get(name)
            return value if isinstance(value, str) and value else None

        kind, case_id, run_id = text("type"), text("case_id"), text("run_id")
        if kind is None or case_id is None or run_id is None:
            raise ValueError("a case event names its type, case_id and run_id")
        return cls(
            kind=kind, case_id=case_id, run_id=run_id,
            connection_id=text("connection_id"), checkpoint_id=text("checkpoint_id"),
            action_key=text("action_key"), provider_code=text("provider_code"),
            workflow=text("workflow"), reconnect_url=text("reconnect_url"),
            outcome=text("outcome"), recovery_capability=text("recovery_capability"),
        )


class ResumeGone(Exception):
    """The run an event names cannot be resumed any more (finished, unknown, not waiting).

    Raised by an ``on_ready`` callback; the receiver answers 410 so the sidecar stops
    retrying (the case stays actionable through the sidecar's API).
    """


def case_webhook(
    secret: bytes,
    on_ready: OnCaseEvent,
    *,
    on_opened: OnCaseEvent | None = None,
    tolerance: float = 300.0,
    clock: Callable[[], float] = time.time,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler for the sidecar's webhook that resumes runs when cases are ready.

    Mount it with ``app.router.add_post("/revive/cases", case_webhook(secret, on_ready))``.

    Args:
        secret: the webhook secret (the sidecar's ``notifier.secret_file``).
        on_ready: called once per recovery capability with each verified ``case.ready`` event
            that carries one; it must hand the capability to the run and return promptly (the
            sidecar waits for the answer, and retries on a 5xx).
        on_opened: called with each verified ``case.opened`` event (e.g. to page a human).
        tolerance: the oldest signature accepted, in seconds.
        clock: unix time, replaceable in tests.

    Returns:
        the handler. It answers 401 to an unsigned or stale delivery, 400 to a malformed one,
        410 when ``on_ready`` raises :class:`ResumeGone`, 503 when it raises anything else
        (the sidecar retries with backoff), and 204 otherwise.
    """
    delivered: OrderedDict[str, None] = OrderedDict()  # digests of handed-over capabilities

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if len(body) > _MAX_BODY:
            return web.Response(status=413)
        header = request.headers.get(SIGNATURE_HEADER, "")
        if not verify_signature(secret, body, header, now=clock(), tolerance=tolerance):
            return web.Response(status=401)
        try:
            event = CaseEvent.from_json(json.loads(body))
        except ValueError:
            return web.Response(status=400)
        if event.kind == "case.opened" and on_opened is not None:
            return await _call(on_opened, event)
        if event.kind != "case.ready" or event.recovery_capability is None:
            return web.Response(status=204)
        digest = hashlib.sha256(event.recovery_capability.encode()).hexdigest()
        if digest in delivered:  # a retried delivery: the run already has this capability
            return web.Response(status=204)
        answer = await _call(on_ready, event)
        if answer.status == 204:
            delivered[digest] = None
            while len(delivered) > _REMEMBERED:
                delivered.popitem(last=False)
        return answer

    return handle


async def _call(callback: OnCaseEvent, event: CaseEvent) -> web.Response:
    try:
        await callback(event)
    except ResumeGone as exc:
        log.warning("case %s: run %s cannot resume: %s", event.case_id, event.run_id, exc)
        return web.Response(status=410)
    except Exception as exc:  # the sidecar retries; the capability never reaches the log
        log.warning(
            "case %s: handing %s to run %s failed: %s",
            event.case_id, event.kind, event.run_id, type(exc).__name__,
        )
        return web.Response(status=503)
    return web.Response(status=204)
