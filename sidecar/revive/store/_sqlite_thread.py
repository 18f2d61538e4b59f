"""One stdlib ``sqlite3`` connection owned by one dedicated thread (DESIGN §9: nothing blocks the
event loop).

The connection is created, used and closed only on its thread (``check_same_thread`` stays on),
and each :meth:`ConnectionThread.call` is one trip there: the caller hands over a whole unit of
work (a read, the migrations) as a synchronous function, so a unit costs one thread hop however
many statements it runs, instead of one hop per statement. Writes go to the writer process
(:mod:`revive.store._sqlite_process`), which opens its connection with :func:`connect` too.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from revive.store._sqlite_writer import connect
from revive.store.models import StoreUnavailable

T = TypeVar("T")

class ConnectionThread:
    """A ``sqlite3`` connection and the single-thread executor that alone may touch it."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def open(self, path: Path) -> None:
        """Connect on the thread; sqlite errors propagate (the caller translates them)."""

        def opening() -> None:
            self._conn = connect(path)

        await self._submit(opening)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the connection's thread and return what it returns.

        The thread finishes ``fn`` even when the awaiting caller is cancelled.

        Raises:
            StoreUnavailable: the connection is closed (or was never opened).
            Whatever ``fn`` raised.
        """
        if self._closed:
            raise StoreUnavailable("store is closed")
        return await self._submit(lambda: fn(self._connection()))

    async def close(self) -> None:
        """Close the connection on its thread (after any work queued before), then stop it.

        The connection is only ever touched on the thread, so a close also catches one whose
        ``open`` was still running when its caller was cancelled.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self._submit(self._close_connection)
        finally:
            # The thread is idle once the close has run (nothing is queued behind it), so it
            # exits at once; waiting for that here would block the loop on a join.
            self._executor.shutdown(wait=False)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("store is closed")
        return self._conn

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)
