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

__all__ = ["not_found", "problem_response", "with_problems"]

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
    """The catch-all route: unknown paths get a problem, not aiohttp's plain text.

    A catch-all also shadows aiohttp's own 405, so a known path asked with a method it does
    not take would read as "no such route": answer that 405 here, with ``Allow``.
    """
    allowed = await _methods_elsewhere(request)
    if allowed:
        answer = problem_response(
            MethodNotAllowed(f"{request.path} takes {', '.join(allowed)}"), request.path
        )
        answer.headers["Allow"] = ", ".join(allowed)
        return answer
    raise NotFound(f"no route for {request.method} {request.path}")


async def _methods_elsewhere(request: web.Request) -> list[str]:
    """The methods other routes take on this path (none when the path is unknown)."""
    own = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not own:
            _, methods = await resource.resolve(request)
            allowed |= methods
    return sorted(allowed)
