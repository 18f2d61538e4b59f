"""The Graph subset of the fake provider: ``/v1.0/me``, events, ``sendMail`` and Sent Items.

``sendMail`` answers 202 with no body and no message id, as the real one does
(https://learn.microsoft.com/graph/api/user-sendmail): the only way to learn afterwards
whether a mail went out is to look for a marker in Sent Items, with the two ``$filter``
forms the reconcile policy uses (``internetMessageId eq '...'`` and an extended-property
``Any`` lambda, see https://learn.microsoft.com/graph/api/singlevaluelegacyextendedproperty-get).

Every route first passes ``_gate``: injected latency, then Graph's token checks
(https://learn.microsoft.com/graph/errors; the CAE challenge of
https://learn.microsoft.com/entra/identity-platform/claims-challenge), then the counted
``unavailable`` / ``rate_limit`` faults (https://learn.microsoft.com/graph/throttling).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from .provider_bodies import GRAPH_AUTH_HEADER, cae_auth_header, graph_error, lab_user
from .provider_state import CALL_NOTE, PROVIDER_STATE, SentMail, TokenCheck, iso_now

__all__ = ["idempotency_key_of", "routes"]

routes = web.RouteTableDef()

IDEMPOTENCY_NAME = "x-revive-idempotency-key"

_TOKEN_MESSAGES = {
    TokenCheck.MISSING: "Access token is empty.",
    TokenCheck.UNKNOWN: "CompactToken parsing failed with error code: 80049217",
    TokenCheck.EXPIRED: "Lifetime validation failed, the token is expired.",
    TokenCheck.CHALLENGED: (
        "Continuous access evaluation resulted in challenge with result: InteractionRequired "
        "and code: TokenIssuedBeforeRevocationTimestamp"
    ),
}

# OData string literal: single quotes, a quote inside is doubled.
_LIT = r"'((?:[^']|'')*)'"
_FILTER_EXT = re.compile(
    r"\s*singleValueExtendedProperties/any\(\s*(\w+)\s*:\s*\1/id\s+eq\s+"
    + _LIT
    + r"\s+and\s+\1/value\s+eq\s+"
    + _LIT
    + r"\s*\)\s*",
    re.IGNORECASE,
)
_FILTER_IMID = re.compile(r"\s*internetMessageId\s+eq\s+" + _LIT + r"\s*", re.IGNORECASE)


async def _gate(request: web.Request) -> web.Response | None:
    """Latency, token validation and counted faults; None lets the route run."""
    state = request.app[PROVIDER_STATE]
    faults = state.faults
    if faults.latency_ms and faults.latency_left != 0:
        if faults.latency_left is not None:
            faults.latency_left -= 1
        await asyncio.sleep(faults.latency_ms / 1000)

    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    check, record = state.check_access(token)
    request[CALL_NOTE].token_valid = check is TokenCheck.VALID
    client_request_id = request.headers.get("client-request-id")
    if check is not TokenCheck.VALID:
        if check is TokenCheck.CHALLENGED and record is not None and record.challenge_nbf:
            auth = cae_auth_header(record.challenge_nbf)
        else:
            auth = GRAPH_AUTH_HEADER
        return graph_error(
            401,
            "InvalidAuthenticationToken",
            _TOKEN_MESSAGES[check],
            client_request_id=client_request_id,
            headers={"WWW-Authenticate": auth},
        )

    if faults.unavailable:
        faults.unavailable -= 1
        headers = {}
        if faults.unavailable_retry_after is not None:
            headers["Retry-After"] = str(faults.unavailable_retry_after)
        return graph_error(
            503, "serviceNotAvailable", "Service unavailable", headers=headers, inner="short"
        )
    if faults.rate_limit:
        faults.rate_limit -= 1
        return graph_error(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
            headers={"Retry-After": str(faults.rate_limit_retry_after)},
            inner="none",
        )
    return None


def _bad_request(message: str, code: str = "BadRequest") -> web.Response:
    return graph_error(400, code, message, inner="short")


@routes.get("/v1.0/me")
async def me(request: web.Request) -> web.Response:
    """The signed-in user; the sidecar's ``probe`` for a new grant."""
    if (refusal := await _gate(request)) is not None:
        return refusal
    return web.json_response(lab_user())


@routes.get("/v1.0/me/events")
async def events(request: web.Request) -> web.Response:
    """Three calendar events around now: enough for the demo run to read something."""
    if (refusal := await _gate(request)) is not None:
        return refusal
    day = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    user = lab_user()
    items: list[dict[str, Any]] = []
    for i, subject in enumerate(("Quarterly review", "1:1 with Megan", "Incident retro")):
        start = day + timedelta(days=i, hours=1)
        items.append(
            {
                "id": f"AAMkAGlabevent{i}",
                "subject": subject,
                "start": {
                    "dateTime": start.strftime("%Y-%m-%dT%H:%M:%S.0000000"),
                    "timeZone": "UTC",
                },
                "end": {
                    "dateTime": (start + timedelta(minutes=30)).strftime(
                        "%Y-%m-%dT%H:%M:%S.0000000"
                    ),
                    "timeZone": "UTC",
                },
                "organizer": {
                    "emailAddress": {"name": user["displayName"], "address": user["mail"]}
                },
            }
        )
    return web.json_response(
        {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users('me')/events",
            "value": items,
        }
    )


def idempotency_key_of(message: dict[str, Any]) -> str | None:
    """The revive marker of a Graph message: extended property first, then header.

    An extended property id looks like ``String {guid} Name x-revive-idempotency-key``;
    MAPI names compare case-insensitively here so a policy's casing need not match ours.
    """
    for prop in message.get("singleValueExtendedProperties") or []:
        if isinstance(prop, dict) and str(prop.get("id", "")).lower().endswith(
            "name " + IDEMPOTENCY_NAME
        ):
            return str(prop.get("value"))
    for header in message.get("internetMessageHeaders") or []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == IDEMPOTENCY_NAME:
            return str(header.get("value"))
    return None


def _recipients(message: dict[str, Any]) -> list[str] | web.Response:
    addresses: list[str] = []
    for field in ("toRecipients", "ccRecipients", "bccRecipients"):
        for entry in message.get(field) or []:
            email = entry.get("emailAddress") if isinstance(entry, dict) else None
            address = email.get("address") if isinstance(email, dict) else None
            if not isinstance(address, str) or "@" not in address:
                return _bad_request(
                    f"At least one recipient isn't valid., Recipient \"{address}\" isn't "
                    "resolved. All recipients must be resolved before a message can be submitted.",
                    "ErrorInvalidRecipients",
                )
            addresses.append(address)
    if not addresses:
        return _bad_request(
            "At least one recipient isn't valid., A message can't be sent because it contains "
            "no recipients.",
            "ErrorInvalidRecipients",
        )
    return addresses


@routes.post("/v1.0/me/sendMail")
async def send_mail(request: web.Request) -> web.Response:
    """Send (record) a mail; 202 with an empty body, or a dropped connection on purpose."""
    if (refusal := await _gate(request)) is not None:
        return refusal
    try:
        payload = json.loads(await request.read())
    except ValueError:
        payload = None
    message = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(message, dict):
        return _bad_request(
            "Unable to read JSON request payload. Please ensure Content-Type header is set and "
            "payload is of valid JSON format."
        )
    for header in message.get("internetMessageHeaders") or []:
        name = str(header.get("name", "")) if isinstance(header, dict) else ""
        if not name.lower().startswith("x-"):
            return _bad_request(
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
                "InvalidInternetMessageHeader",
            )
    to = _recipients(message)
    if isinstance(to, web.Response):
        return to
    props = tuple(
        (str(p.get("id", "")), str(p.get("value", "")))
        for p in message.get("singleValueExtendedProperties") or []
        if isinstance(p, dict)
    )
    state = request.app[PROVIDER_STATE]
    state.mails.append(
        SentMail(
            id="AAMkAGlab" + secrets.token_urlsafe(24),
            # A client-supplied internetMessageId is ignored: Graph honouring it is unverified.
            internet_message_id=f"<LAB{uuid.uuid4().hex.upper()}@revivelab.prod.outlook.com>",
            idempotency_key=idempotency_key_of(message),
            subject=str(message.get("subject") or ""),
            to=tuple(to),
            at=iso_now(),
            saved_to_sent_items=payload.get("saveToSentItems", True) is not False,
            extended_properties=props,
        )
    )
    if state.faults.commit_then_drop:
        state.faults.commit_then_drop -= 1
        request[CALL_NOTE].dropped = True
        _drop(request)
        # Nothing reaches the client: the transport is gone.
        return web.Response(status=202)
    if state.faults.commit_then_stall:
        # The mail is out; the answer is held back (a sidecar killed now never records it).
        state.faults.commit_then_stall -= 1
        await asyncio.sleep(state.faults.stall_ms / 1000)
    request_id = str(uuid.uuid4())
    return web.Response(
        status=202,
        headers={
            "request-id": request_id,
            "client-request-id": request.headers.get("client-request-id", request_id),
        },
    )


def _drop(request: web.Request) -> None:
    """Cut the TCP connection after the side effect and before any byte of an answer."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _match_filter(expr: str | None) -> Callable[[SentMail], bool] | None:
    """Compile a supported ``$filter`` into a predicate; None on syntax we do not speak."""
    if expr is None:
        return lambda _mail: True
    if m := _FILTER_EXT.fullmatch(expr):
        prop_id, value = m.group(2).replace("''", "'"), m.group(3).replace("''", "'")
        return lambda mail: any(
            pid.lower() == prop_id.lower() and pval == value
            for pid, pval in mail.extended_properties
        )
    if m := _FILTER_IMID.fullmatch(expr):
        wanted = m.group(1).replace("''", "'")
        return lambda mail: mail.internet_message_id == wanted
    return None


@routes.get("/v1.0/me/mailFolders/{folder}/messages")
async def folder_messages(request: web.Request) -> web.Response:
    """Sent Items lookup, newest first, with the two reconcile ``$filter`` forms."""
    if (refusal := await _gate(request)) is not None:
        return refusal
    if request.match_info["folder"].lower() != "sentitems":
        return graph_error(
            404,
            "ErrorItemNotFound",
            "The specified object was not found in the store.",
            inner="short",
        )
    predicate = _match_filter(request.query.get("$filter"))
    if predicate is None:
        return _bad_request("Invalid filter clause")
    state = request.app[PROVIDER_STATE]
    found = [m for m in reversed(state.mails) if m.saved_to_sent_items and predicate(m)]
    value = [
        {
            "id": m.id,
            "sentDateTime": m.at[:19] + "Z",
            "subject": m.subject,
            "internetMessageId": m.internet_message_id,
            "toRecipients": [{"emailAddress": {"address": a}} for a in m.to],
            "singleValueExtendedProperties": [
                {"id": pid, "value": pval} for pid, pval in m.extended_properties
            ],
        }
        for m in found
    ]
    return web.json_response(
        {
            "@odata.context": (
                "https://graph.microsoft.com/v1.0/$metadata#users('me')/mailFolders('SentItems')/messages"
            ),
            "value": value,
        }
    )
