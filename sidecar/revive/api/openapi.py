"""The ``/v1`` route table and the OpenAPI 3.1 document generated from it.

:data:`OPERATIONS` is the one list of routes: ``revive.api.routes`` registers a handler for each
entry, and :func:`build_openapi` documents each entry, so a route cannot exist undocumented.
Schemas come from the pydantic models in ``revive.api.models``; every error answer is
``application/problem+json`` with a ``Problem`` schema whose ``type`` enumerates
``revive.errors.PROBLEM_TYPES``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from revive.api import models as m
from revive.errors import (
    PROBLEM_CONTENT_TYPE,
    PROBLEM_TYPES,
    BadRequest,
    BadTarget,
    CapabilityInvalid,
    Fenced,
    HostNotAllowed,
    IdempotencyMismatch,
    InFlight,
    InternalError,
    MethodNotAllowed,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    ProblemError,
    ReconcileRequired,
    RecoveryRequired,
    SourceMisconfigured,
    Unauthorized,
    UnknownConnection,
    UpstreamTimeout,
    UpstreamUnavailable,
    WebhookSignatureInvalid,
)

__all__ = ["OPERATIONS", "PROXY_OPERATION", "Operation", "build_openapi"]

Audience = Literal["worker", "admin", "browser", "webhook", "public"]
Special = Literal["redirect", "html", "jwks", "openapi", "proxy"]

_REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")
_Refs = Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]]
_CREDENTIAL_PROBLEMS = (RecoveryRequired, UpstreamUnavailable, SourceMisconfigured)


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: where it lives, who may call it, what it takes and answers, how it fails.

    Attributes:
        method, path: as registered with aiohttp (``{name}`` path parameters).
        operation_id: the handler's name in ``revive.api.routes`` and the route's name.
        audience: ``worker`` (loopback peers), ``admin`` (bearer token), ``browser``
            (the oauth2 flow), ``webhook`` (an identity layer, authenticated by the signature
            it puts on the body), ``public`` (anyone on the listener).
        request, query, answer: pydantic models of the body, the query string, the answer.
        special: an answer that is not a model (redirect, HTML page, JWKS, this document).
        problems: the errors particular to this route; the audience adds its own.
    """

    method: str
    path: str
    operation_id: str
    summary: str
    audience: Audience
    request: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    special: Special | None = None
    status: int = 200
    problems: tuple[type[ProblemError], ...] = ()
    description: str = ""


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST", "/v1/runs/{run_id}/capabilities", "mint_run_capability",
        "Mint a run capability for the epoch the runtime holds", "worker",
        request=m.MintRunCapabilityRequest, answer=m.RunCapability,
        problems=(NotFound, Fenced, RecoveryRequired),
        description="Granted only when `epoch` equals the store's (the first call with epoch 1 "
        "creates the run); 409 `fenced` when it differs, 424 `recovery-required` (with "
        "`case_id`) while the run has an open case.",
    ),
    Operation(
        "POST", "/v1/capabilities/renew", "renew_capability",
        "Renew a run capability (same claims, new expiry)", "worker",
        request=m.CapabilityRequest, answer=m.RunCapability,
        problems=(CapabilityInvalid, Fenced),
    ),
    Operation(
        "POST", "/v1/capabilities/redeem", "redeem_capability",
        "Redeem a recovery capability: bump the epoch, get a run capability", "worker",
        request=m.CapabilityRequest, answer=m.Redeemed,
        problems=(CapabilityInvalid, Fenced),
        description="Single use. `action.outcome` `unknown` must be settled with "
        "`POST /v1/actions/{idempotency_key}/outcome` before the action is re-executed.",
    ),
    Operation(
        "POST", "/v1/actions/{idempotency_key}/outcome", "settle_action",
        "Settle an unknown action (the worker's reconcile callback)", "worker",
        request=m.SettleOutcomeRequest, answer=m.ActionView, problems=(NotFound,),
        description="400 `bad-request` when the action is not `unknown` (already settled).",
    ),
    Operation(
        "GET", "/v1/runs/{run_id}", "run_status",
        "A run's epoch and open cases", "worker", answer=m.RunStatus, problems=(NotFound,),
    ),
    Operation(
        "GET", "/v1/cases", "list_cases", "List recovery cases", "admin",
        query=m.CaseQuery, answer=m.CaseList,
    ),
    Operation(
        "GET", "/v1/cases/{case_id}", "get_case",
        "One case with its incident record and its run's actions", "admin",
        answer=m.CaseDetail, problems=(NotFound,),
    ),
    Operation(
        "POST", "/v1/connections/{connection_id}/reconnected", "reconnected",
        "Report that the identity layer holds a new grant", "admin",
        request=m.ReconnectedRequest, answer=m.ReconnectedAnswer,
        problems=(NotFound, UnknownConnection, *_CREDENTIAL_PROBLEMS),
        description="Advances every case of the connection. The body may be empty.",
    ),
    Operation(
        "GET", "/v1/connections/at-risk", "connections_at_risk",
        "Connections whose grant works today but is expected to die", "admin",
        answer=m.AtRiskList,
        description="The store's marks (a failed refresh Nango reported by webhook, shared "
        "by every replica) and each source's own report (an idle grant close to expiry).",
    ),
    Operation(
        "POST", "/v1/webhooks/nango", "nango_webhook",
        "Nango's webhooks: a re-authorization advances the connection's cases", "webhook",
        request=m.NangoWebhookBody, answer=m.NangoWebhookAnswer,
        problems=(WebhookSignatureInvalid, PayloadTooLarge, *_CREDENTIAL_PROBLEMS),
        description="Authenticated by `X-Nango-Hmac-Sha256` (HMAC-SHA256 of the raw body under "
        "a configured nango connection's signing key), not the admin token; a missing or "
        "forged signature is a 401 and changes nothing. An `auth` webhook with `success: true` "
        "reports the connection reconnected (as `POST /v1/connections/{id}/reconnected`: "
        "probe, advance every open case) and clears its at-risk mark; `success: false` marks "
        "it at risk and opens nothing. Other types, and connections no source matches, are "
        "acknowledged with `handled: false` so that Nango does not retry them.",
    ),
    Operation(
        "GET", "/v1/connections/{connection_id}/connect", "connect",
        "Start the built-in oauth2 reconnect flow (loopback peers only)", "browser",
        special="redirect", status=302, problems=(NotFound, UnknownConnection),
        description="Answers only a loopback peer (open it on the sidecar's host, or through "
        "a port-forward): whoever starts the flow chooses whose grant gets installed.",
    ),
    Operation(
        "GET", "/v1/connections/{connection_id}/callback", "connect_callback",
        "The provider's redirect back: exchange the code, advance the cases", "browser",
        special="html", problems=(NotFound, UnknownConnection, *_CREDENTIAL_PROBLEMS),
        description="Guarded by the single-use `state` the connect route created.",
    ),
    Operation(
        "POST", "/v1/cases/{case_id}/capability", "issue_recovery_capability",
        "Issue a recovery capability for a ready case", "admin",
        request=m.IssueCapabilityRequest, answer=m.RecoveryCapability, problems=(NotFound,),
        description="400 `bad-request` when the case is not `ready`. The body may be empty.",
    ),
    Operation(
        "POST", "/v1/cases/{case_id}/abandon", "abandon_case", "Give up on a case", "admin",
        request=m.AbandonRequest, answer=m.CaseSummary, problems=(NotFound,),
    ),
    Operation(
        "GET", "/v1/jwks", "jwks", "The public keys that verify capabilities", "public",
        special="jwks",
    ),
    Operation(
        "GET", "/v1/openapi.json", "openapi", "This document", "public", special="openapi",
    ),
)

PROXY_OPERATION = Operation(
    "*", "/proxy/{connection_id}/{tail:(?s:.*)}", "proxy",
    "Forward a request to the connection's provider with its credential", "worker",
    special="proxy",
    problems=(CapabilityInvalid, Fenced, RecoveryRequired, InFlight, IdempotencyMismatch,
              ReconcileRequired, HostNotAllowed, BadTarget, UnknownConnection, MethodNotAllowed,
              PayloadTooLarge, OutcomeUnknown, SourceMisconfigured, UpstreamUnavailable,
              UpstreamTimeout),
    description="Documented here, registered by the app. Any method; `tail` may hold "
    "slashes. Send the run capability as `Authorization: Bearer`, `Revive-Action` on "
    "mutating requests, optionally `Revive-Checkpoint` and `Idempotency-Key`. A replayed "
    "answer carries `Revive-Replayed: true`.",
)


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1.0 document for :data:`OPERATIONS` and the proxy route."""
    refs, top = models_json_schema(_all_models(), ref_template=_REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    schemas["Problem"] = _problem_schema()
    schemas["JWKS"] = _JWKS_SCHEMA
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(_openapi_path(op.path), {})[op.method.lower()] = _operation(op, refs)
    proxy_item = paths.setdefault(_openapi_path(PROXY_OPERATION.path), {})
    for method in ("get", "post", "put", "patch", "delete"):
        doc = _operation(PROXY_OPERATION, refs)
        doc["operationId"] = f"proxy_{method}"
        proxy_item[method] = doc
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Revive sidecar",
            "version": _VERSION,
            "description": "Credential-broker sidecar: run capabilities, the action ledger and "
            "recovery cases. Worker routes answer loopback peers only unless the sidecar is "
            "configured otherwise; admin routes need the admin bearer token. Every error is "
            "`application/problem+json`, except one the HTTP layer answers before any route "
            "runs: a request line or header line over 8190 bytes gets a plain-text 400.",
        },
        "tags": [
            {"name": "worker", "description": "Called by the runtime's workers (loopback)."},
            {"name": "admin", "description": "Operators and webhooks (admin bearer token)."},
            {"name": "browser", "description": "The built-in oauth2 reconnect flow."},
            {"name": "webhook", "description": "Identity layers, by the signature they send."},
            {"name": "public", "description": "Anyone on the listener."},
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "adminToken": {
                    "type": "http", "scheme": "bearer",
                    "description": "The admin token from the sidecar's data_dir/admin-token.",
                },
                "nangoSignature": {
                    "type": "apiKey", "in": "header", "name": "X-Nango-Hmac-Sha256",
                    "description": "Hex HMAC-SHA256 of the raw body under Nango's signing key.",
                },
                "runCapability": {
                    "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                    "description": "A run capability from POST /v1/runs/{run_id}/capabilities.",
                },
            },
        },
    }


def _operation(op: Operation, refs: _Refs) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.audience],
        "responses": _responses(op, refs),
    }
    if op.description:
        doc["description"] = op.description
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAM.findall(op.path)
    ]
    if op.query is not None:
        params += _query_params(op.query)
    if op.special == "html":
        params += [
            {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
            for name in ("code", "state", "error", "error_description")
        ]
    if params:
        doc["parameters"] = params
    if op.request is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {
                "schema": {"$ref": _ref(refs, op.request, "validation")},
            }},
        }
    if op.audience == "admin":
        doc["security"] = [{"adminToken": []}]
    elif op.special == "proxy":
        doc["security"] = [{"runCapability": []}]
    elif op.audience == "webhook":
        doc["security"] = [{"nangoSignature": []}]
    else:
        doc["security"] = []
    return doc


def _responses(op: Operation, refs: _Refs) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    match op.special:
        case None:
            assert op.answer is not None, op.operation_id
            answers[str(op.status)] = _json(op.answer.__name__,
                                            _ref(refs, op.answer, "serialization"))
        case "redirect":
            answers["302"] = {
                "description": "Redirect to the provider's authorize URL.",
                "headers": {"Location": {"schema": {"type": "string", "format": "uri"}}},
            }
        case "html":
            answers["200"] = {
                "description": "A small page: the connection is reconnected, N cases advanced.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        case "jwks":
            answers["200"] = _json("The JWK Set.", "#/components/schemas/JWKS")
        case "openapi":
            answers["200"] = {
                "description": "This OpenAPI document.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        case "proxy":
            answers["default"] = {"description": "The provider's answer, relayed as sent."}
    for status, classes in sorted(_problems_by_status(op).items()):
        answers[str(status)] = {
            "description": "; ".join(f"{c.type}: {c.title}" for c in classes),
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {
                "$ref": "#/components/schemas/Problem",
                "properties": {"type": {"enum": [c.type for c in classes]}},
            }}},
        }
    return answers


def _problems_by_status(op: Operation) -> dict[int, list[type[ProblemError]]]:
    classes: list[type[ProblemError]] = [BadRequest, InternalError, *op.problems]
    if op.audience == "admin":
        classes.append(Unauthorized)
    by_status: dict[int, list[type[ProblemError]]] = {}
    for cls in classes:
        same = by_status.setdefault(cls.status, [])
        if all(c.type != cls.type for c in same):
            same.append(cls)
    return by_status


def _json(description: str, ref: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    props = model.model_json_schema(ref_template=_REF)["properties"]
    return [
        {"name": name, "in": "query", "required": field.is_required(),
         "schema": _not_null(props[name])}
        for name, field in model.model_fields.items()
    ]


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string, never JSON ``null``: drop that branch."""
    branches = [b for b in schema.get("anyOf", ()) if b != {"type": "null"}]
    if len(branches) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**rest, **branches[0]}


def _all_models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    found: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for op in OPERATIONS:
        wanted: list[tuple[type[BaseModel] | None, JsonSchemaMode]] = [
            (op.request, "validation"), (op.query, "validation"), (op.answer, "serialization"),
        ]
        for model, mode in wanted:
            if model is not None and (model, mode) not in found:
                found.append((model, mode))
    return found


def _ref(refs: _Refs, model: type[BaseModel], mode: JsonSchemaMode) -> str:
    ref = refs[(model, mode)]["$ref"]
    assert isinstance(ref, str)
    return ref


def _openapi_path(path: str) -> str:
    return _PARAM.sub(lambda match: "{" + match.group(1) + "}", path)


def _version() -> str:
    try:
        return metadata.version("revive")
    except metadata.PackageNotFoundError:
        return "0.0.0"


_VERSION = _version()  # read at import: it touches the disk, and documents are built on the loop


def _problem_schema() -> dict[str, Any]:
    table = "\n".join(f"- `{t}`: {s}" for t, s in sorted(PROBLEM_TYPES.items()))
    return {
        "type": "object",
        "title": "Problem",
        "description": "RFC 9457 problem details. Every `type` with its status:\n" + table,
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string", "enum": sorted(PROBLEM_TYPES)},
            "title": {"type": "string"},
            "status": {"type": "integer", "enum": sorted(set(PROBLEM_TYPES.values()))},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "case_id": {"type": "string", "description": "recovery-required: the open case."},
            "run_id": {"type": "string"},
            "checkpoint_id": {"type": "string"},
            "action_key": {"type": "string"},
            "provider_code": {"type": "string"},
            "retry_after": {"type": "number", "description": "Also sent as Retry-After."},
            "errors": {
                "type": "array",
                "description": "bad-request on a body or query: one entry per invalid field.",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
        "additionalProperties": True,
    }


_JWKS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "JWKS",
    "required": ["keys"],
    "properties": {
        "keys": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["kty", "kid"],
                "properties": {
                    "kty": {"const": "OKP"},
                    "crv": {"const": "Ed25519"},
                    "alg": {"const": "EdDSA"},
                    "use": {"const": "sig"},
                    "kid": {"type": "string"},
                    "x": {"type": "string"},
                },
            },
        }
    },
}
