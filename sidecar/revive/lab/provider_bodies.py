"""Wire shapes of the fake Microsoft provider: Entra v2 errors, Graph errors, headers.

Every body here copies the field names and field order of real captures in
``/work/shared/corpus/providers.jsonl`` (the ``microsoft`` lines), with fresh ids and
timestamps, so that classification rules written against the corpus work unchanged
against the lab.

* Entra token-endpoint errors follow "Microsoft identity platform error codes"
  (https://learn.microsoft.com/entra/identity-platform/reference-error-codes): ``error``,
  ``error_description`` ("AADSTSnnnn: ...\\r\\nTrace ID: ...\\r\\nCorrelation ID: ...\\r\\n
  Timestamp: ..."), ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``,
  ``error_uri``.
* Graph errors follow "Microsoft Graph error responses and resource types"
  (https://learn.microsoft.com/graph/errors): ``{"error": {"code", "message",
  "innerError": {"date", "request-id", "client-request-id"}}}``.
* The CAE claims challenge follows "Claims challenges, claims requests and client
  capabilities" (https://learn.microsoft.com/entra/identity-platform/claims-challenge).
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiohttp import web

__all__ = [
    "GRAPH_AUTH_HEADER",
    "cae_auth_header",
    "dead_grant_inactive",
    "entra_error",
    "graph_error",
    "lab_user",
    "new_trace_id",
]

#: What Graph sends on every token 401 (corpus ``ms-graph-401-lifetime-validation-failed``):
#: note there is no RFC 6750 ``error=`` parameter.
GRAPH_AUTH_HEADER = (
    'Bearer realm="", '
    'authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
    'client_id="00000003-0000-0000-c000-000000000000"'
)

_CAE_DESCRIPTION = (
    "Continuous access evaluation resulted in claims challenge with result: "
    "InteractionRequired and code: TokenIssuedBeforeRevocationTimestamp"
)

# Entra answers its errors uncached, like its successes (RFC 6749 §5.1).
_NO_STORE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}


def new_trace_id() -> str:
    """A uuid shaped like Entra trace ids, which end in ``00`` in every capture."""
    return str(uuid.uuid4())[:-2] + "00"


def _entra_timestamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%d %H:%M:%SZ")


def entra_error(
    status: int,
    error: str,
    code: int,
    message: str,
    *,
    correlation_id: str | None = None,
    suberror: str | None = None,
) -> web.Response:
    """An Entra v2 token/authorize error, e.g. ``entra_error(400, "invalid_grant", 700082, ...)``.

    Args:
        status: HTTP status (400 for grant errors, 401 for ``invalid_client``).
        error: the RFC 6749 ``error`` value.
        code: the AADSTS number; ``message`` must not repeat the ``AADSTSnnnn:`` prefix.
        message: human text as Entra words it.
        correlation_id: echo of the client's ``client-request-id`` when it sent one.
        suberror: optional Entra ``suberror`` (``token_expired``, ``consent_required``...).
    """
    now = datetime.now(UTC)
    trace_id = new_trace_id()
    correlation = correlation_id or str(uuid.uuid4())
    stamp = _entra_timestamp(now)
    body: dict[str, Any] = {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation}\r\nTimestamp: {stamp}"
        ),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace_id,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
    if suberror is not None:
        body["suberror"] = suberror
    headers = {**_NO_STORE, "x-ms-request-id": trace_id}
    return web.json_response(body, status=status, headers=headers, dumps=_compact)


def dead_grant_inactive(*, correlation_id: str | None = None) -> web.Response:
    """AADSTS700082, verbatim wording of corpus ``ms-entra-aadsts700082-inactive-rt``."""
    issued = datetime.now(UTC) - timedelta(days=90, minutes=7)
    issued_text = issued.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"
    return entra_error(
        400,
        "invalid_grant",
        700082,
        f"The refresh token has expired due to inactivity. The token was issued on "
        f"{issued_text} and was inactive for 90.00:00:00.",
        correlation_id=correlation_id,
    )


def graph_error(
    status: int,
    code: str,
    message: str,
    *,
    client_request_id: str | None = None,
    headers: dict[str, str] | None = None,
    inner: Literal["full", "short", "none"] = "full",
) -> web.Response:
    """A Graph error envelope.

    ``inner`` picks the ``innerError`` of the captures: ``full`` (date, request-id,
    client-request-id: the 401s), ``short`` (request-id, date: the 503 and 400 captures) or
    ``none`` (Outlook's ``ApplicationThrottled``).
    """
    request_id = str(uuid.uuid4())
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    error: dict[str, Any] = {"code": code, "message": message}
    if inner == "full":
        error["innerError"] = {
            "date": date,
            "request-id": request_id,
            "client-request-id": client_request_id or request_id,
        }
    elif inner == "short":
        error["innerError"] = {"request-id": request_id, "date": date}
    all_headers = {"request-id": request_id, "client-request-id": client_request_id or request_id}
    all_headers.update(headers or {})
    return web.json_response({"error": error}, status=status, headers=all_headers, dumps=_compact)


def cae_auth_header(nbf: int) -> str:
    """The CAE ``WWW-Authenticate`` of corpus ``ms-graph-401-cae-claims-challenge-header``.

    ``claims`` is standard base64 of
    ``{"access_token":{"nbf":{"essential":true, "value":"<nbf>"}}}`` (spacing as in the
    capture); a client must send it back decoded as the ``claims``
    token-request parameter to get an access token that is not challenged again.
    """
    claims = f'{{"access_token":{{"nbf":{{"essential":true, "value":"{nbf}"}}}}}}'
    encoded = base64.b64encode(claims.encode()).decode()
    return (
        f'{GRAPH_AUTH_HEADER}, error="insufficient_claims", claims="{encoded}", '
        f'errorDescription="{_CAE_DESCRIPTION}"'
    )


def _compact(obj: Any) -> str:
    # Entra and Graph send compact JSON (no spaces), as the verbatim captures show.
    return json.dumps(obj, separators=(",", ":"))


def lab_user() -> dict[str, Any]:
    """The signed-in lab user, shaped like ``GET /v1.0/me`` (a fresh dict on every call)."""
    return {
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users/$entity",
        "businessPhones": ["+1 425 555 0109"],
        "displayName": "Adele Vance",
        "givenName": "Adele",
        "jobTitle": "Retail Manager",
        "mail": "AdeleV@revivelab.onmicrosoft.com",
        "mobilePhone": None,
        "officeLocation": "18/2111",
        "preferredLanguage": "en-US",
        "surname": "Vance",
        "userPrincipalName": "AdeleV@revivelab.onmicrosoft.com",
        "id": "87d349ed-44d7-43e1-9a83-5f2406dee5bd",
    }
