"""What only the SQLite backend promises: WAL, its file, migrations, group commit, crash safety."""

from __future__ import annotations

import asyncio
import functools
import sys
import textwrap
from pathlib import Path

import aiosqlite
import pytest

from revive.errors import ConfigError, Fenced
from revive.store import ClaimRequest, SqliteStore, StoreUnavailable, open_store
from revive.store import _sqlite_rows as rows
from revive.store import migrate
from revive.store.factory import sqlite_path
from revive.store.migrate import MIGRATIONS

OWNER = "sidecar-a"


def req(key: str, epoch: int = 1) -> ClaimRequest:
    return ClaimRequest(
        idempotency_key=key, run_id="run_1", action_key=f"act_{key}", checkpoint_id="chk",
        connection_id="conn_1", fingerprint="fp", owner=OWNER, epoch=epoch, generation=1,
    )


async def prepared(store: SqliteStore) -> None:
    await store.ensure_connection("conn_1")
    await store.mint_check("run_1", 1)


async def pragma(path: Path, name: str) -> object:
    async with aiosqlite.connect(path) as conn, conn.execute(f"PRAGMA {name}") as cursor:
        row = await cursor.fetchone()
        assert row is not None
        return row[0]


async def test_open_store_creates_the_file_under_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "nested"
    async with open_store(f"sqlite:///{data_dir}/revive.db") as store:
        await store.ping()
        assert isinstance(store, SqliteStore)
        assert store.path == data_dir / "revive.db"
    assert (data_dir / "revive.db").is_file()


async def test_wal_mode_is_on(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "revive.db"):
        assert await pragma(tmp_path / "revive.db", "journal_mode") == "wal"


async def test_commits_are_durable(tmp_path: Path) -> None:
    """``synchronous`` is per connection, so ask the writer process's own one (FULL = 2)."""
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        for pragma, expected in (("synchronous", 2), ("foreign_keys", 1)):
            ask = functools.partial(rows.fetch_one, sql=f"PRAGMA {pragma}", params=())
            assert await store._write(ask) == (expected,)  # noqa: SLF001 - that connection only


async def test_migrations_are_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "revive.db"
    latest = len(MIGRATIONS)
    async with SqliteStore.open(path) as store:
        assert await store.schema_version() == latest
        await prepared(store)
        await store.claim(req("key_1"))
    async with SqliteStore.open(path) as store:  # a restart: nothing re-applied, nothing lost
        assert await store.schema_version() == latest
        assert (await store.get_action("key_1")) is not None
    sql = "SELECT version, name FROM schema_version ORDER BY version"
    async with aiosqlite.connect(path) as conn, conn.execute(sql) as cursor:
        assert list(await cursor.fetchall()) == [(i + 1, n) for i, n in enumerate(MIGRATIONS)]


async def test_an_older_database_is_upgraded_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "revive.db"
    monkeypatch.setattr(migrate, "MIGRATIONS", MIGRATIONS[:1])
    async with SqliteStore.open(path) as store:
        assert await store.schema_version() == 1
        await prepared(store)
        await store.claim(req("key_1"))
    monkeypatch.undo()
    async with SqliteStore.open(path) as store:
        assert await store.schema_version() == len(MIGRATIONS)
        assert (await store.get_action("key_1")) is not None
        assert await store.sweep_in_flight(OWNER) == 1  # the partial index serves the sweep


async def test_group_commit_batches_concurrent_claims(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        await prepared(store)
        before = store.stats.commits
        outcomes = await asyncio.gather(*(store.claim(req(f"key_{i}")) for i in range(64)))
        commits = store.stats.commits - before
        assert all(o.kind == "claimed" for o in outcomes)
        assert commits <= 4, f"64 claims took {commits} commits"
        assert store.stats.largest_batch >= 16
        assert await store.count_actions("in_flight") == 64
        assert len(await store.list_actions("run_1")) == 64


async def test_one_refusal_does_not_spoil_its_batch(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        await prepared(store)
        before = store.stats.commits
        results = await asyncio.gather(
            *(store.claim(req(f"key_{i}", epoch=1 if i % 2 else 7)) for i in range(20)),
            return_exceptions=True,
        )
        assert store.stats.commits - before <= 2
        assert all(isinstance(r, Fenced) for r in results[0::2])
        assert not any(isinstance(r, BaseException) for r in results[1::2])
        kept = {a.idempotency_key for a in await store.list_actions("run_1")}
        assert kept == {f"key_{i}" for i in range(1, 20, 2)}


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        pass
    with pytest.raises(StoreUnavailable):
        await store.ensure_connection("conn_1")


async def test_a_cancelled_caller_spoils_nothing(tmp_path: Path) -> None:
    """A caller that gives up may or may not have its write kept; everyone else is unaffected."""
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        await prepared(store)
        tasks = [asyncio.ensure_future(store.claim(req(f"key_{i}"))) for i in range(32)]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r.kind == "claimed" for r in results[1::2])  # type: ignore[union-attr]
        assert (await store.claim(req("key_after"))).kind == "claimed"
        kept = {a.idempotency_key for a in await store.list_actions("run_1")}
        assert {f"key_{i}" for i in range(1, 32, 2)} | {"key_after"} <= kept


async def test_unopenable_database_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    with pytest.raises(StoreUnavailable):
        async with SqliteStore.open(tmp_path / "blocker" / "revive.db"):
            pass


CRASHING_SIDECAR = textwrap.dedent(
    """
    import asyncio, os, sys
    from revive.store import ClaimRequest, SqliteStore

    async def main(path):
        async with SqliteStore.open(path) as store:
            await store.ensure_connection("conn_1")
            await store.mint_check("run_1", 1)
            acked = 0

            def ack(task):
                nonlocal acked
                sys.stdout.write(task.result().action.idempotency_key + "\\n")
                sys.stdout.flush()
                acked += 1
                if acked == 100:
                    os._exit(9)  # die mid-flight: no close, no cleanup, batches pending

            for i in range(400):
                task = asyncio.ensure_future(store.claim(ClaimRequest(
                    f"key_{i}", "run_1", "act", "chk", "conn_1", "fp", "sidecar-a", 1, 1)))
                task.add_done_callback(ack)
                if i % 8 == 7:
                    await asyncio.sleep(0)
            await asyncio.sleep(30)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_a_crash_loses_no_acknowledged_claim_and_the_sweep_recovers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "revive.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_SIDECAR, str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode == 9, stderr.decode()
    acked = stdout.decode().split()
    assert len(acked) == 100

    async with SqliteStore.open(path) as store:
        for key in acked:
            action = await store.get_action(key)
            assert action is not None and action.state == "in_flight", key
        stale = await store.count_actions("in_flight")
        assert stale >= len(acked)
        assert await store.sweep_in_flight("sidecar-b") == 0
        assert await store.sweep_in_flight(OWNER) == stale
        assert await store.count_actions("unknown") == stale
        assert await store.count_actions("in_flight") == 0
        assert await store.sweep_in_flight(OWNER) == 0


@pytest.mark.parametrize(
    ("url", "expected"),
    [("sqlite:///rel/revive.db", Path("rel/revive.db")),
     ("sqlite:////abs/revive.db", Path("/abs/revive.db"))],
)
def test_sqlite_url_paths(url: str, expected: Path) -> None:
    assert sqlite_path(url) == expected


@pytest.mark.parametrize(
    "url", ["sqlite://host/x.db", "sqlite:///:memory:", "sqlite://", "mysql://db/x",
            "postgresql://user@host/db?schema=not-a-name", "postgres://host/db?pool_size=0"],
)
async def test_unusable_store_urls_fail_at_start_up(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        async with open_store(url):
            pass
    assert refused.value.field == "store"
