"""The SQLite writer process: what happens when it dies, when its parent dies, on Ctrl-C."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest

from revive.store import ClaimRequest, SqliteStore, StoreUnavailable
from revive.store import _sqlite_rows as rows

OWNER = "sidecar-a"

# Several seconds of work inside SQLite: an operation the writer is still busy with.
SLOW = functools.partial(
    rows.fetch_one,
    sql="WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000000)"
    " SELECT count(*) FROM c",
    params=(),
)


def req(key: str) -> ClaimRequest:
    return ClaimRequest(key, "run_1", f"act_{key}", "chk", "conn_1", "fp", OWNER, 1, 1)


async def prepared(store: SqliteStore) -> None:
    await store.ensure_connection("conn_1")
    await store.mint_check("run_1", 1)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def gone(pid: int, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if not await asyncio.to_thread(alive, pid):
            return True
        await asyncio.sleep(0.02)
    return False


def writer_pid(store: SqliteStore) -> int:
    pid = store._writer.pid  # noqa: SLF001 - the process behind the store
    assert pid is not None
    return pid


async def test_close_stops_the_reader_thread_and_the_writer_process(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        await prepared(store)
        await store.claim(req("key_1"))
        started = set(threading.enumerate()) - before
        ours = [t for t in started if t.name.startswith("revive-sqlite")]
        assert [t.name.split("_")[0] for t in ours] == ["revive-sqlite-reader"]
        writer = writer_pid(store)
        assert alive(writer)
    assert await gone(writer)
    for _ in range(200):
        if not any(t.is_alive() for t in ours):
            break
        await asyncio.sleep(0.01)
    assert not any(t.is_alive() for t in ours)


async def test_a_killed_writer_fails_what_it_held_and_the_next_write_gets_a_new_one(
    tmp_path: Path,
) -> None:
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        await prepared(store)
        first = writer_pid(store)
        busy = asyncio.ensure_future(store._write(SLOW))  # noqa: SLF001 - an operation in hand
        await asyncio.sleep(0.3)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(StoreUnavailable, match="may or may not have committed"):
            await asyncio.wait_for(busy, 10)
        assert await gone(first)

        outcome = await store.claim(req("key_after"))
        assert outcome.kind == "claimed"
        assert writer_pid(store) != first
        assert store.stats.starts == 2
        assert (await store.get_action("key_after")) is not None


async def test_an_operation_that_cannot_reach_the_writer_fails_alone(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        await prepared(store)
        unsendable, claimed = await asyncio.gather(
            store._write(lambda conn: 1),  # noqa: SLF001 - a lambda does not pickle
            store.claim(req("key_1")),
            return_exceptions=True,
        )
        assert isinstance(unsendable, TypeError)
        assert "must pickle" in str(unsendable)
        assert not isinstance(claimed, BaseException) and claimed.kind == "claimed"
        assert store.stats.starts == 1


async def test_ctrl_c_reaches_the_sidecar_not_its_writer(tmp_path: Path) -> None:
    """A terminal's SIGINT goes to the whole process group; the sidecar drains the writer."""
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        await prepared(store)
        pid = writer_pid(store)
        os.kill(pid, signal.SIGINT)
        await asyncio.sleep(0.2)
        assert (await store.claim(req("key_1"))).kind == "claimed"
        assert writer_pid(store) == pid and store.stats.starts == 1


SIDECAR = textwrap.dedent(
    """
    import asyncio, sys
    from revive.store import SqliteStore

    async def main(path):
        async with SqliteStore.open(path) as store:
            await store.ensure_connection("conn_1")
            print(store._writer.pid, flush=True)
            await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_the_writer_does_not_outlive_a_killed_sidecar(tmp_path: Path) -> None:
    sidecar = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SIDECAR, str(tmp_path / "revive.db"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert sidecar.stdout is not None
        line = await asyncio.wait_for(sidecar.stdout.readline(), 60)
        writer = int(line)
        assert alive(writer)
        sidecar.kill()
        await sidecar.wait()
        assert await gone(writer), "the writer process is still running without its sidecar"
    finally:
        if sidecar.returncode is None:
            sidecar.kill()
            await sidecar.wait()


async def test_a_write_cancelled_before_it_left_is_never_sent(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "revive.db") as store:
        await prepared(store)
        task = asyncio.ensure_future(store.claim(req("key_dropped")))
        await asyncio.sleep(0)  # the claim is queued; the frame leaves on the next loop turn
        task.cancel()
        (result,) = await asyncio.gather(task, return_exceptions=True)
        assert isinstance(result, asyncio.CancelledError)
        assert (await store.claim(req("key_kept"))).kind == "claimed"
        assert await store.get_action("key_dropped") is None
        assert not store._writer._waiting  # noqa: SLF001 - nothing left behind for close()


async def test_an_operation_the_writer_cannot_load_fails_its_frame_not_the_writer(
    tmp_path: Path,
) -> None:
    """It pickles here but names a module only this process has: what was sent with it in the
    same frame is refused (none of it ran), and the writer stays up for the next frame."""
    only_here = types.ModuleType("revive_only_in_this_process")
    exec("def op(conn):\n    return 1\n", only_here.__dict__)  # noqa: S102 - a throwaway module
    sys.modules[only_here.__name__] = only_here
    try:
        async with SqliteStore.open(tmp_path / "revive.db") as store:
            await prepared(store)
            refused = await asyncio.gather(
                store._write(only_here.op),  # noqa: SLF001 - an operation of our own
                store.claim(req("key_1")),
                return_exceptions=True,
            )
            for error in refused:
                assert isinstance(error, StoreUnavailable)
                assert "none of them ran" in str(error)
            assert await store.get_action("key_1") is None
            assert (await store.claim(req("key_1"))).kind == "claimed"
            assert store.stats.starts == 1
    finally:
        del sys.modules[only_here.__name__]
