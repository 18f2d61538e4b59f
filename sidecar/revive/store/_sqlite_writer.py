"""Group commit for SQLite: many callers' writes share one transaction and one fsync (DESIGN §9).

One writer task feeds the write connection, which lives on its own thread
(:class:`~revive.store._sqlite_thread.ConnectionThread`). The task takes every operation queued
so far and sends the whole batch to that thread in ONE hop, where it runs as plain synchronous
``sqlite3`` code: ``BEGIN IMMEDIATE``, each operation inside its own ``SAVEPOINT`` so that an
operation that raises (``Fenced``, a lost compare-and-set) rolls back only its own changes while
the others are kept, then ``COMMIT``. Every caller's future is resolved only after the ``COMMIT``
has returned: with ``synchronous=FULL`` that is after the fsync, so nobody is told "done" about a
write a crash could lose. Batches form by themselves: while one batch commits on the thread, the
next one queues up on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from revive.errors import ReviveError
from revive.store._sqlite_thread import ConnectionThread
from revive.store.models import ConflictError, StoreUnavailable

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]
"""A write operation: synchronous, run on the writer's thread inside its own savepoint."""

Outcome = tuple[bool, Any]
"""``(True, result)`` or ``(False, the exception for that operation's caller)``."""

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


def run_batch(conn: sqlite3.Connection, ops: Sequence[Op[Any]]) -> list[Outcome]:
    """Run ``ops`` in one transaction, each in its savepoint; on the writer's thread.

    Returns:
        Each operation's outcome, in order, once the ``COMMIT`` has returned.

    Raises:
        sqlite3.Error: the transaction as a whole failed and was rolled back: nothing is kept.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        outcomes = [_run_one(conn, op) for op in ops]
        conn.execute("COMMIT")
    except BaseException:
        # An I/O error, a statement error SQLite turned into a full rollback, or an operation
        # that raised past its savepoint: nothing of the batch is kept.
        _rollback(conn)
        raise
    return outcomes


def single_write(op: Op[T]) -> Op[T]:
    """Mark an operation that writes at most once, as its last step (claim, finish).

    SQLite undoes a failed statement by itself, and such an operation raises only before or
    instead of its one write, so it needs no savepoint: two statements fewer per request.
    """
    op.single_write = True  # type: ignore[attr-defined]
    return op


def _run_one(conn: sqlite3.Connection, op: Op[Any]) -> Outcome:
    """Run one operation inside its savepoint; raise only when the whole batch is lost."""
    if getattr(op, "single_write", False):
        try:
            return (True, op(conn))
        except Exception as exc:  # noqa: BLE001 - delivered to its caller by the writer task
            if not conn.in_transaction:
                raise sqlite3.OperationalError(f"transaction lost: {exc}") from exc
            return (False, _domain_error(exc))
    conn.execute("SAVEPOINT op")
    outcome: Outcome
    try:
        outcome = (True, op(conn))
    except Exception as exc:  # delivered to the one caller it belongs to, by the writer task
        if not conn.in_transaction:
            raise sqlite3.OperationalError(f"transaction lost: {exc}") from exc
        conn.execute("ROLLBACK TO op")
        outcome = (False, _domain_error(exc))
    conn.execute("RELEASE op")
    return outcome


def _domain_error(exc: Exception) -> BaseException:
    if isinstance(exc, sqlite3.Error):
        error = translate(exc)
        error.__cause__ = exc
        return error
    return exc


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        log.exception("rollback of a failed batch failed")


@dataclass
class _Job:
    op: Op[Any]
    future: asyncio.Future[Any]


class GroupCommitWriter:
    """Runs write operations on one connection, batching concurrent ones into one commit."""

    def __init__(self, thread: ConnectionThread, stats: WriterStats) -> None:
        self._thread = thread
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
        try:
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
        finally:
            # Whatever stopped the writer, nobody may wait for it for ever.
            self._closed = True
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if job is not None and not job.future.done():
                    job.future.set_exception(StoreUnavailable("store is closed"))

    async def _run_batch(self, batch: list[_Job]) -> None:
        if not batch:
            return
        ops = [job.op for job in batch]
        try:
            outcomes = await self._thread.call(lambda conn: run_batch(conn, ops))
        except sqlite3.Error as exc:
            self._fail_all(batch, exc)
            return
        except Exception as exc:  # a bug, or the connection closed under the writer
            log.exception("a store write batch failed")
            self._fail_all(batch, exc)
            return
        except BaseException:
            # The writer itself was interrupted (cancelled): the thread may still commit the
            # batch, but nobody may hear "done" about it from here.
            self._fail_all(batch, sqlite3.OperationalError("store writer interrupted"))
            raise
        self._stats.commits += 1
        self._stats.operations += len(batch)
        self._stats.largest_batch = max(self._stats.largest_batch, len(batch))
        for job, (ok, value) in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    @staticmethod
    def _fail_all(batch: list[_Job], exc: BaseException) -> None:
        for job in batch:
            if not job.future.done():
                error = StoreUnavailable(f"sqlite: {exc}")
                error.__cause__ = exc
                job.future.set_exception(error)
