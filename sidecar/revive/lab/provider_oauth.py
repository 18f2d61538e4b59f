"""Entra v2 endpoints of the fake provider: ``/{tenant}/oauth2/v2.0/token`` and ``/authorize``.

Imitates "Microsoft identity platform and OAuth 2.0 authorization code flow"
(https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow) for the
happy paths, and "Microsoft Entra authentication and authorization error codes"
(https://learn.microsoft.com/entra/identity-platform/reference-error-codes) for the
failures: every refusal carries the AADSTS number a real tenant would send, so the
sidecar's classifier sees the same ``error_codes`` in the lab as in production.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import re
import secrets
from collections.abc import Mapping
from urllib.parse import unquote_plus

from aiohttp import web
from yarl import URL

from .provider_bodies import dead_grant_inactive, entra_error, lab_user, new_trace_id
from .provider_state import CALL_NOTE, PROVIDER_STATE, Grant, ProviderState, RefreshOutcome

__all__ = ["routes"]

routes = web.RouteTableDef()

_NO_STORE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}
_DEFAULT_SCOPE = "User.Read Mail.Send Calendars.Read"
# RFC 7636 §4.1: 43-128 characters of the unreserved set.
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_AUTHORIZE_FIELDS = (
    "client_id",
    "response_type",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
)


class _Refusal(Exception):
    """An Entra error decided deep in validation; rendered once by the route."""

    def __init__(self, status: int, error: str, code: int, message: str) -> None:
        super().__init__(f"AADSTS{code}")
        self.status, self.error, self.code, self.message = status, error, code, message


def _missing(name: str) -> _Refusal:
    return _Refusal(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def _response_scope(requested: str) -> str:
    # Entra does not echo offline_access in the token answer's ``scope``.
    kept = [s for s in requested.split() if s.lower() != "offline_access"]
    return " ".join(kept) or _DEFAULT_SCOPE


def _token_answer(
    state: ProviderState, grant: Grant, access_token: str, scope: str
) -> web.Response:
    ttl = state.config.access_token_ttl
    body = {
        "token_type": "Bearer",
        "scope": _response_scope(scope),
        "expires_in": ttl,
        "ext_expires_in": ttl,
        "access_token": access_token,
        "refresh_token": grant.refresh_token,
    }
    return web.json_response(body, headers={**_NO_STORE, "x-ms-request-id": new_trace_id()})


def _check_tenant(request: web.Request) -> None:
    tenant = request.match_info["tenant"]
    if tenant != request.app[PROVIDER_STATE].config.tenant:
        raise _Refusal(
            400,
            "invalid_request",
            90002,
            f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
            "and are signing into the correct cloud. Check with your subscription "
            "administrator, this may happen if there are no active subscriptions for the tenant.",
        )


def _check_client_id(state: ProviderState, client_id: str | None) -> str:
    if not client_id:
        raise _missing("client_id")
    if client_id != state.config.client_id:
        raise _Refusal(
            400,
            "unauthorized_client",
            700016,
            f"Application with identifier '{client_id}' was not found in the directory "
            f"'{state.config.tenant}'. This can happen if the application has not been "
            "installed by the administrator of the tenant or consented to by any user in the "
            "tenant. You may have sent your authentication request to the wrong tenant.",
        )
    return client_id


def _client_credentials(
    request: web.Request, form: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """RFC 6749 §2.3.1: HTTP Basic (form-urlencoded id and secret) or body fields."""
    header = request.headers.get("Authorization", "")
    if header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise _Refusal(
                401, "invalid_client", 7000216, "'client_assertion' or 'client_secret' is required."
            ) from exc
        client_id, _, secret = decoded.partition(":")
        return unquote_plus(client_id), unquote_plus(secret)
    return form.get("client_id"), form.get("client_secret")


def _authenticate_client(
    state: ProviderState, request: web.Request, form: Mapping[str, str]
) -> None:
    client_id, secret = _client_credentials(request, form)
    client_id = _check_client_id(state, client_id)
    if not secret:
        raise _Refusal(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'.",
        )
    if not secrets.compare_digest(secret.encode(), state.config.client_secret.encode()):
        raise _Refusal(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the "
            "client secret value, not the client secret ID, for a secret added to app "
            f"'{client_id}'.",
        )


@routes.post("/{tenant}/oauth2/v2.0/token")
async def token(request: web.Request) -> web.Response:
    """Redeem a refresh token or an authorization code (PKCE S256)."""
    state = request.app[PROVIDER_STATE]
    note = request[CALL_NOTE]
    correlation = request.headers.get("client-request-id")
    try:
        _check_tenant(request)
        raw = await request.post()
        form = {k: v for k, v in raw.items() if isinstance(v, str)}
        note.grant_type = form.get("grant_type") or None
        note.claims = bool(form.get("claims"))
        _authenticate_client(state, request, form)
        if note.claims:
            try:
                json.loads(form["claims"])
            except ValueError as exc:
                raise _Refusal(
                    400,
                    "invalid_request",
                    9002313,
                    "Invalid request. Request is malformed or invalid.",
                ) from exc
        match note.grant_type:
            case None:
                raise _missing("grant_type")
            case "refresh_token":
                return _redeem_refresh(state, form, correlation)
            case "authorization_code":
                return _redeem_code(state, form)
            case other:
                raise _Refusal(
                    400,
                    "unsupported_grant_type",
                    70003,
                    f"The app requested an unsupported grant type '{other}'.",
                )
    except _Refusal as refusal:
        return entra_error(
            refusal.status, refusal.error, refusal.code, refusal.message, correlation_id=correlation
        )


def _redeem_refresh(
    state: ProviderState, form: Mapping[str, str], correlation: str | None
) -> web.Response:
    refresh_token = form.get("refresh_token")
    if not refresh_token:
        raise _missing("refresh_token")
    outcome = state.refresh(refresh_token, with_claims=bool(form.get("claims")))
    if outcome is RefreshOutcome.DEAD:
        return dead_grant_inactive(correlation_id=correlation)
    if outcome is RefreshOutcome.UNKNOWN:
        # Unknown and rotated-away tokens look alike to the client, as in Entra.
        raise _Refusal(400, "invalid_grant", 70000, "Provided grant is invalid or malformed.")
    grant, access_token = outcome
    return _token_answer(state, grant, access_token, form.get("scope") or grant.scope)


def _redeem_code(state: ProviderState, form: Mapping[str, str]) -> web.Response:
    code_value = form.get("code")
    if not code_value:
        raise _missing("code")
    redirect_uri = form.get("redirect_uri")
    if not redirect_uri:
        raise _missing("redirect_uri")
    code = state.find_code(code_value)
    if code is None or code.client_id != state.config.client_id:
        raise _Refusal(
            400, "invalid_grant", 70000, "The provided value for the 'code' parameter is not valid."
        )
    if code.used:
        raise _Refusal(
            400,
            "invalid_grant",
            54005,
            "OAuth2 Authorization code was already redeemed, please retry with a new valid code "
            "or use an existing refresh token.",
        )
    if code.expires_at <= state.clock():
        raise _Refusal(
            400,
            "invalid_grant",
            70008,
            "The provided authorization code or refresh token has expired due to inactivity. "
            "Send a new interactive authorization request for this user and resource.",
        )
    if redirect_uri != code.redirect_uri:
        raise _Refusal(
            400,
            "invalid_grant",
            500112,
            f"The reply address '{redirect_uri}' does not match the reply address "
            f"'{code.redirect_uri}' provided when requesting Authorization code.",
        )
    verifier = form.get("code_verifier") or ""
    if not _VERIFIER.fullmatch(verifier) or not secrets.compare_digest(
        _s256(verifier), code.code_challenge
    ):
        raise _Refusal(
            400,
            "invalid_grant",
            50148,
            "The code_verifier does not match the code_challenge supplied in the authorization "
            "request for PKCE.",
        )
    code.used = True
    grant, access_token = state.new_grant(code.scope)
    return _token_answer(state, grant, access_token, form.get("scope") or code.scope)


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# -- /authorize ------------------------------------------------------------------------


def _validate_authorize(request: web.Request, params: Mapping[str, str]) -> None:
    state = request.app[PROVIDER_STATE]
    _check_tenant(request)
    client_id = _check_client_id(state, params.get("client_id"))
    redirect_uri = params.get("redirect_uri")
    if not redirect_uri:
        raise _missing("redirect_uri")
    parsed = URL(redirect_uri)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise _Refusal(
            400,
            "invalid_request",
            50011,
            f"The redirect URI '{redirect_uri}' specified in the request does not match the "
            f"redirect URIs configured for the application '{client_id}'. Make sure the redirect "
            "URI sent in the request matches one added to your application in the Azure portal.",
        )
    response_type = params.get("response_type")
    if not response_type:
        raise _missing("response_type")
    if response_type != "code":
        raise _Refusal(
            400,
            "unsupported_response_type",
            700054,
            f"response_type '{response_type}' is not enabled for the application.",
        )
    # The lab insists on PKCE S256 (Entra only insists for SPAs); RFC 9700 recommends it for all.
    if not params.get("code_challenge") or params.get("code_challenge_method") != "S256":
        raise _Refusal(
            400,
            "invalid_request",
            9002325,
            "Proof Key for Code Exchange is required for cross-origin authorization code "
            "redemption. (The lab requires code_challenge_method=S256.)",
        )


def _error_page(refusal: _Refusal) -> web.Response:
    trace = new_trace_id()
    text = html.escape(f"AADSTS{refusal.code}: {refusal.message}")
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in to your account</title></head>
<body><main>
<h1>Sign in</h1>
<p role="alert">Sorry, but we're having trouble signing you in.</p>
<p>{text}</p>
<dl><dt>Request Id</dt><dd>{trace}</dd><dt>Error</dt><dd>{html.escape(refusal.error)}</dd></dl>
</main></body></html>
"""
    return web.Response(text=body, status=400, content_type="text/html", headers=_NO_STORE)


_CONSENT_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Revive Lab — sign in</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 28rem; margin: 3rem auto; }}
button {{ font-size: 1rem; padding: .5rem 1.5rem; margin-right: .5rem; }}
</style></head>
<body><main>
<h1>Revive Lab — sign in</h1>
<p>Signed in as <strong id="account">{name}</strong> (<span>{upn}</span>)</p>
<form method="post" action="{action}" aria-labelledby="consent-title">
<h2 id="consent-title">Permissions requested by {client}</h2>
<ul>{scopes}</ul>
{hidden}
<button type="submit" name="consent" value="accept">Accept</button>
<button type="submit" name="consent" value="deny">Cancel</button>
</form>
</main></body></html>
"""


@routes.get("/{tenant}/oauth2/v2.0/authorize")
async def authorize_page(request: web.Request) -> web.Response:
    """The consent page: one form that posts the same parameters back with ``consent``."""
    params = {k: v for k, v in request.query.items() if k in _AUTHORIZE_FIELDS}
    try:
        _validate_authorize(request, params)
    except _Refusal as refusal:
        return _error_page(refusal)
    user = lab_user()
    hidden = "\n".join(
        f'<input type="hidden" name="{k}" value="{html.escape(v, quote=True)}">'
        for k, v in params.items()
    )
    scopes = "".join(f"<li>{html.escape(s)}</li>" for s in params.get("scope", "").split())
    page = _CONSENT_PAGE.format(
        name=html.escape(str(user["displayName"])),
        upn=html.escape(str(user["userPrincipalName"])),
        action=html.escape(request.path, quote=True),
        client=html.escape(params["client_id"]),
        scopes=scopes or f"<li>{html.escape(_DEFAULT_SCOPE)}</li>",
        hidden=hidden,
    )
    return web.Response(text=page, content_type="text/html", headers=_NO_STORE)


@routes.post("/{tenant}/oauth2/v2.0/authorize")
async def authorize_submit(request: web.Request) -> web.Response:
    """The consent decision: 302 back to ``redirect_uri`` with a code or ``access_denied``."""
    raw = await request.post()
    params = {k: v for k, v in raw.items() if isinstance(v, str) and k in _AUTHORIZE_FIELDS}
    try:
        _validate_authorize(request, params)
    except _Refusal as refusal:
        return _error_page(refusal)
    consent = raw.get("consent")
    target = URL(params["redirect_uri"])
    extra: dict[str, str]
    if consent == "accept":
        state = request.app[PROVIDER_STATE]
        code = state.new_code(
            client_id=params["client_id"],
            redirect_uri=params["redirect_uri"],
            scope=params.get("scope") or _DEFAULT_SCOPE,
            code_challenge=params["code_challenge"],
        )
        extra = {"code": code}
    elif consent == "deny":
        extra = {
            "error": "access_denied",
            "error_description": "AADSTS65004: User declined to consent to access the app.",
        }
    else:
        return _error_page(_missing("consent"))
    if "state" in params:
        extra["state"] = params["state"]
    raise web.HTTPFound(target.update_query(extra))
