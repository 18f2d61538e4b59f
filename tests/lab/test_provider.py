"""The fake Microsoft provider, driven over real HTTP on an ephemeral port."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import time
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from revive.lab.provider import ProviderConfig, serve_provider
from revive.lab.provider_bodies import GRAPH_AUTH_HEADER
from revive.testing.provider import RunningProvider, running_provider
from yarl import URL

CLIENT = {"client_id": "revive-lab", "client_secret": "lab-secret"}
REDIRECT = "http://127.0.0.1:8787/v1/connections/conn_microsoft_ops/callback"
PROP_ID = "String {66f5a359-4659-4830-9070-00047ec6ac6e} Name X-Revive-Idempotency-Key"
ENTRA_KEYS = [
    "error",
    "error_description",
    "error_codes",
    "timestamp",
    "trace_id",
    "correlation_id",
    "error_uri",
]
ENTRA_SUFFIX = re.compile(
    r"\r\nTrace ID: [0-9a-f-]{36}\r\nCorrelation ID: [0-9a-f-]{36}\r\n"
    r"Timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$"
)


async def post_token(p: RunningProvider, **form: str) -> tuple[int, dict[str, Any]]:
    async with p.session.post(p.token_url, data={**CLIENT, **form}) as resp:
        return resp.status, await resp.json()


async def refresh(p: RunningProvider, rt: str, **extra: str) -> tuple[int, dict[str, Any]]:
    return await post_token(p, grant_type="refresh_token", refresh_token=rt, **extra)


async def graph(
    p: RunningProvider, token: str | None, path: str = "/v1.0/me"
) -> tuple[int, dict[str, Any] | None, CIMultiDict[str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with p.session.get(p.url + path, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body, resp.headers.copy()


def assert_entra(body: dict[str, Any], error: str, code: int) -> None:
    assert list(body)[: len(ENTRA_KEYS)] == ENTRA_KEYS
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}:")
    assert ENTRA_SUFFIX.search(body["error_description"])
    assert body["trace_id"] in body["error_description"]
    assert body["error_uri"] == f"https://login.microsoftonline.com/error?code={code}"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def consent(p: RunningProvider, challenge: str, decision: str = "accept") -> URL:
    form = {
        "client_id": "revive-lab",
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "scope": "offline_access Mail.Send Calendars.Read",
        "state": "st-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "consent": decision,
    }
    async with p.session.post(p.authorize_url, data=form, allow_redirects=False) as resp:
        assert resp.status == 302
        return URL(resp.headers["Location"])


async def send_mail(p: RunningProvider, token: str, message: dict[str, Any]) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    url = p.url + "/v1.0/me/sendMail"
    async with p.session.post(url, headers=headers, json={"message": message}) as resp:
        assert await resp.read() == b""
        return resp.status


def mail(subject: str, **extra: Any) -> dict[str, Any]:
    return {
        "subject": subject,
        "body": {"contentType": "Text", "content": "hi"},
        "toRecipients": [{"emailAddress": {"address": "megan@revivelab.onmicrosoft.com"}}],
        **extra,
    }


# -- token endpoint --------------------------------------------------------------------


async def test_refresh_rotates_and_refuses_the_old_token(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    status, body = await refresh(provider, grant["refresh_token"])
    assert status == 200
    assert list(body) == [
        "token_type",
        "scope",
        "expires_in",
        "ext_expires_in",
        "access_token",
        "refresh_token",
    ]
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["access_token"].startswith("lab_at_")
    assert body["refresh_token"].startswith("lab_rt_")
    assert body["refresh_token"] != grant["refresh_token"]

    status, reused = await refresh(provider, grant["refresh_token"])
    assert status == 400
    assert_entra(reused, "invalid_grant", 70000)
    status, _ = await refresh(provider, body["refresh_token"])
    assert status == 200
    status, unknown = await refresh(provider, "lab_rt_never-issued")
    assert status == 400 and unknown["error_codes"] == [70000]


async def test_refresh_without_rotation_keeps_the_token() -> None:
    async with running_provider(ProviderConfig(rotate_refresh_tokens=False)) as p:
        grant = await p.new_grant()
        for _ in range(2):
            status, body = await refresh(p, grant["refresh_token"])
            assert status == 200 and body["refresh_token"] == grant["refresh_token"]


async def test_client_auth_basic_wrong_secret_and_unknown_tenant(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    form = {"grant_type": "refresh_token", "refresh_token": grant["refresh_token"]}
    basic = {"Authorization": aiohttp.encode_basic_auth("revive-lab", "lab-secret")}
    async with provider.session.post(provider.token_url, data=form, headers=basic) as resp:
        assert resp.status == 200

    status, body = await post_token(provider, **{**form, "client_secret": "wrong"})
    assert status == 401
    assert_entra(body, "invalid_client", 7000215)

    url = provider.url + "/contoso/oauth2/v2.0/token"
    async with provider.session.post(url, data={**CLIENT, **form}) as resp:
        assert resp.status == 400
        assert_entra(await resp.json(), "invalid_request", 90002)


# -- authorization code + PKCE ---------------------------------------------------------


async def test_consent_page_is_accessible(provider: RunningProvider) -> None:
    _, challenge = pkce()
    query = {
        "client_id": "revive-lab",
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "scope": "offline_access Mail.Send",
        "state": "st-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with provider.session.get(provider.authorize_url, params=query) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert "<h1>Revive Lab — sign in</h1>" in page
    assert "AdeleV@revivelab.onmicrosoft.com" in page
    assert '<button type="submit" name="consent" value="accept">Accept</button>' in page
    assert f'value="{challenge}"' in page
    assert "src=" not in page and "<link" not in page  # no external assets

    missing_pkce = {k: v for k, v in query.items() if not k.startswith("code_challenge")}
    async with provider.session.get(provider.authorize_url, params=missing_pkce) as resp:
        assert resp.status == 400
        assert "AADSTS9002325" in await resp.text()


async def test_auth_code_pkce_happy_path_and_wrong_verifier(provider: RunningProvider) -> None:
    verifier, challenge = pkce()
    location = await consent(provider, challenge)
    assert str(location).startswith(REDIRECT + "?")
    assert location.query["state"] == "st-123"
    code = location.query["code"]

    exchange = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    status, body = await post_token(provider, **exchange, code_verifier=pkce()[0])
    assert status == 400
    assert_entra(body, "invalid_grant", 50148)
    status, body = await post_token(
        provider, **{**exchange, "redirect_uri": REDIRECT + "x"}, code_verifier=verifier
    )
    assert status == 400 and body["error_codes"] == [500112]

    status, body = await post_token(provider, **exchange, code_verifier=verifier)
    assert status == 200
    assert body["scope"] == "Mail.Send Calendars.Read"
    assert (await graph(provider, body["access_token"]))[0] == 200

    status, body = await post_token(provider, **exchange, code_verifier=verifier)
    assert status == 400
    assert_entra(body, "invalid_grant", 54005)


async def test_consent_deny_redirects_with_access_denied(provider: RunningProvider) -> None:
    location = await consent(provider, pkce()[1], "deny")
    assert location.query["error"] == "access_denied"
    assert location.query["error_description"].startswith("AADSTS65004:")
    assert location.query["state"] == "st-123"
    assert "code" not in location.query


# -- Graph and faults ------------------------------------------------------------------


async def test_graph_401_for_missing_unknown_and_expired_tokens() -> None:
    async with running_provider(ProviderConfig(access_token_ttl=0)) as p:
        grant = await p.new_grant()
        status, body, headers = await graph(p, grant["access_token"])
        assert status == 401
        assert headers["WWW-Authenticate"] == GRAPH_AUTH_HEADER
        assert body is not None
        error = body["error"]
        assert error["code"] == "InvalidAuthenticationToken"
        assert error["message"] == "Lifetime validation failed, the token is expired."
        assert list(error["innerError"]) == ["date", "request-id", "client-request-id"]
        for token in (None, "lab_at_forged"):
            status, body, headers = await graph(p, token)
            assert status == 401 and body is not None
            assert body["error"]["code"] == "InvalidAuthenticationToken"
            assert headers["WWW-Authenticate"] == GRAPH_AUTH_HEADER


async def test_expire_token_fault_keeps_the_grant(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    assert (await graph(provider, grant["access_token"]))[0] == 200
    await provider.fault("expire_token")
    assert (await graph(provider, grant["access_token"]))[0] == 401
    status, body = await refresh(provider, grant["refresh_token"])
    assert status == 200
    assert (await graph(provider, body["access_token"]))[0] == 200


async def test_kill_grant_answers_aadsts700082_until_reconsent(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    await provider.fault("kill_grant")
    assert (await graph(provider, grant["access_token"]))[0] == 401
    for _ in range(2):  # stays dead
        status, body = await refresh(provider, grant["refresh_token"])
        assert status == 400
        assert_entra(body, "invalid_grant", 700082)
        assert "The refresh token has expired due to inactivity." in body["error_description"]
        assert "was inactive for 90.00:00:00." in body["error_description"]
    await provider.clear_faults()
    assert (await refresh(provider, grant["refresh_token"]))[0] == 400

    verifier, challenge = pkce()
    code = (await consent(provider, challenge)).query["code"]
    status, fresh = await post_token(
        provider,
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT,
        code_verifier=verifier,
    )
    assert status == 200
    assert (await refresh(provider, fresh["refresh_token"]))[0] == 200
    assert (await refresh(provider, grant["refresh_token"]))[0] == 400


async def test_claims_challenge_needs_a_refresh_with_claims(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    before = int(time.time())
    await provider.fault("claims_challenge")
    status, body, headers = await graph(provider, grant["access_token"])
    assert status == 401 and body is not None
    assert body["error"]["code"] == "InvalidAuthenticationToken"
    auth = headers["WWW-Authenticate"]
    assert auth.startswith(GRAPH_AUTH_HEADER)
    assert 'error="insufficient_claims"' in auth
    claims_b64 = re.search(r'claims="([^"]+)"', auth)
    assert claims_b64 is not None
    claims = json.loads(base64.b64decode(claims_b64.group(1)))
    assert claims["access_token"]["nbf"]["essential"] is True
    assert int(claims["access_token"]["nbf"]["value"]) >= before

    status, plain = await refresh(provider, grant["refresh_token"])
    assert status == 200
    status, _, headers = await graph(provider, plain["access_token"])
    assert status == 401 and "insufficient_claims" in headers["WWW-Authenticate"]

    decoded = base64.b64decode(claims_b64.group(1)).decode()
    status, cleared = await refresh(provider, plain["refresh_token"], claims=decoded)
    assert status == 200
    assert (await graph(provider, cleared["access_token"]))[0] == 200
    token_calls = await provider.token_calls()
    assert [c["claims"] for c in token_calls] == [False, True]


async def test_unavailable_twice_then_ok(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    await provider.fault("unavailable", count=2, retry_after=3)
    for _ in range(2):
        status, body, headers = await graph(provider, grant["access_token"], "/v1.0/me/events")
        assert status == 503 and body is not None
        assert body["error"]["code"] == "serviceNotAvailable"
        assert list(body["error"]["innerError"]) == ["request-id", "date"]
        assert headers["Retry-After"] == "3"
    status, body, _ = await graph(provider, grant["access_token"], "/v1.0/me/events")
    assert status == 200 and body is not None and len(body["value"]) == 3


async def test_rate_limit_sets_retry_after(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    await provider.fault("rate_limit", count=1, retry_after=7)
    async with provider.session.get(provider.url + "/_lab/faults") as resp:
        assert [f["fault"] for f in await resp.json()] == ["rate_limit"]
    status, body, headers = await graph(provider, grant["access_token"])
    assert status == 429 and headers["Retry-After"] == "7"
    assert body == {
        "error": {
            "code": "ApplicationThrottled",
            "message": "Application is over its MailboxConcurrency limit.",
        }
    }
    await provider.fault("rate_limit")
    assert (await graph(provider, grant["access_token"]))[2]["Retry-After"] == "1"
    assert (await graph(provider, grant["access_token"]))[0] == 200


async def test_latency_delays_the_next_calls(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    await provider.fault("latency", ms=300, count=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await graph(provider, grant["access_token"]))[0] == 200
    assert loop.time() - started >= 0.29
    started = loop.time()
    assert (await graph(provider, grant["access_token"]))[0] == 200
    assert loop.time() - started < 0.25


async def test_commit_then_drop_sends_but_cuts_the_answer(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    await provider.fault("commit_then_drop")
    message = mail(
        "dropped",
        internetMessageHeaders=[{"name": "x-revive-idempotency-key", "value": "idem-drop"}],
    )
    with pytest.raises(aiohttp.ClientConnectionError):
        await send_mail(provider, grant["access_token"], message)
    mails = await provider.mails()
    assert [(m["subject"], m["idempotency_key"]) for m in mails] == [("dropped", "idem-drop")]
    sends = await provider.calls("/v1.0/me/sendMail")
    assert sends[-1]["status"] is None
    assert await send_mail(provider, grant["access_token"], mail("next")) == 202


# -- sendMail and reconcile lookups ----------------------------------------------------


async def test_sendmail_keys_and_sent_items_filters(provider: RunningProvider) -> None:
    token = (await provider.new_grant())["access_token"]
    by_prop = mail("by-prop", singleValueExtendedProperties=[{"id": PROP_ID, "value": "k-1"}])
    by_header = mail(
        "by-header", internetMessageHeaders=[{"name": "X-Revive-Idempotency-Key", "value": "k-2"}]
    )
    assert await send_mail(provider, token, by_prop) == 202
    assert await send_mail(provider, token, by_header) == 202
    assert await send_mail(provider, token, mail("plain")) == 202
    mails = await provider.mails()
    assert [(m["subject"], m["idempotency_key"]) for m in mails] == [
        ("by-prop", "k-1"),
        ("by-header", "k-2"),
        ("plain", None),
    ]
    assert mails[0]["to"] == ["megan@revivelab.onmicrosoft.com"]

    sent = "/v1.0/me/mailFolders/SentItems/messages"

    async def lookup(expr: str) -> tuple[int, list[dict[str, Any]]]:
        headers = {"Authorization": f"Bearer {token}"}
        url = provider.url + sent
        async with provider.session.get(url, headers=headers, params={"$filter": expr}) as resp:
            return resp.status, (await resp.json()).get("value", [])

    ext = "singleValueExtendedProperties/Any(ep: ep/id eq '{}' and ep/value eq '{}')"
    status, found = await lookup(ext.format(PROP_ID, "k-1"))
    assert status == 200 and [m["subject"] for m in found] == ["by-prop"]
    assert found[0]["singleValueExtendedProperties"] == [{"id": PROP_ID, "value": "k-1"}]
    assert set(found[0]) >= {"id", "subject", "internetMessageId", "sentDateTime"}
    assert (await lookup(ext.format(PROP_ID, "k-404")))[1] == []

    status, found2 = await lookup(f"internetMessageId eq '{found[0]['internetMessageId']}'")
    assert [m["subject"] for m in found2] == ["by-prop"]
    assert (await lookup("internetMessageId eq '<nope@x>'"))[1] == []

    async with provider.session.get(
        provider.url + sent,
        headers={"Authorization": f"Bearer {token}"},
        params={"$filter": "subject eq "},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "BadRequest"


async def test_sendmail_validation_errors(provider: RunningProvider) -> None:
    token = (await provider.new_grant())["access_token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = provider.url + "/v1.0/me/sendMail"
    async with provider.session.post(url, headers=headers, data=b"{not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "BadRequest"
    async with provider.session.post(
        url, headers=headers, json={"message": {"subject": "x"}}
    ) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "ErrorInvalidRecipients"
        assert list(error["innerError"]) == ["request-id", "date"]
    assert await provider.mails() == []


# -- control API and call log ----------------------------------------------------------


async def test_calls_log_counts_token_calls_without_tokens(provider: RunningProvider) -> None:
    grant = await provider.new_grant()
    rt = grant["refresh_token"]
    for _ in range(3):
        _, body = await refresh(provider, rt)
        rt = body["refresh_token"]
    await graph(provider, body["access_token"])
    await graph(provider, "lab_at_forged")
    token_calls = await provider.token_calls()
    assert len(token_calls) == 3
    assert {(c["method"], c["status"], c["grant_type"]) for c in token_calls} == {
        ("POST", 200, "refresh_token")
    }
    me = await provider.calls("/v1.0/")
    assert [c["token_valid"] for c in me] == [True, False]
    everything = json.dumps(await provider.calls())
    assert "lab_at_" not in everything and "lab_rt_" not in everything
    assert "lab_" not in repr(provider.state).replace("lab'", "")


async def test_control_api_validation_clear_and_reset(provider: RunningProvider) -> None:
    url = provider.url + "/_lab/faults"
    for bad in (
        {"fault": "nope"},
        {"fault": "latency"},
        {"fault": "unavailable", "count": 0},
        {"fault": "rate_limit", "typo": 1},
        [1],
    ):
        async with provider.session.post(url, json=bad) as resp:
            assert resp.status == 400, bad
            assert "error" in await resp.json()
    await provider.fault("unavailable", count=5)
    await provider.fault("latency", ms=1)
    async with provider.session.get(url) as resp:
        assert {f["fault"] for f in await resp.json()} == {"unavailable", "latency"}
    await provider.clear_faults()
    async with provider.session.get(url) as resp:
        assert await resp.json() == []

    grant = await provider.new_grant()
    await provider.reset()
    assert await provider.calls() == []
    assert (await refresh(provider, grant["refresh_token"]))[0] == 400


async def test_serve_provider_runs_until_cancelled() -> None:
    task = asyncio.create_task(serve_provider("127.0.0.1", 0))
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
