"""Every error leaves the sidecar as ``application/problem+json`` (RFC 9457), from here.

The hierarchy in ``revive.errors`` decides type and status; this module only renders,
and turns anything unexpected into a 500 problem whose text is redacted and logged.
"""

from __future__ import annotations

import functools
import json
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from revive.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    CredentialError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    problem_for_credential_error,
)
from revive.redact import redact

log = logging.getLogger("revive.api")


def problem_response(exc: ProblemError, instance: str | None = None) -> web.Response:
    body = exc.to_problem(instance)
    headers = {}
    retry_after = exc.extra.get("retry_after")
    if isinstance(retry_after, (int, float)) and retry_after > 0:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.Response(
        status=exc.status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def _from_http(exc: web.HTTPException) -> ProblemError:
    match exc.status:
        case 404:
            return NotFound("no such route")
        case 405:
            return MethodNotAllowed(f"{exc.reason}")
        case 413:
            return PayloadTooLarge("request body too large")
        case _:
            err = BadRequest(exc.reason)
            return err


def with_problems(handler: Handler) -> Handler:
    """Wrap a route handler so every error it raises leaves as problem+json.

    A per-handler wrapper rather than an app middleware: the proxy route is the hot path,
    and aiohttp's middleware chain costs it a measurable few percent per request.
    """

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProblemError as exc:
            return problem_response(exc, request.path)
        except CredentialError as exc:
            return problem_response(problem_for_credential_error(exc), request.path)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return problem_response(_from_http(exc), request.path)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            log.error("unhandled error on %s: %s", request.path, redact(repr(exc)))
            return problem_response(InternalError("the sidecar failed; see its logs"), request.path)

    return wrapped


@with_problems
async def not_found(request: web.Request) -> web.StreamResponse:
    """The catch-all route: unknown paths get a problem, not aiohttp's plain text."""
    raise NotFound(f"no route for {request.method} {request.path}")
