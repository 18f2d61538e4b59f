"""The numbered schema migrations, shared by every backend (DESIGN §9).

``MIGRATIONS`` is append-only: a released file is never edited, a change is a new file. Each
backend's ``setup()`` creates ``schema_version`` if missing and, inside one transaction holding the
write lock, applies the files whose number is above the highest recorded one, so two sidecars
starting together on one database apply each file once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from importlib import resources

MIGRATIONS: tuple[str, ...] = (
    "0001_initial.sql",
    "0002_lean_action_indexes.sql",
    "0003_connections_at_risk.sql",
)
"""Applied in this order; version = the file's leading number."""

SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str


def _read_all() -> tuple[Migration, ...]:
    folder = resources.files("revive.store").joinpath("migrations")
    found = []
    for name in MIGRATIONS:
        version = int(name.split("_", 1)[0])
        found.append(Migration(version, name, folder.joinpath(name).read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != sorted(set(versions)):
        raise RuntimeError(f"migration numbers must increase: {MIGRATIONS}")
    return tuple(found)


async def load_migrations() -> tuple[Migration, ...]:
    """Read the migration files (in a worker thread: file reads block)."""
    return await asyncio.to_thread(_read_all)


def pending(migrations: tuple[Migration, ...], current: int | None) -> list[Migration]:
    """The migrations above ``current`` (``None``: a fresh database), in order."""
    return [m for m in migrations if current is None or m.version > current]


def split_statements(sql: str) -> list[str]:
    """Cut a script into complete statements (``sqlite3`` runs one per ``execute``).

    ``executescript`` would do it, but it commits first, which would break the one-transaction
    rule; ``sqlite3.complete_statement`` knows about quotes, comments and trigger bodies.
    """
    statements: list[str] = []
    buffer = ""
    for line in sql.splitlines(keepends=True):
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("--")):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise RuntimeError(f"incomplete SQL statement at the end of a migration: {buffer!r}")
    return statements
