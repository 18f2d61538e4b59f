"""Grant keep-alive: idle grants are refreshed before the provider drops them, and reported.

A fake clock drives the decisions (``keeper.check()`` is one background-task step); one test
runs the real background task with tiny durations.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr, ValidationError

from revive.classify import Policy, load_policies
from revive.config import (
    ConnectionConfig,
    KeepAliveConfig,
    OAuth2SourceConfig,
    Settings,
    VaultGrantStoreConfig,
)
from revive.errors import CredentialUnavailable
from revive.lab.settings import LAB_CONNECTION, default_policy_dir, lab_settings
from revive.metrics import Metrics
from revive.sources import (
    Grant,
    GrantBackend,
    GrantRisk,
    GrantStore,
    OAuth2Source,
    VaultGrantStore,
    build_source,
)
from revive.sources.keep_alive import GrantKeeper
from revive.testing.fake_vault import running_fake_vault
from revive.testing.provider import RunningProvider
from revive.testing.sidecar import running_sidecar
from revive.testing.token_endpoint import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeTokenEndpoint,
    running_token_endpoint,
)

CONN = "conn_ms"
DAY = 86400.0
T0 = 1_700_000_000.0
RT_CANARY = "rt-canary-keepalive-0b7e"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def policies() -> dict[str, Policy]:
    return load_policies(default_policy_dir())


def ms_config(provider: RunningProvider, tmp: Path, **overrides: Any) -> OAuth2SourceConfig:
    secret = tmp / "client-secret"
    secret.write_text(provider.config.client_secret + "\n")
    values: dict[str, Any] = {
        "kind": "oauth2",
        "token_url": provider.token_url,
        "client_id": provider.config.client_id,
        "client_secret_file": secret,
        "scopes": ["offline_access", "Mail.Send"],
        "keep_alive": KeepAliveConfig(enabled=True),
    }
    values.update(overrides)
    return OAuth2SourceConfig(**values)


async def seeded_store(tmp: Path, refresh_token: str, obtained_at: float = T0) -> GrantStore:
    store = GrantStore(tmp / "data")
    await store.save(CONN, Grant(refresh_token=SecretStr(refresh_token), obtained_at=obtained_at))
    return store


# -- config -----------------------------------------------------------------------------------


def test_keep_alive_durations_parse_and_are_checked() -> None:
    assert KeepAliveConfig() == KeepAliveConfig(
        enabled=False, idle_refresh_after=timedelta(days=30), grant_lifetime=timedelta(days=90),
        warn_before=timedelta(days=14), check_every=timedelta(hours=1),
    )
    parsed = KeepAliveConfig.model_validate(
        {"enabled": True, "idle_refresh_after": "20d", "grant_lifetime": "P90D",
         "warn_before": 7 * DAY, "check_every": "00:10:00"}
    )
    assert (parsed.idle_refresh_after, parsed.warn_before, parsed.check_every) == (
        timedelta(days=20), timedelta(days=7), timedelta(minutes=10)
    )
    for bad, why in [
        ({"idle_refresh_after": "90d"}, "shorter than grant_lifetime"),
        ({"warn_before": "91d"}, "shorter than grant_lifetime"),
        ({"check_every": 0}, "positive"),
        ({"surprise": 1}, "Extra inputs"),
    ]:
        with pytest.raises(ValidationError, match=why):
            KeepAliveConfig.model_validate(bad)


def test_jitter_stays_within_its_band() -> None:
    async def never() -> bool:
        raise AssertionError("not called")

    config = KeepAliveConfig(enabled=True, check_every=timedelta(seconds=100), jitter=0.2)
    delays = [
        GrantKeeper(CONN, config, never, list, rng=lambda r=r: r).next_delay()
        for r in (0.0, 0.5, 0.999)
    ]
    assert delays[0] == pytest.approx(80.0) and delays[1] == pytest.approx(100.0)
    assert delays[2] == pytest.approx(120.0, abs=0.1)


# -- refreshing idle grants -------------------------------------------------------------------


async def test_idle_grant_is_refreshed_and_the_time_survives_a_restart(
    provider: RunningProvider, http: aiohttp.ClientSession, tmp_path: Path,
    policies: dict[str, Policy],
) -> None:
    store = await seeded_store(tmp_path, (await provider.new_grant())["refresh_token"])
    clock = Clock(T0 + 29 * DAY)
    source = OAuth2Source(CONN, ms_config(provider, tmp_path), store, policies["microsoft"],
                          http, clock)
    keeper = source.keeper
    assert keeper is not None
    try:
        assert await keeper.check() is False
        assert await provider.token_calls() == []
        clock.now = T0 + 31 * DAY
        assert await keeper.check() is True
        calls = await provider.token_calls()
        assert [(c["grant_type"], c["status"]) for c in calls] == [("refresh_token", 200)]
    finally:
        await source.close()
    stored = await GrantStore(tmp_path / "data").load(CONN)
    assert stored is not None and stored.last_refreshed_at == T0 + 31 * DAY

    # A restarted sidecar reads the refresh time back: one day later nothing is due.
    clock.now = T0 + 32 * DAY
    again = OAuth2Source(CONN, ms_config(provider, tmp_path), GrantStore(tmp_path / "data"),
                         policies["microsoft"], http, clock)
    assert again.keeper is not None
    try:
        assert await again.keeper.check() is False
        clock.now = T0 + 62 * DAY
        assert await again.keeper.check() is True
    finally:
        await again.close()
    assert len(await provider.token_calls()) == 2


async def test_grant_risk_reports_an_idle_grant_before_it_expires(
    provider: RunningProvider, http: aiohttp.ClientSession, tmp_path: Path,
    policies: dict[str, Policy],
) -> None:
    store = await seeded_store(tmp_path, (await provider.new_grant())["refresh_token"])
    clock = Clock(T0)
    source = OAuth2Source(CONN, ms_config(provider, tmp_path), store, policies["microsoft"],
                          http, clock)
    plain = OAuth2Source(CONN, ms_config(provider, tmp_path, keep_alive=KeepAliveConfig()),
                         store, policies["microsoft"], http, clock)
    try:
        assert source.grant_risk() is None  # nothing read yet
        await source.lease()  # redeemed at T0
        await plain.lease()
        assert source.grant_expires_at() == T0 + 90 * DAY
        assert source.grant_risk(T0 + 75 * DAY) is None
        risk = source.grant_risk(T0 + 77 * DAY)
        assert risk == GrantRisk(CONN, "idle-grant-expiring", risk.detail if risk else "",
                                 T0 + 90 * DAY)
        assert risk is not None and "2023-11-14" in risk.detail
        clock.now = T0 + 80 * DAY
        assert source.grant_risk() is not None  # default: the source's clock
        # Without keep-alive nothing is reported (the lifetime is unknown).
        assert plain.grant_risk(T0 + 89 * DAY) is None and plain.grant_expires_at() is None
    finally:
        await source.close()
        await plain.close()


async def test_failing_keep_alive_is_refresh_failing_until_a_refresh_works(
    http: aiohttp.ClientSession, tmp_path: Path, policies: dict[str, Policy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = await seeded_store(tmp_path, RT_CANARY)
    (tmp_path / "secret").write_text(CLIENT_SECRET)
    clock = Clock(T0 + 31 * DAY)
    async with running_token_endpoint(FakeTokenEndpoint(valid={RT_CANARY}, down=True)) as ep:
        config = OAuth2SourceConfig(
            kind="oauth2", token_url=ep.url, client_id=CLIENT_ID,
            client_secret_file=tmp_path / "secret", keep_alive=KeepAliveConfig(enabled=True),
        )
        source = OAuth2Source(CONN, config, store, policies["oauth2"], http, clock)
        keeper = source.keeper
        assert keeper is not None
        try:
            for expected in (1, 2):
                assert await keeper.check() is False
                assert keeper.failures == expected and source.grant_risk() is None
            await keeper.check()
            risk = source.grant_risk()
            assert risk is not None and risk.reason == "refresh-failing"
            assert risk.expires_at == T0 + 90 * DAY and "3 keep-alive" in risk.detail
            ep.down = False
            assert await keeper.check() is True
            assert keeper.failures == 0 and source.grant_risk() is None
        finally:
            await source.close()
    assert "keep-alive check 3 in a row" in caplog.text
    for secret in (RT_CANARY, CLIENT_SECRET, "rt-0001", "at-0001"):
        assert secret not in caplog.text
        assert secret not in repr(source) and secret not in repr(keeper)


async def test_dead_grant_is_logged_not_counted(
    provider: RunningProvider, http: aiohttp.ClientSession, tmp_path: Path,
    policies: dict[str, Policy], caplog: pytest.LogCaptureFixture,
) -> None:
    store = await seeded_store(tmp_path, (await provider.new_grant())["refresh_token"])
    await provider.fault("kill_grant")
    source = OAuth2Source(CONN, ms_config(provider, tmp_path), store, policies["microsoft"],
                          http, Clock(T0 + 40 * DAY))
    assert source.keeper is not None
    try:
        assert await source.keeper.check() is False
        assert source.keeper.failures == 0
        assert source.grant_risk() is None  # dead, not at risk: a recovery case covers it
        assert await source.keeper.check() is False
    finally:
        await source.close()
    assert "keep-alive: the grant of conn_ms is dead (AADSTS700082)" in caplog.text
    assert len(await provider.token_calls()) == 1  # the dead verdict is not asked again


async def test_keep_alive_retries_an_unsaved_rotation(
    provider: RunningProvider, http: aiohttp.ClientSession, tmp_path: Path,
    policies: dict[str, Policy],
) -> None:
    async with running_fake_vault() as vault:
        (tmp_path / "vault-token").write_text(vault.issue_token())
        grant_store = VaultGrantStoreConfig(
            kind="vault", address=vault.url, path="grants/conn_ms",
            token_file=tmp_path / "vault-token",
        )
        backend: GrantBackend = VaultGrantStore(grant_store, http)
        seed = (await provider.new_grant())["refresh_token"]
        await backend.write(CONN, Grant(refresh_token=SecretStr(seed), obtained_at=T0), 0)
        source = OAuth2Source(
            CONN, ms_config(provider, tmp_path, grant_store=grant_store), backend,
            policies["microsoft"], http, Clock(T0),
        )
        keeper = source.keeper
        assert keeper is not None
        try:
            vault.fail_writes.append(503)
            with pytest.raises(CredentialUnavailable):
                await source.lease()
            # Not idle at all, but the rotation is only in memory: keep-alive stores it...
            vault.fail_writes += [503, 503, 503]
            for _ in range(3):
                assert await keeper.check() is False
            # ...and a Vault that keeps refusing it is a failing refresh, not a success.
            risk = source.grant_risk()
            assert keeper.failures == 3 and risk is not None
            assert risk.reason == "refresh-failing"
            assert await keeper.check() is True
            assert keeper.failures == 0
        finally:
            await source.close()
        _, data = vault.latest("secret", "grants/conn_ms")
        [live] = provider.state.grants.values()
        assert data is not None and data["refresh_token"] == live.refresh_token
        assert [w.status for w in vault.writes] == [200, 503, 503, 503, 503, 200]


# -- the real background task -----------------------------------------------------------------


async def test_background_task_refreshes_an_idle_grant(
    provider: RunningProvider, http: aiohttp.ClientSession, tmp_path: Path,
    policies: dict[str, Policy],
) -> None:
    await seeded_store(tmp_path, (await provider.new_grant())["refresh_token"], time.time())
    tiny = KeepAliveConfig(
        enabled=True, idle_refresh_after=timedelta(seconds=0.3),
        grant_lifetime=timedelta(hours=1), warn_before=timedelta(minutes=1),
        check_every=timedelta(seconds=0.05),
    )
    conn = ConnectionConfig(
        id=CONN, provider="microsoft", base_url=provider.url, allowed_hosts=["127.0.0.1"],
        source=ms_config(provider, tmp_path, keep_alive=tiny),
    )
    source = build_source(conn, Settings(data_dir=tmp_path / "data"), policies["microsoft"], http)
    assert isinstance(source, OAuth2Source) and source.keeper is not None
    assert source.keeper.running  # build_source started it; no lease was ever asked for
    grants = GrantStore(tmp_path / "data")
    try:
        # Done means saved: the token call alone is not (closing right after it would cancel
        # the refresh before its rotation is written).
        async with asyncio.timeout(30):
            while (stored := await grants.load(CONN)) is None or stored.last_refreshed_at is None:
                await asyncio.sleep(0.05)
    finally:
        await source.close()
    assert not source.keeper.running
    [first, *_] = await provider.token_calls()
    assert (first["grant_type"], first["status"]) == ("refresh_token", 200)


# -- /metrics ---------------------------------------------------------------------------------


def test_metric_renders_seconds_until_expiry() -> None:
    metrics = Metrics()
    metrics.grant_expires_in = {"conn_a": 1234.5}
    text = metrics.render().decode()
    assert 'revive_grant_expires_in_seconds{connection="conn_a"} 1234.5' in text


async def test_sidecar_exports_grant_expiry_on_metrics(
    provider: RunningProvider, tmp_path: Path
) -> None:
    grant = await provider.new_grant()
    settings = await asyncio.to_thread(
        lab_settings, tmp_path / "data", provider.url, refresh_token=grant["refresh_token"]
    )
    conn = settings.connections[0]
    assert isinstance(conn.source, OAuth2SourceConfig)
    source = conn.source.model_copy(
        update={"keep_alive": KeepAliveConfig(enabled=True, check_every=timedelta(seconds=0.05))}
    )
    settings = settings.model_copy(
        update={"connections": [conn.model_copy(update={"source": source})]}
    )
    pattern = re.compile(
        rf'revive_grant_expires_in_seconds{{connection="{LAB_CONNECTION}"}} ([0-9.e+]+)'
    )
    async with running_sidecar(settings) as sidecar, aiohttp.ClientSession() as client:
        async with asyncio.timeout(30):
            while True:  # the first keep-alive check reads the grant in the background
                async with client.get(f"{sidecar.url}/metrics") as resp:
                    found = pattern.search(await resp.text())
                if found:
                    break
                await asyncio.sleep(0.05)
    assert 89 * DAY < float(found.group(1)) <= 90 * DAY
