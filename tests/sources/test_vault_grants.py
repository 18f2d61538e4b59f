"""The oauth2 refresher's grant in Vault KV v2: check-and-set write-back shared by sidecars.

Two ``OAuth2Source`` instances, each with its own ``VaultGrantStore`` (its own Vault client),
stand for two sidecars sharing one fake Vault and one provider.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr, ValidationError

from revive.classify import Policy, load_policies
from revive.config import (
    ConnectionConfig,
    FileGrantStoreConfig,
    OAuth2SourceConfig,
    Settings,
    VaultGrantStoreConfig,
)
from revive.errors import CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.lab.provider import ProviderState
from revive.lab.provider_state import TokenCheck
from revive.lab.settings import default_policy_dir
from revive.sources import (
    Grant,
    GrantConflict,
    Lease,
    OAuth2Source,
    StoredGrant,
    VaultGrantStore,
    build_source,
)
from revive.testing.fake_vault import FakeVault, running_fake_vault
from revive.testing.provider import RunningProvider
from revive.testing.token_endpoint import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeTokenEndpoint,
    running_token_endpoint,
)

CONN = "conn_ms"
PATH = "revive/grants/conn_ms"
RT_CANARY = "rt-canary-vault-5e9d12"


@pytest.fixture(scope="module")
def policies() -> dict[str, Policy]:
    return load_policies(default_policy_dir())


@pytest.fixture
async def vault() -> AsyncIterator[FakeVault]:
    async with running_fake_vault() as fake:
        yield fake


def store_config(vault: FakeVault, tmp_path: Path, **kw: Any) -> VaultGrantStoreConfig:
    token_file = tmp_path / "vault-token"
    if not token_file.exists():
        token_file.write_text(vault.issue_token() + "\n")
    return VaultGrantStoreConfig(
        kind="vault", address=vault.url, path=PATH, token_file=token_file, **kw
    )


@dataclass
class Sidecars:
    """Sources that share one Vault path, as replicas of one deployment would."""

    vault: FakeVault
    tmp: Path
    http: aiohttp.ClientSession
    classifier: Policy
    token_url: str
    client_id: str
    client_secret: str
    sources: list[OAuth2Source] = field(default_factory=list)

    def config(self, **overrides: Any) -> OAuth2SourceConfig:
        secret = self.tmp / "client-secret"
        secret.write_text(self.client_secret + "\n")
        values: dict[str, Any] = {
            "kind": "oauth2",
            "token_url": self.token_url,
            "client_id": self.client_id,
            "client_secret_file": secret,
            "scopes": ["offline_access", "Mail.Send"],
            "token_timeout_seconds": 5.0,
            "grant_store": store_config(self.vault, self.tmp),
        }
        values.update(overrides)
        return OAuth2SourceConfig(**values)

    def source(self, http: aiohttp.ClientSession | None = None) -> OAuth2Source:
        config = self.config()
        assert isinstance(config.grant_store, VaultGrantStoreConfig)
        session = http or self.http
        store = VaultGrantStore(config.grant_store, session, owner=CONN)
        src = OAuth2Source(CONN, config, store, self.classifier, session)
        self.sources.append(src)
        return src

    async def seed(self, refresh_token: str, generation: int = 1) -> None:
        store = VaultGrantStore(store_config(self.vault, self.tmp), self.http, owner=CONN)
        grant = Grant(
            refresh_token=SecretStr(refresh_token), generation=generation, obtained_at=1.0
        )
        assert await store.write(CONN, grant, 0) == 1

    def stored(self) -> dict[str, Any]:
        _, data = self.vault.latest("secret", PATH)
        assert data is not None
        return data

    async def close(self) -> None:
        for src in self.sources:
            await src.close()


@pytest.fixture
async def ms_sidecars(
    vault: FakeVault,
    provider: RunningProvider,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    policies: dict[str, Policy],
) -> AsyncIterator[Sidecars]:
    """Sidecars against the fake Microsoft provider (a rotated token is revoked at once)."""
    sidecars = Sidecars(
        vault, tmp_path, http, policies["microsoft"], provider.token_url,
        provider.config.client_id, provider.config.client_secret,
    )
    yield sidecars
    await sidecars.close()


@pytest.fixture
async def lenient(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path, policies: dict[str, Policy]
) -> AsyncIterator[tuple[Sidecars, FakeTokenEndpoint]]:
    """Sidecars against an Entra-like endpoint that keeps rotated tokens valid."""
    async with running_token_endpoint(FakeTokenEndpoint(valid={RT_CANARY}, lenient=True)) as ep:
        sidecars = Sidecars(
            vault, tmp_path, http, policies["oauth2"], ep.url, CLIENT_ID, CLIENT_SECRET
        )
        yield sidecars, ep
        await sidecars.close()


def current_rt(state: ProviderState) -> str:
    """The refresh token the provider accepts now (one grant per test)."""
    [grant] = [g for g in state.grants.values() if g.alive]
    return grant.refresh_token


def paused_session(
    gate: asyncio.Event, reached: asyncio.Event, path_suffix: str
) -> aiohttp.ClientSession:
    """A session whose requests to ``*path_suffix`` wait for ``gate`` once their answer is in.

    The provider has then acted (e.g. rotated the token) but the source has not seen the
    answer: the window in which another sidecar can write first.
    """

    async def on_end(
        session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        if params.method == "POST" and params.url.path.endswith(path_suffix):
            reached.set()
            await gate.wait()

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_end)
    return aiohttp.ClientSession(trace_configs=[trace])


async def wait_for(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.01)


# -- the backend ------------------------------------------------------------------------------


async def test_store_reads_versions_and_refuses_a_stale_write(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = VaultGrantStore(store_config(vault, tmp_path), http, owner=CONN)
    assert await store.read(CONN) == StoredGrant(None, 0)
    grant = Grant(refresh_token=SecretStr(RT_CANARY), obtained_at=1.0, last_refreshed_at=2.0)
    assert await store.write(CONN, grant, 0) == 1
    assert await store.read(CONN) == StoredGrant(grant, 1)
    assert vault.latest("secret", PATH)[1] == {
        "format": 1, "connection_id": CONN, "refresh_token": RT_CANARY, "scope": None,
        "generation": 1, "obtained_at": 1.0, "rotated_at": None, "last_refreshed_at": 2.0,
    }
    with pytest.raises(GrantConflict) as info:
        await store.write(CONN, grant, 0)
    assert info.value.provider_code == "vault_cas_mismatch"
    assert [(w.cas, w.status, w.version) for w in vault.writes] == [(0, 200, 1), (0, 400, None)]
    assert vault.writes[-1].cas_conflict
    # None (after an unreadable record) still writes check-and-set, on the current version.
    assert await store.write(CONN, grant, None) == 2
    assert vault.writes[-1].cas == 1


async def test_store_refuses_another_connections_record_and_maps_deletion(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = VaultGrantStore(store_config(vault, tmp_path), http, owner=CONN)
    vault.put("secret", PATH, {"connection_id": "conn_other", "refresh_token": RT_CANARY})
    with pytest.raises(CredentialMisconfigured) as info:
        await store.read(CONN)
    vault.put("secret", PATH, {"connection_id": CONN, "refresh_token": 42, "obtained_at": 1})
    with pytest.raises(CredentialMisconfigured) as bad:
        await store.read(CONN)
    vault.delete_latest("secret", PATH)
    assert await store.read(CONN) == StoredGrant(None, 2)  # cas must name the deleted version
    for text in (str(info.value), str(bad.value), repr(store)):
        assert RT_CANARY not in text


async def test_store_is_transient_while_vault_is_sealed(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = VaultGrantStore(store_config(vault, tmp_path), http, owner=CONN)
    vault.sealed = True
    with pytest.raises(CredentialUnavailable) as info:
        await store.read(CONN)
    assert info.value.provider_code == "vault_sealed"


def test_config_selects_the_grant_store(tmp_path: Path) -> None:
    base = {"kind": "oauth2", "token_url": "https://login.example/token", "client_id": "c"}
    assert OAuth2SourceConfig(**base).grant_store == FileGrantStoreConfig()
    vaulted = OAuth2SourceConfig(
        **base,
        grant_store={"kind": "vault", "address": "https://vault:8200", "path": "g/c",
                     "auth": "kubernetes", "kubernetes_role": "revive"},
    )
    assert isinstance(vaulted.grant_store, VaultGrantStoreConfig)
    assert vaulted.grant_store.settle_seconds == 3.0
    with pytest.raises(ValidationError, match="token_file"):
        OAuth2SourceConfig(
            **base, grant_store={"kind": "vault", "address": "https://vault:8200", "path": "p"}
        )


async def test_build_source_keeps_the_seed_in_vault(
    ms_sidecars: Sidecars, provider: RunningProvider, tmp_path: Path
) -> None:
    grant = await provider.new_grant()
    seed = tmp_path / "seed"
    seed.write_text(grant["refresh_token"] + "\n")
    conn = ConnectionConfig(
        id=CONN, provider="microsoft", base_url=provider.url, allowed_hosts=["127.0.0.1"],
        source=ms_sidecars.config(refresh_token_file=seed),
    )
    source = build_source(
        conn, Settings(data_dir=tmp_path / "data"), ms_sidecars.classifier, ms_sidecars.http
    )
    assert isinstance(source, OAuth2Source)
    ms_sidecars.sources.append(source)
    lease = await source.lease()
    assert provider.state.check_access(lease.access_token)[0] is TokenCheck.VALID
    # Sealed into Vault with cas 0, then the rotation on top; nothing under data_dir.
    assert [(w.cas, w.version) for w in ms_sidecars.vault.writes] == [(0, 1), (1, 2)]
    assert ms_sidecars.stored()["refresh_token"] == current_rt(provider.state)
    assert not (tmp_path / "data" / "grants").exists()


# -- two sidecars, one rotating grant ---------------------------------------------------------


async def test_concurrent_refreshes_of_two_sidecars_never_kill_the_grant(
    ms_sidecars: Sidecars, provider: RunningProvider
) -> None:
    await ms_sidecars.seed((await provider.new_grant())["refresh_token"])
    a, b = ms_sidecars.source(), ms_sidecars.source()
    leases = list(await asyncio.gather(a.lease(), b.lease()))
    for _ in range(5):
        leases = list(await asyncio.gather(
            a.refresh(leases[0]), b.refresh(leases[1]), a.lease(), b.lease()
        ))[:2]
    for lease in (*leases, await a.lease(), await b.lease()):
        assert provider.state.check_access(lease.access_token)[0] is TokenCheck.VALID
    # Every successful redemption was stored, in order, and the last one is the live token.
    token_calls = await provider.token_calls()
    ok = [c for c in token_calls if c["status"] == 200]
    assert ms_sidecars.vault.latest("secret", PATH)[0] == 1 + len(ok)
    assert ms_sidecars.stored()["refresh_token"] == current_rt(provider.state)
    assert all(c["grant_type"] == "refresh_token" for c in token_calls)


async def test_refresh_waits_for_the_winner_to_store_its_rotation(
    ms_sidecars: Sidecars, provider: RunningProvider
) -> None:
    await ms_sidecars.seed((await provider.new_grant())["refresh_token"])
    gate, reached = asyncio.Event(), asyncio.Event()
    slow_http = paused_session(gate, reached, "/token")
    try:
        a, b = ms_sidecars.source(slow_http), ms_sidecars.source()
        winner = asyncio.create_task(a.lease())
        await reached.wait()  # A redeemed the token; its write to Vault has not happened
        loser = asyncio.create_task(b.lease())
        # B presents the consumed token, is refused, and keeps re-reading Vault meanwhile.
        await wait_for(lambda: any(call.status == 400 for call in provider.state.calls))
        gate.set()
        lease_a, lease_b = await asyncio.gather(winner, loser)
    finally:
        gate.set()
        await slow_http.close()
    for lease in (lease_a, lease_b):
        assert provider.state.check_access(lease.access_token)[0] is TokenCheck.VALID
    assert ms_sidecars.stored()["refresh_token"] == current_rt(provider.state)
    assert [(w.cas, w.status) for w in ms_sidecars.vault.writes] == [(0, 200), (1, 200), (2, 200)]


async def test_reconnect_elsewhere_wins_the_race_and_is_not_overwritten(
    ms_sidecars: Sidecars, provider: RunningProvider
) -> None:
    await ms_sidecars.seed((await provider.new_grant())["refresh_token"])
    gate, reached = asyncio.Event(), asyncio.Event()
    slow_http = paused_session(gate, reached, "/token")
    try:
        a, b = ms_sidecars.source(), ms_sidecars.source(slow_http)
        refreshing = asyncio.create_task(b.lease())
        await reached.wait()  # B rotated generation 1 at the provider, not yet in Vault
        fresh = await provider.new_grant()  # the user consents again, on sidecar A
        installed = await a.install_grant(
            fresh["refresh_token"], "Mail.Send", fresh["access_token"], fresh["expires_in"]
        )
        gate.set()
        lease_b = await refreshing
    finally:
        gate.set()
        await slow_http.close()
    assert installed.generation == 2
    # B's write of generation 1 lost; it adopted generation 2 and leased from it.
    writes = [(w.cas, w.status) for w in ms_sidecars.vault.writes]
    assert writes == [(0, 200), (1, 200), (1, 400), (2, 200)]
    assert ms_sidecars.vault.writes[2].cas_conflict
    assert lease_b.generation == 2
    assert provider.state.check_access(lease_b.access_token)[0] is TokenCheck.VALID
    stored = ms_sidecars.stored()
    assert stored["generation"] == 2
    assert stored["refresh_token"] in {g.refresh_token for g in provider.state.grants.values()}
    # A reads Vault before its next redemption and uses B's rotation of generation 2.
    lease_a = await a.refresh(installed)
    assert lease_a.generation == 2
    assert ms_sidecars.stored()["refresh_token"] == live_rt_of(provider.state, lease_a)


def live_rt_of(state: ProviderState, lease: Lease) -> str:
    """The live refresh token of the grant ``lease``'s access token was minted from."""
    check, record = state.check_access(lease.access_token)
    assert check is TokenCheck.VALID and record is not None
    return state.grants[record.grant_id].refresh_token


async def test_cas_conflict_adopts_the_winners_rotation(
    lenient: tuple[Sidecars, FakeTokenEndpoint],
) -> None:
    sidecars, endpoint = lenient
    await sidecars.seed(RT_CANARY)
    gate, reached = asyncio.Event(), asyncio.Event()
    async with paused_session(gate, reached, "/token") as slow_http:
        a, b = sidecars.source(), sidecars.source(slow_http)
        refreshing = asyncio.create_task(b.lease())
        await reached.wait()  # B redeemed RT_CANARY -> rt-0001 (Entra keeps both valid)
        lease_a = await a.lease()  # A redeemed RT_CANARY too -> rt-0002, stored first
        gate.set()
        lease_b = await refreshing
        assert endpoint.refreshes == [RT_CANARY, RT_CANARY]
        assert [(w.cas, w.status) for w in sidecars.vault.writes] == [
            (0, 200), (1, 200), (1, 400)
        ]
        # B handed out the access token it obtained but kept A's rotation, not its own.
        assert (lease_a.access_token, lease_b.access_token) == ("at-0002", "at-0001")
        assert sidecars.stored()["refresh_token"] == "rt-0002"
        await b.refresh(lease_b)
        assert endpoint.refreshes[-1] == "rt-0002"
        assert sidecars.stored()["refresh_token"] == "rt-0003"


# -- Vault failing during write-back ----------------------------------------------------------


async def test_vault_down_during_write_back_keeps_the_rotation_for_the_retry(
    ms_sidecars: Sidecars, provider: RunningProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await ms_sidecars.seed((await provider.new_grant())["refresh_token"])
    source = ms_sidecars.source()
    ms_sidecars.vault.fail_writes.append(503)
    with pytest.raises(CredentialUnavailable) as info:
        await source.lease()
    assert info.value.provider_code == "vault_sealed"
    # The provider rotated; Vault still holds the consumed token; memory holds the new one.
    assert ms_sidecars.vault.latest("secret", PATH)[0] == 1
    assert ms_sidecars.stored()["refresh_token"] != current_rt(provider.state)

    lease = await source.lease()
    assert provider.state.check_access(lease.access_token)[0] is TokenCheck.VALID
    assert ms_sidecars.stored()["refresh_token"] == current_rt(provider.state)
    assert [(w.cas, w.status) for w in ms_sidecars.vault.writes] == [(0, 200), (1, 503), (1, 200)]
    assert [c["status"] for c in await provider.token_calls()] == [200, 200]
    live = current_rt(provider.state)
    assert live not in caplog.text and live not in str(info.value)


async def test_lost_write_answer_is_resolved_by_the_next_write(
    ms_sidecars: Sidecars, provider: RunningProvider
) -> None:
    await ms_sidecars.seed((await provider.new_grant())["refresh_token"])
    source = ms_sidecars.source()
    ms_sidecars.vault.lose_write_answers = 1
    with pytest.raises(CredentialUnavailable):
        await source.lease()  # the write landed (version 2), its answer did not
    lease = await source.lease()
    assert provider.state.check_access(lease.access_token)[0] is TokenCheck.VALID
    # cas 1 now conflicts with our own earlier write; ours goes on top of it.
    writes = [(w.cas, w.status, w.version) for w in ms_sidecars.vault.writes]
    assert writes == [(0, 200, 1), (1, 504, 2), (1, 400, None), (2, 200, 3)]
    assert ms_sidecars.stored()["refresh_token"] == current_rt(provider.state)


async def test_grant_removed_from_vault_is_no_grant(
    ms_sidecars: Sidecars, provider: RunningProvider
) -> None:
    await ms_sidecars.seed((await provider.new_grant())["refresh_token"])
    source = ms_sidecars.source()
    first = await source.lease()
    ms_sidecars.vault.delete_latest("secret", PATH)  # an operator disconnects it
    with pytest.raises(DeadGrant) as info:
        await source.refresh(first)
    assert info.value.provider_code == "no_grant"
