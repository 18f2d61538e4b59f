"""One ``store`` fixture over every backend: each backend runs the same contract suite (STYLE 3).

Adding a backend is adding its name to ``BACKENDS``. The contract tests name every row with a
fresh unique id (``new_id``) and measure counts as differences, so a backend may share one
database between tests (PostgreSQL) instead of getting a new file each time (SQLite).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from revive.store import SqliteStore, Store, open_store

BACKENDS = ["sqlite"]

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/revive_test")
"""Not a ``REVIVE_*`` variable: the autouse ``clean_environ`` fixture removes those."""


@asynccontextmanager
async def open_backend(backend: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A freshly migrated store of ``backend``, closed on exit."""
    match backend:
        case "sqlite":
            async with SqliteStore.open(tmp_path / "data" / "revive.db") as store:
                yield store
        case "postgres":
            async with open_store(POSTGRES_URL) as store:
                yield store
        case _:
            raise ValueError(f"no store backend {backend!r}")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture
def new_id() -> Callable[[str], str]:
    """A factory of ids no other test (or earlier run against a shared database) has used."""

    def make(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:12]}"

    return make
