"""NangoSource against the fake Nango (real HTTP), and the webhook helpers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from revive.errors import CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.sources.nango import (
    SIGNATURE_HEADER,
    NangoSource,
    NangoSourceConfig,
    parse_auth_webhook,
    sign_nango_webhook,
    verify_nango_webhook,
)
from revive.testing.fake_nango import (
    FakeNango,
    running_fake_nango,
    send_auth_webhook,
    webhook_body,
)

SECRET = "nango-sk-canary-5f1e2d3c4b5a69788796"
SIGNING = "nango-whsk-canary-0a1b2c3d4e5f"
CONN, KEY = "nango-conn-1", "microsoft-graph"


@pytest.fixture
async def nango() -> AsyncIterator[FakeNango]:
    async with running_fake_nango(secret_key=SECRET) as fake:
        fake.add_connection(CONN, KEY)
        yield fake


def _config(tmp_path: Path, url: str, secret: str = SECRET, **kw: object) -> NangoSourceConfig:
    key_file = tmp_path / "nango.key"
    key_file.write_text(secret + "\n")
    data: dict[str, object] = {
        "kind": "nango",
        "base_url": url,
        "secret_key_file": key_file,
        "connection_id": CONN,
        "provider_config_key": KEY,
        **kw,
    }
    return NangoSourceConfig.model_validate(data)


def _source(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession, **kw: object
) -> NangoSource:
    return NangoSource("conn_n", _config(tmp_path, nango.url, **kw), http)  # type: ignore[arg-type]


# -- lease and refresh ---------------------------------------------------------------------


async def test_lease_reads_token_and_caches(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    stored = nango.connection(CONN, KEY)

    lease = await source.lease()
    assert (lease.connection_id, lease.generation, lease.access_token) == (
        "conn_n",
        1,
        stored.access_token,
    )
    assert lease.expires_at == pytest.approx(stored.expires_at, abs=0.01)
    assert await source.lease() is lease
    assert len(nango.calls) == 1
    call = nango.calls[0]
    assert call["path"] == f"/connection/{CONN}"
    assert call["provider_config_key"] == KEY and call["force_refresh"] == "false"
    assert call["authorization"] == f"Bearer {SECRET}"
    await source.close()


async def test_lease_refetches_near_expiry(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    nango.connections.clear()
    nango.add_connection(CONN, KEY, expires_in=30)  # inside both skews: Nango refreshes it
    source = _source(tmp_path, nango, http)
    first = await source.lease()
    assert first.access_token == nango.connection(CONN, KEY).access_token
    assert nango.connection(CONN, KEY).refreshes == 1
    second = await source.lease()
    assert second is first  # the refreshed token lives an hour
    await source.close()


async def test_refresh_forces_and_reaches_fake(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    stale = await source.lease()
    fresh = await source.refresh(stale)
    assert fresh.access_token != stale.access_token
    assert fresh.access_token == nango.connection(CONN, KEY).access_token
    assert fresh.generation == stale.generation == 1
    assert nango.force_refresh_calls() == 1
    assert nango.calls[-1]["force_refresh"] == "true"
    # A caller still holding the stale lease gets the new one without another call.
    assert (await source.refresh(stale)).access_token == fresh.access_token
    assert nango.force_refresh_calls() == 1
    await source.close()


async def test_refresh_single_flight_under_50_callers(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    stale = await source.lease()
    nango.delay = 0.05
    leases = await asyncio.gather(*(source.refresh(stale) for _ in range(50)))
    assert nango.force_refresh_calls() == 1
    assert {lease.access_token for lease in leases} == {nango.connection(CONN, KEY).access_token}
    await source.close()


async def test_concurrent_first_leases_share_one_call(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    nango.delay = 0.05
    leases = await asyncio.gather(*(source.lease() for _ in range(20)))
    assert len(nango.calls) == 1 and len({lease.access_token for lease in leases}) == 1
    await source.close()


# -- dead grants ---------------------------------------------------------------------------


async def test_refresh_with_invalid_grant_is_dead(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    stale = await source.lease()
    nango.fail_refresh(CONN, KEY, "invalid_grant")
    with pytest.raises(DeadGrant) as info:
        await source.refresh(stale)
    assert info.value.provider_code == "invalid_grant"
    assert info.value.provider_message and "expired or revoked" in info.value.provider_message
    calls = len(nango.calls)
    # The verdict is served from memory: no hammering Nango (and the provider) with refreshes.
    with pytest.raises(DeadGrant):
        await source.refresh(stale)
    with pytest.raises(DeadGrant):
        await source.lease()
    assert len(nango.calls) == calls
    await source.close()


async def test_exhausted_424_is_dead(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    nango.fail_refresh(CONN, KEY, "exhausted")
    source = _source(tmp_path, nango, http)
    with pytest.raises(DeadGrant) as info:
        await source.lease()
    assert info.value.provider_code == "connection_refresh_exhausted"
    assert "424" in str(info.value)
    await source.close()


async def test_deleted_connection_is_dead(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    nango.connections.clear()
    source = _source(tmp_path, nango, http)
    with pytest.raises(DeadGrant) as info:
        await source.lease()
    assert info.value.provider_code == "not_found"
    await source.close()


async def test_reconnect_by_webhook_bumps_generation(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    stale = await source.lease()
    nango.fail_refresh(CONN, KEY, "invalid_grant")
    with pytest.raises(DeadGrant):
        await source.refresh(stale)
    nango.reauthorize(CONN, KEY)
    event = parse_auth_webhook(webhook_body(CONN, KEY, operation="override"))
    assert event is not None and source.matches(event) and event.reconnected
    source.grant_replaced()
    lease = await source.lease()
    assert lease.generation == 2
    assert lease.access_token == nango.connection(CONN, KEY).access_token
    source.grant_replaced(generation=7)
    assert (await source.lease()).generation == 7
    await source.close()


async def test_reconnect_noticed_without_webhook(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    now = [1_000_000.0]
    nango.clock = lambda: now[0]
    nango.connections.clear()
    nango.add_connection(CONN, KEY)
    source = NangoSource("conn_n", _config(tmp_path, nango.url), http, clock=lambda: now[0])
    stale = await source.lease()
    nango.fail_refresh(CONN, KEY, "invalid_grant")
    with pytest.raises(DeadGrant):
        await source.refresh(stale)
    now[0] += 31  # past the recheck window and Nango's backoff; still the old token: dead
    with pytest.raises(DeadGrant):
        await source.lease()
    nango.reauthorize(CONN, KEY)
    now[0] += 31
    lease = await source.lease()
    assert lease.generation == 2 and lease.access_token != stale.access_token
    await source.close()


async def test_recreated_connection_bumps_generation(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    first = await source.lease()
    nango.add_connection(CONN, KEY)  # deleted and connected again: a new record id
    assert (await source.refresh(first)).generation == 2
    await source.close()


# -- transient and misconfigured -----------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_transient(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession, status: int
) -> None:
    source = _source(tmp_path, nango, http)
    nango.server_error = status
    with pytest.raises(CredentialUnavailable):
        await source.lease()
    nango.server_error = None
    assert (await source.lease()).access_token == nango.connection(CONN, KEY).access_token
    await source.close()


async def test_upstream_outage_during_refresh_is_transient(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    stale = await source.lease()
    nango.fail_refresh(CONN, KEY, "upstream_down")
    with pytest.raises(CredentialUnavailable) as info:
        await source.refresh(stale)
    assert info.value.provider_code == "refresh_failed"
    # The still-valid lease keeps being served by this source...
    assert (await source.lease()).access_token == stale.access_token
    # ...while a plain read right after meets Nango's 30 s backoff: transient, with a hint.
    other = _source(tmp_path, nango, http)
    with pytest.raises(CredentialUnavailable) as backoff:
        await other.lease()
    assert backoff.value.retry_after == 30.0
    await source.close()


async def test_timeout_is_transient(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    nango.delay = 1.0
    source = _source(tmp_path, nango, http, timeout_seconds=0.1)
    with pytest.raises(CredentialUnavailable) as info:
        await source.lease()
    assert info.value.provider_code == "timeout"
    await source.close()


async def test_unreachable_is_transient(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running_fake_nango(secret_key=SECRET) as fake:
        url = fake.url
    source = NangoSource("conn_n", _config(tmp_path, url), http)
    with pytest.raises(CredentialUnavailable) as info:
        await source.lease()
    assert info.value.provider_code == "connection_error"
    await source.close()


async def test_rejected_secret_key_is_misconfigured(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "nango-sk-wrong-canary-77aa88bb99"
    source = NangoSource("conn_n", _config(tmp_path, nango.url, secret=wrong), http)
    with pytest.raises(CredentialMisconfigured) as info:
        await source.lease()
    assert info.value.provider_code == "unknown_account"
    _assert_clean(
        [str(info.value), repr(info.value), info.value.provider_message or "", caplog.text],
        [wrong, SECRET],
    )
    await source.close()


async def test_invalid_client_is_misconfigured(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    stale = await source.lease()
    nango.fail_refresh(CONN, KEY, "invalid_client")
    with pytest.raises(CredentialMisconfigured) as info:
        await source.refresh(stale)
    assert info.value.provider_code == "invalid_client"
    await source.close()


async def test_unknown_integration_is_misconfigured(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = NangoSource("conn_n", _config(tmp_path, nango.url, provider_config_key="nope"), http)
    with pytest.raises(CredentialMisconfigured) as info:
        await source.lease()
    assert info.value.provider_code == "unknown_provider_config"
    await source.close()


async def test_missing_secret_file_is_misconfigured(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    config = _config(tmp_path, nango.url).model_copy(
        update={"secret_key_file": tmp_path / "absent"}
    )
    with pytest.raises(CredentialMisconfigured):
        await NangoSource("conn_n", config, http).lease()


# -- secrets -------------------------------------------------------------------------------


async def test_secrets_never_in_repr_errors_or_logs(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = _source(tmp_path, nango, http)
    lease = await source.lease()
    texts = [repr(source), str(source), repr(lease), str(lease), repr(source.config)]
    for fail in ("invalid_grant", "upstream_down"):
        nango.fail_refresh(CONN, KEY, fail)
        source.grant_replaced()
        try:
            await source.refresh(lease)
        except (DeadGrant, CredentialUnavailable) as exc:
            texts += [str(exc), repr(exc), exc.provider_message or "", exc.provider_code or ""]
    nango.server_error = 503
    source.grant_replaced()
    with pytest.raises(CredentialUnavailable) as info:
        await source.lease()
    texts += [str(info.value), info.value.provider_message or ""]
    texts.append(caplog.text)
    _assert_clean(texts, [SECRET, lease.access_token])
    await source.close()


def _assert_clean(texts: list[str], secrets: list[str]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text


# -- webhooks ------------------------------------------------------------------------------


def test_verify_accepts_nango_signature_case_insensitively() -> None:
    body = webhook_body(CONN, KEY)
    signature = sign_nango_webhook(SIGNING.encode(), body)
    assert verify_nango_webhook(SIGNING.encode(), body, {SIGNATURE_HEADER: signature})
    assert verify_nango_webhook(SIGNING.encode(), body, {"x-nango-hmac-sha256": signature})
    assert verify_nango_webhook(SIGNING.encode(), body, {"X-NANGO-HMAC-SHA256": signature.upper()})


def test_verify_refuses_forgeries() -> None:
    body = webhook_body(CONN, KEY)
    good = sign_nango_webhook(SIGNING.encode(), body)
    key = SIGNING.encode()
    assert not verify_nango_webhook(key, body + b" ", {SIGNATURE_HEADER: good})
    assert not verify_nango_webhook(key, body, {SIGNATURE_HEADER: sign_nango_webhook(b"x", body)})
    assert not verify_nango_webhook(key, body, {})
    assert not verify_nango_webhook(key, body, {SIGNATURE_HEADER: "zz"})
    assert not verify_nango_webhook(key, body, {SIGNATURE_HEADER: "é" * 64})
    assert not verify_nango_webhook(b"", body, {SIGNATURE_HEADER: good})
    # The legacy header alone is never enough (Nango: "should not be used").
    legacy = hashlib.sha256(key + body).hexdigest()
    assert not verify_nango_webhook(key, body, {"X-Nango-Signature": legacy})


def test_parse_auth_webhook() -> None:
    event = parse_auth_webhook(
        webhook_body(
            CONN, KEY, operation="refresh", success=False, error_type="refresh_token_external_error"
        )
    )
    assert event is not None
    assert (event.connection_id, event.provider_config_key, event.operation) == (
        CONN,
        KEY,
        "refresh",
    )
    assert event.at_risk and not event.reconnected
    assert event.error_type == "refresh_token_external_error"
    assert event.error_description == "Token has been expired or revoked."
    ok = parse_auth_webhook(webhook_body(CONN, KEY, operation="creation"))
    assert ok is not None and ok.reconnected and ok.error_type is None
    assert parse_auth_webhook(b'{"type": "sync", "connectionId": "c"}') is None
    assert parse_auth_webhook(b"not json") is None
    assert parse_auth_webhook(b'{"type": "auth", "operation": "creation"}') is None
    assert (
        parse_auth_webhook(
            b'{"type":"auth","operation":"explode","connectionId":"c","providerConfigKey":"k",'
            b'"success":true}'
        )
        is None
    )


async def test_signed_webhook_round_trip_over_http(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    """A receiver built from the helpers, the way the sidecar's route uses them."""
    signing_file = tmp_path / "signing.key"
    signing_file.write_text(SIGNING)
    source = _source(tmp_path, nango, http, webhook_secret_file=signing_file)
    seen: list[object] = []

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_nango_webhook(await source.webhook_signing_key(), body, request.headers):
            return web.json_response({"type": "urn:revive:unauthorized"}, status=401)
        seen.append(parse_auth_webhook(body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/v1/webhooks/nango", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/v1/webhooks/nango"
    try:
        body = webhook_body(CONN, KEY)
        status, _ = await send_auth_webhook(url, SIGNING, body, session=http)
        assert status == 204 and len(seen) == 1
        status, _ = await send_auth_webhook(url, SIGNING, body, forged=True, session=http)
        assert status == 401 and len(seen) == 1
        # Signed with the API secret key while a distinct signing key is configured: refused.
        status, _ = await send_auth_webhook(url, SECRET, body, session=http)
        assert status == 401 and len(seen) == 1
    finally:
        await runner.cleanup()
        await source.close()


async def test_signing_key_defaults_to_secret_key(
    tmp_path: Path, nango: FakeNango, http: aiohttp.ClientSession
) -> None:
    source = _source(tmp_path, nango, http)
    assert await source.webhook_signing_key() == SECRET.encode()
    assert SECRET not in repr(source)


def test_config_forbids_extras(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        NangoSourceConfig.model_validate(
            {
                "kind": "nango",
                "secret_key_file": tmp_path / "k",
                "connection_id": "c",
                "provider_config_key": "k",
                "secret_key": "inline",
            }
        )
