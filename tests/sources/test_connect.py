"""ConnectFlow against the real fake Entra provider over HTTP: consent, callback, install."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr
from yarl import URL

from revive.config import OAuth2SourceConfig
from revive.errors import BadRequest, CredentialMisconfigured, CredentialUnavailable
from revive.sources import Grant, GrantStore, OAuth2Source
from revive.sources.connect import ConnectFlow, ConnectResult, ConsentDenied, pkce_challenge
from revive.sources.grants import read_secret_file
from revive.testing.provider import RunningProvider, running_provider

CONN = "conn_ms"
REDIRECT = "http://127.0.0.1:9/v1/connections/conn_ms/callback"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoClassifier:
    """install_grant with an access token never asks the classifier."""

    def classify(self, phase: Any, status: int | None, headers: Mapping[str, str],
                 body: bytes | str | None, /) -> Any:
        raise AssertionError("unexpected token-endpoint classification")


@dataclass
class Env:
    provider: RunningProvider
    http: aiohttp.ClientSession
    config: OAuth2SourceConfig
    clock: Clock
    flow: ConnectFlow
    data: Path

    async def secret(self) -> str:
        assert self.config.client_secret_file is not None
        return await read_secret_file(self.config.client_secret_file, "client secret")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    secret_file = tmp_path / "client_secret"
    secret_file.write_text("lab-secret\n")
    async with running_provider() as provider, aiohttp.ClientSession() as http:
        config = OAuth2SourceConfig(
            kind="oauth2",
            token_url=provider.token_url,
            authorize_url=provider.authorize_url,
            client_id=provider.config.client_id,
            client_secret_file=secret_file,
            scopes=["offline_access", "User.Read", "Mail.Send"],
            redirect_uri=REDIRECT,
        )
        clock = Clock()
        yield Env(provider, http, config, clock, ConnectFlow(clock), tmp_path / "data")


async def consent(env: Env, authorize_url: str, decision: str = "accept") -> dict[str, str]:
    """Play the human: load the consent page, submit it, read the 302 back to the sidecar."""
    async with env.http.get(authorize_url, allow_redirects=False) as page:
        assert page.status == 200, await page.text()
        assert "Permissions requested by" in await page.text()
    url = URL(authorize_url)
    form = {**url.query, "consent": decision}
    async with env.http.post(url.with_query(None), data=form, allow_redirects=False) as resp:
        assert resp.status == 302
        location = URL(resp.headers["Location"])
    assert str(location.with_query(None)) == REDIRECT
    return dict(location.query)


def assert_clean(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


async def test_begin_builds_an_rfc6749_rfc7636_request(env: Env) -> None:
    url = URL(env.flow.begin(CONN, env.config, REDIRECT))
    q = url.query
    assert str(url.with_query(None)) == env.provider.authorize_url
    assert q["response_type"] == "code"
    assert q["client_id"] == env.config.client_id
    assert q["redirect_uri"] == REDIRECT
    assert q["scope"] == "offline_access User.Read Mail.Send"
    assert q["code_challenge_method"] == "S256"
    assert len(q["state"]) >= 43
    assert len(q["code_challenge"]) == 43 and "=" not in q["code_challenge"]
    other = URL(env.flow.begin(CONN, env.config, REDIRECT)).query
    assert other["state"] != q["state"] and other["code_challenge"] != q["code_challenge"]
    assert "pending=2" in repr(env.flow) and q["state"] not in repr(env.flow)


def test_pkce_challenge_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


async def test_full_flow_installs_generation_2_and_leases_a_working_token(env: Env) -> None:
    grants = GrantStore(env.data)
    old = await env.provider.new_grant()
    await grants.save(CONN, Grant(refresh_token=SecretStr(old["refresh_token"]), obtained_at=1.0))
    source = OAuth2Source(CONN, env.config, grants, NoClassifier(), env.http)
    try:
        params = await consent(env, env.flow.begin(CONN, env.config, REDIRECT))
        result = await env.flow.complete(CONN, params, env.http, await env.secret())
        assert result.connection_id == CONN and result.access_token
        assert result.expires_in == env.provider.config.access_token_ttl
        assert result.scope and "User.Read" in result.scope
        assert_clean(repr(result), result.refresh_token, result.access_token, params["code"])

        lease = await source.install_grant(
            result.refresh_token, result.scope, result.access_token, result.expires_in
        )
        assert lease.generation == 2
        stored = await grants.load(CONN)
        assert stored is not None and stored.generation == 2
        assert stored.refresh_token.get_secret_value() == result.refresh_token
        sealed = await asyncio.to_thread(grants.path(CONN).read_bytes)
        assert result.refresh_token.encode() not in sealed

        leased = await source.lease()
        assert leased.generation == 2
        headers = {"Authorization": f"Bearer {leased.access_token}"}
        async with env.http.get(f"{env.provider.url}/v1.0/me", headers=headers) as resp:
            assert resp.status == 200
        calls = await env.provider.token_calls()
        assert [c.get("grant_type") for c in calls][-1:] == ["authorization_code"]
    finally:
        await source.close()


async def test_unknown_state_is_refused(env: Env) -> None:
    env.flow.begin(CONN, env.config, REDIRECT)
    with pytest.raises(BadRequest, match="unknown"):
        await env.flow.complete(CONN, {"state": "forged", "code": "c"}, env.http, None)
    with pytest.raises(BadRequest, match="no state"):
        await env.flow.complete(CONN, {"code": "c"}, env.http, None)


async def test_state_is_single_use(env: Env) -> None:
    params = await consent(env, env.flow.begin(CONN, env.config, REDIRECT))
    await env.flow.complete(CONN, params, env.http, await env.secret())
    with pytest.raises(BadRequest, match="already used") as info:
        await env.flow.complete(CONN, params, env.http, await env.secret())
    assert_clean(str(info.value), params["state"], params["code"])


async def test_expired_state_is_refused(env: Env) -> None:
    params = await consent(env, env.flow.begin(CONN, env.config, REDIRECT))
    env.clock.now += 601
    with pytest.raises(BadRequest, match="expired") as info:
        await env.flow.complete(CONN, params, env.http, await env.secret())
    assert_clean(str(info.value), params["state"], params["code"])
    assert await env.provider.token_calls() == []  # the code was never sent


async def test_state_of_another_connection_is_refused_and_spent(env: Env) -> None:
    params = await consent(env, env.flow.begin("conn_other", env.config, REDIRECT))
    with pytest.raises(BadRequest, match="another connection"):
        await env.flow.complete(CONN, params, env.http, await env.secret())
    with pytest.raises(BadRequest, match="already used"):
        await env.flow.complete("conn_other", params, env.http, await env.secret())
    assert await env.provider.token_calls() == []


async def test_consent_denied_is_a_typed_bad_request(env: Env) -> None:
    params = await consent(env, env.flow.begin(CONN, env.config, REDIRECT), "deny")
    assert params["error"] == "access_denied"
    with pytest.raises(ConsentDenied) as info:
        await env.flow.complete(CONN, params, env.http, await env.secret())
    assert isinstance(info.value, BadRequest)
    problem = info.value.to_problem()
    assert problem["status"] == 400 and problem["type"] == "urn:revive:bad-request"
    assert problem["provider_code"] == "access_denied"
    assert "AADSTS65004" in problem["provider_message"]


async def test_wrong_verifier_is_refused_by_the_token_endpoint(env: Env) -> None:
    params = await consent(env, env.flow.begin(CONN, env.config, REDIRECT))
    state = params["state"]
    env.flow._pending[state] = replace(env.flow._pending[state], verifier="x" * 64)
    secret = await env.secret()
    with pytest.raises(CredentialMisconfigured) as info:
        await env.flow.complete(CONN, params, env.http, secret)
    err = info.value
    assert err.provider_code == "invalid_grant"
    assert err.provider_message and "AADSTS50148" in err.provider_message
    assert "start the connect flow again" in str(err)
    for text in (str(err), repr(err), err.provider_message):
        assert_clean(text, params["code"], state, secret, "x" * 64)


async def test_injected_code_fails_pkce(env: Env) -> None:
    """An attacker's code (bound to their own challenge) cannot be redeemed by our verifier."""
    url = URL(env.flow.begin(CONN, env.config, REDIRECT))
    tampered = url.update_query(code_challenge=pkce_challenge("a" * 64))
    params = await consent(env, str(tampered))
    with pytest.raises(CredentialMisconfigured, match="invalid_grant"):
        await env.flow.complete(CONN, params, env.http, await env.secret())


async def test_wrong_client_secret_is_misconfigured(env: Env) -> None:
    params = await consent(env, env.flow.begin(CONN, env.config, REDIRECT))
    with pytest.raises(CredentialMisconfigured, match="invalid_client") as info:
        await env.flow.complete(CONN, params, env.http, "not-the-secret")
    assert_clean(str(info.value), params["code"], "not-the-secret")


async def test_pending_authorizations_are_bounded(env: Env) -> None:
    flow = ConnectFlow(env.clock, max_pending=2)
    first = URL(flow.begin(CONN, env.config, REDIRECT)).query["state"]
    flow.begin(CONN, env.config, REDIRECT)
    flow.begin(CONN, env.config, REDIRECT)
    assert "pending=2" in repr(flow)
    with pytest.raises(BadRequest, match="unknown"):
        await flow.complete(CONN, {"state": first, "code": "c"}, env.http, None)


async def test_begin_needs_an_authorize_url(env: Env) -> None:
    config = env.config.model_copy(update={"authorize_url": None})
    with pytest.raises(CredentialMisconfigured, match="authorize_url"):
        env.flow.begin(CONN, config, REDIRECT)


# -- token endpoints the fake provider does not imitate ---------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def complete_against(env: Env, handler: Handler) -> ConnectResult:
    app = web.Application()
    app.router.add_post("/token", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        config = env.config.model_copy(update={"token_url": str(server.make_url("/token"))})
        state = URL(env.flow.begin(CONN, config, REDIRECT)).query["state"]
        params = {"state": state, "code": "code-canary-7f3a"}
        return await env.flow.complete(CONN, params, env.http, "secret-canary-19ab")


async def test_5xx_is_transient_with_retry_after(env: Env) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = {"error": "temporarily_unavailable",
                "error_description": "busy; got code=code-canary-7f3a"}
        return web.json_response(body, status=503, headers={"Retry-After": "7"})

    with pytest.raises(CredentialUnavailable) as info:
        await complete_against(env, handler)
    assert info.value.retry_after == 7.0
    assert info.value.provider_message is not None
    assert "code-canary-7f3a" not in info.value.provider_message
    assert_clean(str(info.value), "code-canary-7f3a", "secret-canary-19ab")


async def test_success_without_refresh_token_is_misconfigured(env: Env) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        assert form["grant_type"] == "authorization_code" and form["redirect_uri"] == REDIRECT
        return web.json_response({"access_token": "at-canary-0001", "expires_in": 3600})

    with pytest.raises(CredentialMisconfigured, match="no refresh_token") as info:
        await complete_against(env, handler)
    assert_clean(str(info.value), "at-canary-0001", "code-canary-7f3a")


async def test_redirects_are_not_followed(env: Env) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect("http://127.0.0.1:9/steal")

    with pytest.raises(CredentialMisconfigured, match="307"):
        await complete_against(env, handler)
