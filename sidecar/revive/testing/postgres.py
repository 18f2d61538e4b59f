"""PostgreSQL for tests: this machine's server, a fresh schema per use, dropped afterwards.

An unreachable server skips PostgreSQL tests, unless ``REVIVE_REQUIRE_POSTGRES=1`` (set by
``.ci/run``): then it fails them, so CI can never pass by skipping.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg  # type: ignore[import-untyped]
import pytest

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
"""Not a ``REVIVE_*`` variable: the autouse ``clean_environ`` fixture removes those."""


def with_schema(url: str, schema: str) -> str:
    """``url`` naming ``schema`` (the store creates it when missing)."""
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


async def probe(url: str) -> str | None:
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
    reason = asyncio.run(probe(url))
    if reason is None:
        return
    message = f"PostgreSQL at {url} unreachable ({reason})"
    if os.environ.get("REVIVE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{message}; REVIVE_REQUIRE_POSTGRES=1 makes this a failure")
    pytest.skip(f"{message}; set REVIVE_REQUIRE_POSTGRES=1 to fail instead")


def new_schema() -> str:
    return f"revive_test_{uuid.uuid4().hex[:12]}"
