"""GrantStore: encrypted at rest, private modes, atomic replacement."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from revive.errors import CredentialMisconfigured, CredentialUnavailable
from revive.sources._flock import exclusive_flock
from revive.sources.grants import Grant, GrantConflict, GrantStore, StoredGrant

CANARY_RT = "rt-canary-7f3a9c2e51d84b60"


def _grant(token: str = CANARY_RT, generation: int = 1) -> Grant:
    return Grant(
        refresh_token=SecretStr(token), scope="a b", generation=generation, obtained_at=1.0
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_missing_grant_is_none(tmp_path: Path) -> None:
    assert await GrantStore(tmp_path).load("conn_a") is None


async def test_roundtrip_is_encrypted_and_private(tmp_path: Path) -> None:
    store = GrantStore(tmp_path)
    await store.save("conn_a", _grant())

    loaded = await GrantStore(tmp_path).load("conn_a")  # a fresh instance reads the key file
    assert loaded is not None
    assert loaded.refresh_token.get_secret_value() == CANARY_RT
    assert (loaded.scope, loaded.generation, loaded.obtained_at) == ("a b", 1, 1.0)

    grant_file = store.path("conn_a")
    assert CANARY_RT.encode() not in grant_file.read_bytes()
    assert _mode(grant_file) == 0o600
    assert _mode(store.key_path) == 0o600
    assert _mode(grant_file.parent) == 0o700
    assert _mode(store.key_path.parent) == 0o700
    assert [p.name for p in grant_file.parent.iterdir()] == ["conn_a.grant"]  # no temp left


async def test_secret_never_in_repr(tmp_path: Path) -> None:
    grant = _grant()
    store = GrantStore(tmp_path)
    for text in (repr(grant), str(grant), repr(store), grant.model_dump_json()):
        assert CANARY_RT not in text


async def test_undecryptable_file_is_misconfigured(tmp_path: Path) -> None:
    store = GrantStore(tmp_path)
    await store.save("conn_a", _grant())
    store.key_path.unlink()
    await GrantStore(tmp_path).save("conn_b", _grant("other-token-1234"))  # creates a new key

    with pytest.raises(CredentialMisconfigured) as info:
        await GrantStore(tmp_path).load("conn_a")
    assert "conn_a.grant" in str(info.value)
    assert CANARY_RT not in str(info.value)


async def test_garbage_file_and_missing_key(tmp_path: Path) -> None:
    store = GrantStore(tmp_path)
    path = store.path("conn_a")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not fernet at all " + CANARY_RT.encode())
    with pytest.raises(CredentialMisconfigured) as info:
        await store.load("conn_a")
    assert "missing" in str(info.value)
    assert CANARY_RT not in str(info.value)


async def test_file_copied_to_other_connection_is_refused(tmp_path: Path) -> None:
    store = GrantStore(tmp_path)
    await store.save("conn_a", _grant())
    store.path("conn_b").write_bytes(store.path("conn_a").read_bytes())
    with pytest.raises(CredentialMisconfigured):
        await store.load("conn_b")


async def test_unsafe_connection_id(tmp_path: Path) -> None:
    with pytest.raises(CredentialMisconfigured):
        await GrantStore(tmp_path).save("../escape", _grant())


async def test_concurrent_key_creation_agrees(tmp_path: Path) -> None:
    stores = [GrantStore(tmp_path) for _ in range(8)]
    await asyncio.gather(
        *(s.save(f"conn_{i}", _grant(f"token-{i}-xyz")) for i, s in enumerate(stores))
    )
    reader = GrantStore(tmp_path)
    for i in range(8):
        loaded = await reader.load(f"conn_{i}")
        assert loaded is not None and loaded.refresh_token.get_secret_value() == f"token-{i}-xyz"


async def test_atomic_replace_survives_concurrent_reader(tmp_path: Path) -> None:
    writer, reader = GrantStore(tmp_path), GrantStore(tmp_path)
    await writer.save("conn_a", _grant("token-0000", generation=1))
    done = asyncio.Event()
    seen: set[int] = set()

    async def write() -> None:
        for gen in range(2, 80):
            await writer.save("conn_a", _grant(f"token-{gen:04d}", generation=gen))
        done.set()

    async def read() -> None:
        while not done.is_set():
            grant = await reader.load("conn_a")  # never None, never a half-written file
            assert grant is not None
            assert grant.refresh_token.get_secret_value() == (
                f"token-{grant.generation:04d}" if grant.generation > 1 else "token-0000"
            )
            seen.add(grant.generation)

    await asyncio.gather(write(), read(), read())
    final = await reader.load("conn_a")
    assert final is not None and final.generation == 79
    assert len(seen) > 1


# -- versions (the GrantBackend seam) ----------------------------------------------------------


async def test_versioned_writes_refuse_a_stale_version(tmp_path: Path) -> None:
    store = GrantStore(tmp_path)
    assert await store.read("conn_a") == StoredGrant(None, 0)
    assert await store.write("conn_a", _grant(generation=1), 0) == 1
    with pytest.raises(GrantConflict) as info:
        await store.write("conn_a", _grant("token-lost-9999", generation=1), 0)
    assert info.value.provider_code == "grant_version_conflict"
    assert CANARY_RT not in str(info.value)
    assert await store.write("conn_a", _grant(generation=2), 1) == 2
    stored = await GrantStore(tmp_path).read("conn_a")
    assert (stored.version, stored.grant and stored.grant.generation) == (2, 2)
    assert _mode(store.lock_path("conn_a")) == 0o600
    assert _mode(store.lock_path("conn_a").parent) == 0o700


async def test_concurrent_versioned_writers_one_wins_per_version(tmp_path: Path) -> None:
    stores = [GrantStore(tmp_path) for _ in range(6)]
    await stores[0].write("conn_a", _grant(), 0)
    results = await asyncio.gather(
        *(s.write("conn_a", _grant(f"token-{i}-abcd"), 1) for i, s in enumerate(stores)),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["GrantConflict"] * 5 + ["int"]
    [winner] = [i for i, r in enumerate(results) if r == 2]
    stored = await stores[0].read("conn_a")
    assert stored.grant is not None and stored.version == 2
    assert stored.grant.refresh_token.get_secret_value() == f"token-{winner}-abcd"


async def test_unreadable_file_blocks_versioned_but_not_unconditional_writes(
    tmp_path: Path,
) -> None:
    store = GrantStore(tmp_path)
    path = store.path("conn_a")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    await store.save("conn_b", _grant())  # creates the key
    with pytest.raises(CredentialMisconfigured):
        await store.write("conn_a", _grant(), 1)
    assert await store.write("conn_a", _grant(), None) == 1  # a reconnect replaces it


async def test_last_refreshed_at_round_trips_and_old_files_read_as_version_one(
    tmp_path: Path,
) -> None:
    store = GrantStore(tmp_path)
    grant = Grant(
        refresh_token=SecretStr(CANARY_RT), obtained_at=1.0, rotated_at=5.0,
        last_refreshed_at=9.0,
    )
    await store.save("conn_a", grant)
    loaded = await GrantStore(tmp_path).load("conn_a")
    assert loaded == grant and loaded.last_used == 9.0
    # A file written before versions and last_refreshed_at existed.
    cipher = Fernet(store.key_path.read_bytes().strip())
    old = {"format": 1, "connection_id": "conn_a", "grant": {
        "refresh_token": CANARY_RT, "scope": None, "generation": 3, "obtained_at": 4.0,
        "rotated_at": None}}
    store.path("conn_a").write_bytes(cipher.encrypt(json.dumps(old).encode()))
    stored = await store.read("conn_a")
    assert stored.version == 1 and stored.grant is not None
    assert (stored.grant.generation, stored.grant.last_refreshed_at) == (3, None)
    assert stored.grant.last_used == 4.0


# -- the refresh lock ---------------------------------------------------------------------------


async def test_refresh_lock_excludes_other_stores_but_not_writes(tmp_path: Path) -> None:
    holder, other = GrantStore(tmp_path), GrantStore(tmp_path)
    async with holder.refreshing("conn_a", wait=1.0):
        with pytest.raises(CredentialUnavailable) as info:
            async with other.refreshing("conn_a", wait=0.05):
                pytest.fail("two holders at once")
        assert info.value.provider_code == "grant_lock_timeout"
        assert "conn_a" in str(info.value)
        async with other.refreshing("conn_b", wait=0.05):  # one lock per connection
            pass
        # The holder stores its rotation while holding the lock: writes take their own.
        async with asyncio.timeout(5):
            assert await holder.write("conn_a", _grant(), 0) == 1
    assert _mode(holder.refresh_lock_path("conn_a")) == 0o600
    async with other.refreshing("conn_a", wait=0.05):
        pass


async def test_refresh_lock_is_freed_by_errors_and_cancelled_waits(tmp_path: Path) -> None:
    holder, other = GrantStore(tmp_path), GrantStore(tmp_path)
    with pytest.raises(RuntimeError):
        async with holder.refreshing("conn_a", wait=1.0):
            raise RuntimeError("refresh failed")
    async with holder.refreshing("conn_a", wait=0.05):
        waits = [
            asyncio.create_task(_enter_and_leave(other, "conn_a", 30.0)) for _ in range(5)
        ]
        await asyncio.sleep(0.02)  # the waiters are polling (the test passes either way)
        for wait in waits:
            wait.cancel()
        results = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    async with GrantStore(tmp_path).refreshing("conn_a", wait=0.5):
        pass  # no cancelled attempt kept the lock
    lock = other.refresh_lock_path("conn_a")
    for _ in range(20):
        # Cancelled while its attempt runs in a thread on a free lock: the thread wins it,
        # and the lock must be handed back although nobody awaits the attempt any more.
        task = asyncio.create_task(_hold_flock(lock))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        async with GrantStore(tmp_path).refreshing("conn_a", wait=0.5):
            pass


async def _hold_flock(lock: Path) -> None:
    async with exclusive_flock(lock, 30.0, "conn_a"):
        pass


async def _enter_and_leave(store: GrantStore, connection_id: str, wait: float) -> None:
    async with store.refreshing(connection_id, wait=wait):
        pass
