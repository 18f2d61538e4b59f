"""Group commit for SQLite: many callers' writes share one transaction and one fsync (DESIGN §9).

One writer task owns the write connection. It takes every operation queued so far, runs them in
one ``BEGIN IMMEDIATE … COMMIT``, each inside its own ``SAVEPOINT`` so that an operation that
raises (``Fenced``, a lost compare-and-set) rolls back only its own changes while the others are
kept, and resolves every caller's future only after the ``COMMIT`` has returned: with
``synchronous=FULL`` that is after the fsync, so nobody is told "done" about a write a crash
could lose. Batches form by themselves: while one batch commits, the next one queues up.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import aiosqlite

from revive.errors import ReviveError
from revive.store.models import ConflictError, StoreUnavailable

T = TypeVar("T")
Op = Callable[[aiosqlite.Connection], Awaitable[T]]

log = logging.getLogger(__name__)

MAX_BATCH = 256
"""Operations per transaction at most, so one batch cannot hold the write lock for long."""


@dataclass
class WriterStats:
    """Counters a test or the bench reads to see group commit at work.

    Attributes:
        commits: transactions committed.
        operations: operations that ran (kept or rolled back to their savepoint).
        largest_batch: the most operations one commit carried.
    """

    commits: int = 0
    operations: int = 0
    largest_batch: int = 0


def translate(exc: sqlite3.Error) -> ReviveError:
    """Map a driver error onto the store's own errors (STYLE 11); callers raise ``from exc``."""
    if isinstance(exc, sqlite3.IntegrityError):
        return ConflictError("row", "?", "no constraint violation", str(exc))
    return StoreUnavailable(f"sqlite: {exc}")


@dataclass
class _Job:
    op: Op[Any]
    future: asyncio.Future[Any]
    outcome: tuple[bool, Any] = field(default=(False, None))


class GroupCommitWriter:
    """Runs write operations on one connection, batching concurrent ones into one commit."""

    def __init__(self, conn: aiosqlite.Connection, stats: WriterStats) -> None:
        self._conn = conn
        self._stats = stats
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="revive-store-writer")

    async def submit(self, op: Op[T]) -> T:
        """Run ``op`` in the next batch; return its result once the batch is durable.

        A caller cancelled while waiting does not cancel the operation: it may still commit.

        Raises:
            StoreUnavailable: the store is closed or the batch could not commit.
            Whatever ``op`` raised (its own changes rolled back, the batch unaffected).
        """
        if self._closed:
            raise StoreUnavailable("store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(op, future))
        return cast(T, await future)

    async def close(self) -> None:
        """Finish what is queued, then stop the writer task."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                job = self._queue.get_nowait()
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            await self._run_batch([j for j in batch if not j.future.cancelled()])

    async def _run_batch(self, batch: list[_Job]) -> None:
        if not batch:
            return
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail_all(batch, exc)
            return
        try:
            for job in batch:
                await self._run_one(job)
            await self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # The transaction as a whole failed (I/O error, lost by a statement error SQLite
            # turned into a full rollback): nothing of it is kept, so nobody may hear "done".
            await self._rollback()
            self._fail_all(batch, exc)
            return
        except BaseException:
            await self._rollback()
            self._fail_all(batch, sqlite3.OperationalError("store writer interrupted"))
            raise
        self._stats.commits += 1
        self._stats.operations += len(batch)
        self._stats.largest_batch = max(self._stats.largest_batch, len(batch))
        for job in batch:
            ok, value = job.outcome
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    async def _run_one(self, job: _Job) -> None:
        """Run one operation inside its savepoint; raise only when the whole batch is lost."""
        await self._conn.execute("SAVEPOINT op")
        try:
            job.outcome = (True, await job.op(self._conn))
        except Exception as exc:  # delivered to the one caller it belongs to, below
            if not self._conn.in_transaction:
                raise sqlite3.OperationalError(f"transaction lost: {exc}") from exc
            await self._conn.execute("ROLLBACK TO op")
            error: BaseException = exc
            if isinstance(exc, sqlite3.Error):
                error = translate(exc)
                error.__cause__ = exc
            job.outcome = (False, error)
        await self._conn.execute("RELEASE op")

    async def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                await self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback of a failed batch failed")

    @staticmethod
    def _fail_all(batch: list[_Job], exc: sqlite3.Error) -> None:
        for job in batch:
            if not job.future.done():
                error = StoreUnavailable(f"sqlite: {exc}")
                error.__cause__ = exc
                job.future.set_exception(error)
