"""One group-commit batch on the write connection: a transaction, a savepoint per operation.

Runs in the writer process (:mod:`revive.store._sqlite_child`) as plain synchronous ``sqlite3``
code: ``BEGIN IMMEDIATE``, each operation inside its own ``SAVEPOINT`` so that an operation
that raises (``Fenced``, a lost compare-and-set) rolls back only its own changes while the
others are kept, then ``COMMIT``. Results are handed back only after the ``COMMIT`` has
returned: with ``synchronous=FULL`` that is after the fsync.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from revive.errors import ReviveError
from revive.store.models import ConflictError, StoreUnavailable

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]
"""A write operation: synchronous, picklable, run by the writer process in its own savepoint."""

Outcome = tuple[bool, Any]
"""``(True, result)`` or ``(False, the exception for that operation's caller)``."""

log = logging.getLogger(__name__)

MAX_BATCH = 256
"""Operations per transaction at most, so one batch cannot hold the write lock for long."""


BUSY_TIMEOUT_MS = 5000


def connect(path: Path) -> sqlite3.Connection:
    """One connection in autocommit mode (we write BEGIN/COMMIT ourselves), WAL and durable.

    Runs on the thread or in the process that owns the connection.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL").close()
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def translate(exc: sqlite3.Error) -> ReviveError:
    """Map a driver error onto the store's own errors (STYLE 11); callers raise ``from exc``."""
    if isinstance(exc, sqlite3.IntegrityError):
        return ConflictError("row", "?", "no constraint violation", str(exc))
    return StoreUnavailable(f"sqlite: {exc}")


def run_batch(conn: sqlite3.Connection, ops: Sequence[Op[Any]]) -> list[Outcome]:
    """Run ``ops`` in one transaction, each in its savepoint.

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
