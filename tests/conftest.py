"""Shared fixtures: a clean environment, a blocking-call guard, and real servers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from revive.testing.postgres import (
    POSTGRES_URL,
    drop_schema,
    new_schema,
    require_postgres,
    with_schema,
)
from revive.testing.provider import RunningProvider, running_provider
from revive.testing.story import Story, granted_lab_settings, story_on


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Tests never inherit an operator's REVIVE_* settings (REVIVE_REQUIRE_* are CI switches)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("REVIVE_")}
    for key in saved:
        if not key.startswith("REVIVE_REQUIRE_"):
            del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("REVIVE_")]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster | None]:
    """Fail any test in which the event loop makes a blocking call (DESIGN §9)."""
    # revive.testing holds test scaffolding (fixtures, fakes), not code that serves requests.
    with blockbuster_ctx("revive", excluded_modules=["revive.testing"]) as bb:
        # httpx imports its CLI module when click and rich are installed (schemathesis brings
        # both), and rich reads the working directory at import: a library's one-off import.
        for function in bb.functions.values():
            function.can_block_in("httpx/_main.py", "<module>")
        yield bb


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A store URL on this session's own fresh schema, dropped when the session ends.

    Synchronous on purpose: each test has its own event loop, this fixture outlives them all.
    """
    require_postgres()
    schema = new_schema()
    yield with_schema(POSTGRES_URL, schema)
    asyncio.run(drop_schema(POSTGRES_URL, schema))


@pytest.fixture
def fresh_schema() -> Iterator[str]:
    """A schema name no store has used yet, dropped after the test (for migration tests)."""
    require_postgres()
    schema = new_schema()
    yield schema
    asyncio.run(drop_schema(POSTGRES_URL, schema))


# -- recovery stories: the fake provider, a real sidecar on SQLite, and the actors ------------


async def _story(tmp_path: Path, policy: str) -> AsyncIterator[Story]:
    async with running_provider() as provider:
        settings = await granted_lab_settings(provider, tmp_path / "data")
        if policy != "microsoft":
            conn = settings.connections[0].model_copy(update={"provider": policy})
            settings = settings.model_copy(update={"connections": [conn]})
        async with story_on(provider, settings, tmp_path / "data") as story:
            yield story


@pytest.fixture
async def story(tmp_path: Path) -> AsyncIterator[Story]:
    async for running in _story(tmp_path, "microsoft"):
        yield running


@pytest.fixture
async def generic_story(tmp_path: Path) -> AsyncIterator[Story]:
    """The same provider behind the generic oauth2 policy: no reconcile rule knows sendMail."""
    async for running in _story(tmp_path, "oauth2"):
        yield running


@pytest.fixture
async def provider() -> AsyncIterator[RunningProvider]:
    """The fake Microsoft provider on an ephemeral port, stopped after the test."""
    async with running_provider() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
