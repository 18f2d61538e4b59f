"""One rotating grant, several refreshers: no refresher declares a live grant dead.

The fake Microsoft provider revokes a rotated refresh token at once, so a refresher that
presents the token another one just redeemed is refused with ``invalid_grant``. Sidecars
sharing ``data_dir`` exclude each other with the grant store's refresh ``flock`` (tested here
with real processes); Vault replicas, which share no lock, re-read and chase the rotation.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from revive.classify import Policy, load_policies
from revive.config import OAuth2SourceConfig, VaultGrantStoreConfig
from revive.errors import CredentialUnavailable
from revive.lab.provider import ProviderState
from revive.lab.provider_state import TokenCheck
from revive.sources import Grant, GrantStore, Lease, OAuth2Source, VaultGrantStore
from revive.testing.fake_vault import running_fake_vault
from revive.testing.provider import RunningProvider
from revive.testing.refresher import RefresherReport, RefresherSpec, lock_holder, run_refreshers

CONN = "conn_ms"
POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
ROUNDS = 30  # refreshes per process


@pytest.fixture(scope="module")
def microsoft() -> Policy:
    return load_policies(POLICY_DIR)["microsoft"]


@pytest.fixture
async def store(provider: RunningProvider, tmp_path: Path) -> GrantStore:
    """The provider's one grant, sealed under ``tmp_path/data`` (version 1)."""
    grant = await provider.new_grant()
    grants = GrantStore(tmp_path / "data")
    await grants.save(
        CONN, Grant(refresh_token=SecretStr(grant["refresh_token"]), obtained_at=1.0)
    )
    return grants


def source_config(provider: RunningProvider, tmp: Path, **kw: Any) -> OAuth2SourceConfig:
    secret = tmp / "client-secret"
    secret.write_text(provider.config.client_secret + "\n")
    return OAuth2SourceConfig(
        kind="oauth2", token_url=provider.token_url, client_id=provider.config.client_id,
        client_secret_file=secret, scopes=["offline_access", "Mail.Send"], **kw,
    )


def current_rt(state: ProviderState) -> str:
    """The refresh token the provider accepts now (one grant per test)."""
    [grant] = [g for g in state.grants.values() if g.alive]
    return grant.refresh_token


def assert_valid(provider: RunningProvider, *leases: Lease) -> None:
    for lease in leases:
        assert provider.state.check_access(lease.access_token)[0] is TokenCheck.VALID


def traced_session(
    gate: asyncio.Event, reached: asyncio.Event, *, nth: int, at_start: bool
) -> aiohttp.ClientSession:
    """A session whose ``nth`` token POST waits for ``gate``: before it is sent (``at_start``)
    or once its answer is in (the provider has rotated; the source has not seen it)."""
    seen = 0

    async def pause(
        session: aiohttp.ClientSession, ctx: SimpleNamespace, params: Any
    ) -> None:
        nonlocal seen
        if params.method == "POST" and params.url.path.endswith("/token"):
            seen += 1
            if seen == nth:
                reached.set()
                await gate.wait()

    trace = aiohttp.TraceConfig()
    (trace.on_request_start if at_start else trace.on_request_end).append(pause)
    return aiohttp.ClientSession(trace_configs=[trace])


# -- sidecars sharing data_dir ------------------------------------------------------------------


async def test_refreshes_in_three_processes_never_kill_the_grant(
    provider: RunningProvider, store: GrantStore, tmp_path: Path
) -> None:
    spec = RefresherSpec(
        connection_id=CONN, data_dir=tmp_path / "data", source=source_config(provider, tmp_path),
        policy_dir=POLICY_DIR, rounds=ROUNDS,
    )
    reports = await run_refreshers(spec, processes=3)
    assert reports == [RefresherReport(ok=ROUNDS, failures={})] * 3
    # Nobody ever presented a revoked token: every token call was a success.
    assert [c["status"] for c in await provider.token_calls()] == [200] * (3 * ROUNDS)
    stored = await store.read(CONN)
    assert stored.grant is not None
    assert stored.grant.refresh_token.get_secret_value() == current_rt(provider.state)
    assert stored.version == 1 + 3 * ROUNDS  # every rotation stored, none overwritten


async def test_a_waiting_source_redeems_the_rotation_of_the_lock_holder(
    provider: RunningProvider, store: GrantStore, http: aiohttp.ClientSession,
    tmp_path: Path, microsoft: Policy,
) -> None:
    config = source_config(provider, tmp_path)
    data = tmp_path / "data"
    gate, reached = asyncio.Event(), asyncio.Event()
    async with traced_session(gate, reached, nth=1, at_start=False) as slow:
        # Separate stores: separate descriptors, which flock treats as separate holders.
        holder = OAuth2Source(CONN, config, GrantStore(data), microsoft, slow)
        impatient = OAuth2Source(CONN, config, GrantStore(data), microsoft, http, lock_wait=0.05)
        waiter = OAuth2Source(CONN, config, GrantStore(data), microsoft, http)
        try:
            first = asyncio.create_task(holder.lease())
            await reached.wait()  # the provider rotated; the holder has not stored it yet
            with pytest.raises(CredentialUnavailable) as info:
                await impatient.lease()
            assert info.value.provider_code == "grant_lock_timeout"
            assert len(await provider.token_calls()) == 1  # the revoked token stayed home
            second = asyncio.create_task(waiter.lease())
            await asyncio.sleep(0.05)  # lets the waiter queue on the lock (passes either way)
            gate.set()
            leases = await asyncio.gather(first, second)
        finally:
            gate.set()
            for source in (holder, impatient, waiter):
                await source.close()
    assert_valid(provider, *leases)
    assert [c["status"] for c in await provider.token_calls()] == [200, 200]
    stored = await store.read(CONN)
    assert stored.grant is not None and stored.version == 3
    assert stored.grant.refresh_token.get_secret_value() == current_rt(provider.state)


async def test_a_stuck_holder_fails_refreshes_transiently_until_it_dies(
    provider: RunningProvider, store: GrantStore, http: aiohttp.ClientSession,
    tmp_path: Path, microsoft: Policy,
) -> None:
    source = OAuth2Source(
        CONN, source_config(provider, tmp_path), store, microsoft, http, lock_wait=0.2
    )
    try:
        async with lock_holder(store.refresh_lock_path(CONN)) as holder:
            with pytest.raises(CredentialUnavailable) as info:
                await source.lease()
            assert info.value.provider_code == "grant_lock_timeout"
            assert await provider.token_calls() == []
            holder.kill()  # SIGKILL: the kernel drops its lock with its descriptors
            await holder.wait()
            assert_valid(provider, await source.lease())
    finally:
        await source.close()
    assert [c["status"] for c in await provider.token_calls()] == [200]


async def test_rotations_that_never_settle_are_transient_not_dead(
    store: GrantStore, http: aiohttp.ClientSession, tmp_path: Path, microsoft: Policy
) -> None:
    """A writer outside the lock (an operator, an older sidecar) rotates under every attempt:
    the grant keeps moving, so it is alive, and the refresh gives up without a verdict."""
    presented: list[str] = []
    answer_ok = False

    async def token(request: web.Request) -> web.Response:
        presented.append(str((await request.post())["refresh_token"]))
        if answer_ok:
            return web.json_response({"access_token": "at-1", "expires_in": 3600})
        moved = Grant(refresh_token=SecretStr(f"rt-moved-{len(presented)}"), obtained_at=2.0)
        await GrantStore(tmp_path / "data").save(CONN, moved)
        return web.json_response(
            {"error": "invalid_grant", "error_codes": [70000],
             "error_description": "AADSTS70000: Provided grant is invalid or malformed."},
            status=400,
        )

    app = web.Application()
    app.router.add_post("/token", token)
    server = TestServer(app)
    await server.start_server()
    config = OAuth2SourceConfig(
        kind="oauth2", token_url=str(server.make_url("/token")), client_id="client-1"
    )
    source = OAuth2Source(CONN, config, store, microsoft, http)
    try:
        with pytest.raises(CredentialUnavailable) as info:
            await source.lease()
        assert info.value.provider_code == "grant_version_conflict"
        initial = presented[0]
        assert presented == [initial, "rt-moved-1", "rt-moved-2", "rt-moved-3"]
        answer_ok = True  # no dead verdict was remembered: the next refresh asks again
        assert (await source.lease()).access_token == "at-1"
        assert presented[-1] == "rt-moved-4"
    finally:
        await source.close()
        await server.close()


# -- Vault replicas: no shared lock, re-read and chase ------------------------------------------


async def test_vault_replica_chases_a_token_rotated_twice_under_it(
    provider: RunningProvider, http: aiohttp.ClientSession, tmp_path: Path, microsoft: Policy
) -> None:
    """B is refused (A rotated), waits for A's write, adopts it, and C redeems that token
    before B does: B is refused again with a live grant and must chase once more."""
    async with running_fake_vault() as vault:
        token_file = tmp_path / "vault-token"
        token_file.write_text(vault.issue_token() + "\n")
        vaulted = VaultGrantStoreConfig(
            kind="vault", address=vault.url, path="revive/grants/conn_ms", token_file=token_file
        )
        config = source_config(provider, tmp_path, grant_store=vaulted)
        seed = (await provider.new_grant())["refresh_token"]
        seed_grant = Grant(refresh_token=SecretStr(seed), obtained_at=1.0)
        assert await VaultGrantStore(vaulted, http).write(CONN, seed_grant, 0) == 1
        a_gate, a_reached, b_gate, b_reached = (asyncio.Event() for _ in range(4))
        async with (
            traced_session(a_gate, a_reached, nth=1, at_start=False) as a_http,
            traced_session(b_gate, b_reached, nth=2, at_start=True) as b_http,
        ):
            a, b, c = (
                OAuth2Source(CONN, config, VaultGrantStore(vaulted, s), microsoft, s)
                for s in (a_http, b_http, http)
            )
            try:
                lease_a = asyncio.create_task(a.lease())
                await a_reached.wait()  # A rotated at the provider, not yet in Vault
                lease_b = asyncio.create_task(b.lease())
                async with asyncio.timeout(10):
                    while len(await provider.token_calls()) < 2:  # B refused, settling
                        await asyncio.sleep(0.01)
                a_gate.set()
                await b_reached.wait()  # B adopted A's rotation and is about to redeem it
                lease_c = await c.lease()  # C redeems A's rotation first
                b_gate.set()
                leases = [await lease_a, await lease_b, lease_c]
            finally:
                a_gate.set()
                b_gate.set()
                for source in (a, b, c):
                    await source.close()
        assert_valid(provider, *leases)
        assert [call["status"] for call in await provider.token_calls()] == [
            200, 400, 200, 400, 200
        ]
        [version, data] = vault.latest("secret", "revive/grants/conn_ms")
        assert data is not None and data["refresh_token"] == current_rt(provider.state)
        assert version == 4  # seed, A's, C's and B's rotations, each on top of the last
