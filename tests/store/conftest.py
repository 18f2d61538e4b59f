"""One ``store`` fixture over every backend: each backend runs the same contract suite (STYLE 3).

Adding a backend is adding its name to ``BACKENDS``. The contract tests name every row with a
fresh unique id (``new_id``) and measure counts as differences, so a backend may share one
database between tests (PostgreSQL) instead of getting a new file each time (SQLite).

PostgreSQL: one fresh schema (``revive_test_<hex>``) per test session on ``TEST_POSTGRES_URL``,
dropped at the end. An unreachable server skips the PostgreSQL tests, unless
``REVIVE_REQUIRE_POSTGRES=1`` (set by ``.ci/run``): then it fails them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from revive.store import SqliteStore, Store, open_store

BACKENDS = ["sqlite", "postgres"]

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
"""Not a ``REVIVE_*`` variable: the autouse ``clean_environ`` fixture removes those."""


def with_schema(url: str, schema: str) -> str:
    """``url`` naming ``schema`` (the store creates it when missing)."""
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


async def _probe(url: str) -> str | None:
    """Why PostgreSQL cannot be used, or ``None`` when it answers."""
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    return None


async def drop_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def require_postgres(url: str = POSTGRES_URL) -> None:
    """Skip (or, under ``REVIVE_REQUIRE_POSTGRES=1``, fail) when PostgreSQL does not answer."""
    reason = asyncio.run(_probe(url))
    if reason is None:
        return
    message = f"PostgreSQL at {url} unreachable ({reason})"
    if os.environ.get("REVIVE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{message}; REVIVE_REQUIRE_POSTGRES=1 makes this a failure")
    pytest.skip(f"{message}; set REVIVE_REQUIRE_POSTGRES=1 to fail instead")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A store URL on this session's own fresh schema, dropped when the session ends.

    Synchronous on purpose: each test has its own event loop, this fixture outlives them all.
    """
    require_postgres()
    schema = f"revive_test_{uuid.uuid4().hex[:12]}"
    yield with_schema(POSTGRES_URL, schema)
    asyncio.run(drop_schema(POSTGRES_URL, schema))


@pytest.fixture
def fresh_schema() -> Iterator[str]:
    """A schema name no store has used yet, dropped after the test (for migration tests)."""
    require_postgres()
    schema = f"revive_test_{uuid.uuid4().hex[:12]}"
    yield schema
    asyncio.run(drop_schema(POSTGRES_URL, schema))


@asynccontextmanager
async def open_backend(backend: str, tmp_path: Path, url: str | None) -> AsyncIterator[Store]:
    """A freshly migrated store of ``backend``, closed on exit."""
    match backend:
        case "sqlite":
            async with SqliteStore.open(tmp_path / "data" / "revive.db") as store:
                yield store
        case "postgres":
            assert url is not None
            async with open_store(url) as store:
                yield store
        case _:
            raise ValueError(f"no store backend {backend!r}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """The backend's name and, for PostgreSQL, its URL.

    Synchronous, so that the session's schema is made outside any test's event loop, and only
    when a PostgreSQL test runs first (SQLite-only runs never touch the server).
    """
    name: str = request.param
    return name, request.getfixturevalue("postgres_url") if name == "postgres" else None


@pytest.fixture
async def store(backend: tuple[str, str | None], tmp_path: Path) -> AsyncIterator[Store]:
    async with open_backend(backend[0], tmp_path, backend[1]) as opened:
        yield opened


@pytest.fixture
def new_id() -> Callable[[str], str]:
    """A factory of ids no other test (or earlier run against a shared database) has used."""

    def make(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:12]}"

    return make
