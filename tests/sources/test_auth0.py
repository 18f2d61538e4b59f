"""Auth0Source against the fake Auth0 Token Vault exchange (real HTTP)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from revive.errors import CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.sources.auth0 import Auth0Source, Auth0SourceConfig
from revive.testing.fake_auth0 import GRANT, REQUESTED, FakeAuth0, running_fake_auth0

CONN = "conn_gcal"
USER = "auth0|alice"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def auth0() -> AsyncIterator[FakeAuth0]:
    async with running_fake_auth0() as fake:
        yield fake


def make_config(auth0: FakeAuth0, tmp_path: Path, subject: str, **kw: Any) -> Auth0SourceConfig:
    (tmp_path / "cs").write_text(auth0.client_secret + "\n")
    (tmp_path / "rt").write_text(subject + "\n")
    return Auth0SourceConfig(
        kind="auth0",
        domain_url=auth0.url,
        client_id=auth0.client_id,
        client_secret_file=tmp_path / "cs",
        connection="google-oauth2",
        subject_token_file=tmp_path / "rt",
        **kw,
    )


def test_config_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Auth0SourceConfig(
            kind="auth0", domain_url="tenant.auth0.com", client_id="c",
            client_secret_file=tmp_path / "cs", connection="x", subject_token_file=tmp_path / "rt",
        )
    with pytest.raises(ValidationError):
        Auth0SourceConfig(
            kind="auth0", domain_url="https://tenant.auth0.com", client_id="c",
            client_secret_file=tmp_path / "cs", connection="x",
            subject_token_file=tmp_path / "rt", extra=1,  # type: ignore[call-arg]
        )


async def test_exchange_request_shape_and_cached_lease(
    auth0: FakeAuth0, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rt = auth0.add_user(USER, {"google-oauth2"})
    clock = Clock()
    config = make_config(auth0, tmp_path, rt, login_hint=USER)
    source = Auth0Source(CONN, config, http, clock)
    lease = await source.lease()
    assert lease.access_token == auth0.linked[(USER, "google-oauth2")]
    assert (lease.connection_id, lease.generation) == (CONN, 1)
    assert lease.expires_at == clock.now + 3600
    assert auth0.requests == [
        {
            "grant_type": GRANT,
            "client_id": auth0.client_id,
            "client_secret": auth0.client_secret,
            "subject_token_type": "urn:ietf:params:oauth:token-type:refresh_token",
            "subject_token": rt,
            "requested_token_type": REQUESTED,
            "connection": "google-oauth2",
            "login_hint": USER,
        }
    ]
    assert await source.lease() is lease
    assert len(auth0.requests) == 1
    clock.now += 3600 - 30  # inside the 60 s skew: exchange again
    await source.lease()
    assert len(auth0.requests) == 2


async def test_refresh_exchanges_again_and_single_flight(
    auth0: FakeAuth0, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rt = auth0.add_user(USER, {"google-oauth2"})
    source = Auth0Source(CONN, make_config(auth0, tmp_path, rt), http, Clock())
    first = await source.lease()
    new = auth0.rotate_upstream(USER, "google-oauth2")
    leases = await asyncio.gather(*(source.refresh(first) for _ in range(8)))
    assert {lease.access_token for lease in leases} == {new}
    assert len(auth0.requests) == 2
    # An unchanged answer is handed back as is (the proxy relays the provider's rejection).
    again = await source.refresh(leases[0])
    assert again.access_token == new


async def test_no_linked_account_is_dead_grant(
    auth0: FakeAuth0, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rt = auth0.add_user(USER)
    source = Auth0Source(CONN, make_config(auth0, tmp_path, rt), http, Clock())
    with pytest.raises(DeadGrant) as err:
        await source.lease()
    assert err.value.provider_code == "federated_connection_refresh_token_not_found"
    # Reconnecting in Auth0 (Connected Accounts) makes the next exchange work.
    token = auth0.link(USER, "google-oauth2")
    assert (await source.refresh(None)).access_token == token


async def test_upstream_refresh_failure_and_dead_subject_are_dead_grant(
    auth0: FakeAuth0, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rt = auth0.add_user(USER, {"google-oauth2"})
    source = Auth0Source(CONN, make_config(auth0, tmp_path, rt), http, Clock())
    lease = await source.lease()
    auth0.upstream_failed.add((USER, "google-oauth2"))
    with pytest.raises(DeadGrant) as err:
        await source.refresh(lease)
    assert err.value.provider_code == "federated_connection_refresh_token_flow_failed"
    auth0.users.clear()  # the Auth0 refresh token was revoked
    with pytest.raises(DeadGrant) as err:
        await source.refresh(lease)
    assert err.value.provider_code == "invalid_grant"
    assert err.value.provider_message == "Unknown or invalid refresh token."


async def test_invalid_client_and_disabled_grant_are_misconfigured(
    auth0: FakeAuth0, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rt = auth0.add_user(USER, {"google-oauth2"})
    config = make_config(auth0, tmp_path, rt)
    (tmp_path / "cs").write_text("cs-wrong-secret-value\n")
    with pytest.raises(CredentialMisconfigured) as err:
        await Auth0Source(CONN, config, http).lease()
    assert err.value.provider_code == "invalid_client"
    (tmp_path / "cs").write_text(auth0.client_secret)
    auth0.grant_enabled = False
    with pytest.raises(CredentialMisconfigured) as err:
        await Auth0Source(CONN, config, http).lease()
    assert err.value.provider_code == "unauthorized_client"


async def test_rate_limit_honours_retry_after(
    auth0: FakeAuth0, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rt = auth0.add_user(USER, {"google-oauth2"})
    clock = Clock()
    source = Auth0Source(CONN, make_config(auth0, tmp_path, rt), http, clock)
    auth0.fail_next.append(
        (429, {"error": "too_many_requests", "error_description": "Global limit has been reached"},
         {"Retry-After": "7", "X-RateLimit-Reset": str(int(clock.now) + 30)})
    )
    with pytest.raises(CredentialUnavailable) as err:
        await source.lease()
    assert (err.value.provider_code, err.value.retry_after) == ("too_many_requests", 7.0)
    auth0.fail_next.append(
        (429, {"error": "too_many_requests"}, {"X-RateLimit-Reset": str(int(clock.now) + 30)})
    )
    with pytest.raises(CredentialUnavailable) as err:
        await source.lease()
    assert err.value.retry_after == 30.0
    assert (await source.lease()).access_token == auth0.linked[(USER, "google-oauth2")]


async def test_server_error_keeps_a_still_valid_lease(
    auth0: FakeAuth0, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rt = auth0.add_user(USER, {"google-oauth2"})
    clock = Clock()
    source = Auth0Source(CONN, make_config(auth0, tmp_path, rt), http, clock)
    lease = await source.lease()
    clock.now += 3600 - 30  # due for renewal, not yet expired
    auth0.fail_next.append((503, {"error": "server_error"}, {}))
    assert await source.lease() is lease
    auth0.fail_next.append((500, {"error": "server_error"}, {}))
    with pytest.raises(CredentialUnavailable) as err:
        await source.refresh(lease)
    assert err.value.provider_code == "server_error"


async def test_unreachable_is_transient(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    (tmp_path / "cs").write_text("cs-x")
    (tmp_path / "rt").write_text("rt-x")
    config = Auth0SourceConfig(
        kind="auth0", domain_url="http://127.0.0.1:9", client_id="c",
        client_secret_file=tmp_path / "cs", connection="x", subject_token_file=tmp_path / "rt",
        timeout_seconds=2,
    )
    with pytest.raises(CredentialUnavailable) as err:
        await Auth0Source(CONN, config, http).lease()
    assert err.value.provider_code == "auth0_unreachable"


async def test_secrets_never_in_repr_errors_or_logs(
    auth0: FakeAuth0,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    rt = auth0.add_user(USER, {"google-oauth2"})
    clock = Clock()
    source = Auth0Source(CONN, make_config(auth0, tmp_path, rt), http, clock)
    lease = await source.lease()
    texts = [repr(source), str(source), repr(lease)]
    # An error description that echoes every secret must come back redacted.
    echo = f"bad {rt} {auth0.client_secret} {lease.access_token}"
    for status, code in ((401, "invalid_client"), (403, "invalid_grant"), (503, "server_error")):
        auth0.fail_next.append((status, {"error": code, "error_description": echo}, {}))
        with pytest.raises((CredentialMisconfigured, DeadGrant, CredentialUnavailable)) as err:
            await source.refresh(lease)
        texts += [str(err.value), repr(err.value), str(err.value.provider_message)]
    clock.now += 3600 - 30
    auth0.fail_next.append((503, {"error": "server_error", "error_description": echo}, {}))
    await source.lease()
    texts += [r.getMessage() for r in caplog.records]
    blob = "\n".join(texts)
    for secret in (rt, auth0.client_secret, lease.access_token):
        assert secret not in blob
