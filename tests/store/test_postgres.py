"""What only the PostgreSQL backend promises: several sidecars (pools) on one database.

Each ``PostgresStore`` here is its own pool, i.e. its own "sidecar"; the races the contract suite
runs inside one store are run across two, where only row-level compare-and-set can decide.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from revive.errors import CapabilityInvalid, ConfigError, Fenced, InFlight
from revive.store import ClaimRequest, StoreUnavailable, open_store
from revive.store._pg_connect import parse_url
from revive.store.migrate import MIGRATIONS
from revive.store.postgres import PostgresStore
from revive.testing.postgres import POSTGRES_URL, with_schema
from tests.store.test_conformance import World, draft, ready_case_from_open


@pytest.fixture
async def two(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two sidecars sharing the session's schema."""
    async with PostgresStore.open(postgres_url) as a, PostgresStore.open(postgres_url) as b:
        yield a, b


async def new_world(store: PostgresStore) -> World:
    world = World(f"run_{uuid.uuid4().hex[:12]}", f"conn_{uuid.uuid4().hex[:12]}")
    await store.ensure_connection(world.connection_id)
    await store.mint_check(world.run_id, 1)
    return world


async def test_concurrent_start_up_applies_each_migration_once(fresh_schema: str) -> None:
    url = with_schema(POSTGRES_URL, fresh_schema)

    async def start() -> int | None:
        async with PostgresStore.open(url) as store:
            return await store.schema_version()

    versions = await asyncio.gather(*(start() for _ in range(4)))
    assert versions == [int(MIGRATIONS[-1].split("_", 1)[0])] * 4
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        applied = await conn.fetch(
            f'SELECT version, name FROM "{fresh_schema}".schema_version ORDER BY version'
        )
    finally:
        await conn.close()
    assert [r["name"] for r in applied] == list(MIGRATIONS)


async def test_open_store_selects_postgres_for_both_schemes(postgres_url: str) -> None:
    for url in (postgres_url, postgres_url.replace("postgresql://", "postgres://", 1)):
        async with open_store(url) as store:
            assert isinstance(store, PostgresStore)
            await store.ping()


async def test_fifty_redemptions_over_two_sidecars_admit_one(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    world = await new_world(a)
    opened, _ = await a.open_case(draft(world))
    case = await ready_case_from_open(b, world, opened)
    jti = world.key("jti_shared")
    results = await asyncio.gather(
        *((a, b)[i % 2].redeem(jti, 9e9, case.case_id, world.run_id, 1, f"w{i}")
          for i in range(50)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    assert len(won) == 1
    assert all(isinstance(r, CapabilityInvalid) for r in results if isinstance(r, BaseException))
    assert (await b.get_run(world.run_id)).epoch == 2  # type: ignore[union-attr]
    assert [t.to_state for t in await a.transitions(case.case_id)][-1] == "resumed"


async def test_claims_of_one_key_over_two_sidecars_admit_one(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    world = await new_world(a)
    key = world.key("key_shared")

    def req(owner: str) -> ClaimRequest:
        return ClaimRequest(
            idempotency_key=key, run_id=world.run_id, action_key="send_mail",
            checkpoint_id="chk_1", connection_id=world.connection_id, fingerprint="fp",
            owner=owner, epoch=1, generation=1,
        )

    results = await asyncio.gather(
        *((a, b)[i % 2].claim(req(f"sidecar-{i}")) for i in range(20)), return_exceptions=True
    )
    claimed = [r for r in results if not isinstance(r, BaseException)]
    assert len(claimed) == 1 and claimed[0].kind == "claimed"
    assert all(isinstance(r, InFlight) for r in results if isinstance(r, BaseException))
    row = await b.get_action(key)
    assert row is not None and (row.state, row.attempts) == ("in_flight", 1)


async def test_a_reconnect_seen_by_one_sidecar_fences_the_other(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    world = await new_world(a)
    await b.record_reconnect(world.connection_id, 1)
    with pytest.raises(Fenced):
        await a.check_fence(world.run_id, 1, world.connection_id, 1)


async def test_an_unreachable_server_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        async with PostgresStore.open("postgresql://postgres@127.0.0.1:1/test"):
            pass


async def test_a_closed_store_is_store_unavailable(postgres_url: str) -> None:
    async with PostgresStore.open(postgres_url) as store:
        pass
    with pytest.raises(StoreUnavailable):
        await store.ping()


def test_url_options_are_ours_and_the_rest_is_libpq() -> None:
    target = parse_url("postgres://u@h:5433/db?schema=s1&sslmode=disable&pool_size=4")
    assert (target.schema, target.pool_size) == ("s1", 4)
    assert target.dsn == "postgresql://u@h:5433/db?sslmode=disable"
    assert parse_url("postgresql://h/db?schema=a", schema="b").schema == "b"
    for bad in ("postgresql://h/db?schema=x;drop", "postgresql://h/db?pool_size=x",
                "mysql://h/db"):
        with pytest.raises(ConfigError):
            parse_url(bad)
