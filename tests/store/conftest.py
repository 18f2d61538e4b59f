"""One ``store`` fixture over every backend: each backend runs the same contract suite (STYLE 3).

Adding a backend is adding its name to ``BACKENDS``. The contract tests name every row with a
fresh unique id (``new_id``) and measure counts as differences, so a backend may share one
database between tests (PostgreSQL) instead of getting a new file each time (SQLite).

PostgreSQL: one fresh schema (``revive_test_<hex>``) per test session on ``TEST_POSTGRES_URL``,
dropped at the end. An unreachable server skips the PostgreSQL tests, unless
``REVIVE_REQUIRE_POSTGRES=1`` (set by ``.ci/run``): then it fails them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from revive.store import SqliteStore, Store, open_store

BACKENDS = ["sqlite", "postgres"]


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
