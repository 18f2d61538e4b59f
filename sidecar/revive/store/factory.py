"""Choose the ``Store`` backend once, at start-up, from the ``store`` URL (STYLE 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from revive.errors import ConfigError
from revive.store.base import Store
from revive.store.sqlite import SqliteStore


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:///`` URL names (SQLAlchemy's convention).

    ``sqlite:///rel/revive.db`` is relative to the working directory, ``sqlite:////abs/revive.db``
    absolute. A host part or an in-memory database is refused: the store must be durable and is
    opened by two connections.

    Raises:
        ConfigError: the URL names no usable file.
    """
    parts = urlsplit(url)
    path = parts.path.removeprefix("/")
    if parts.netloc or not path or path == ":memory:" or parts.query:
        raise ConfigError("store", "store", f"expected sqlite:///path/to/file.db, got {url!r}")
    return Path(path)


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[Store]:
    """Open, migrate and finally close the store the URL names.

    Args:
        url: ``sqlite:///path`` (the default) or ``postgresql://...`` (also ``postgres://``;
            ``?schema=NAME&pool_size=N`` besides libpq's parameters, see ``PostgresStore.open``).

    Raises:
        ConfigError: unknown scheme or a malformed URL.
        StoreUnavailable: the database cannot be opened or migrated.
    """
    scheme = urlsplit(url).scheme
    match scheme:
        case "sqlite":
            async with SqliteStore.open(sqlite_path(url)) as store:
                yield store
        case "postgresql" | "postgres":
            # Imported here: asyncpg costs an embedded (SQLite) sidecar ~16 MB of RSS.
            from revive.store.postgres import PostgresStore

            async with PostgresStore.open(url) as store:
                yield store
        case _:
            raise ConfigError("store", "store", f"unsupported store URL scheme {scheme!r}")
