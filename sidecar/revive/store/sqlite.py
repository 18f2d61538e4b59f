"""``SqliteStore``: the default ``Store``, one SQLite file in WAL mode (DESIGN §9).

Two stdlib ``sqlite3`` connections, neither ever used on the event loop:

- the *writer* connection lives in a writer process (:class:`WriterProcess`); every state change
  goes through it and concurrent changes share one durable commit (``synchronous=FULL``), a
  whole batch crossing the pipe as one frame each way;
- the *reader* connection is owned by one thread (:class:`ConnectionThread`) and answers plain
  reads, one trip each; WAL lets it read while the writer commits, and a write's caller is
  answered only after its commit, so it reads its own writes.

Why a process for the writer: ``sqlite3`` holds the GIL for all but the SQLite call itself, so a
writer *thread* took turns with the event loop on one lock for every statement. Measured on a
two-core machine (``bench/proxy_overhead.py``, POST at 32 connections): the proxy lost about a
quarter of its POST throughput to it; with the writer in its own process the loop runs beside it.

Why not aiosqlite, which DESIGN §9 names: it is a writer thread too, and with one thread hop, and
one event-loop wake-up, per statement. aiosqlite stays a test dependency: tests read the file
through it as an independent second client.

Several processes may open the same file (``busy_timeout`` waits for the write lock), but a
sidecar fleet should share PostgreSQL instead.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from revive.store import _sqlite_ops as ops
from revive.store import _sqlite_rows as rows
from revive.store._sqlite_thread import ConnectionThread
from revive.store._sqlite_process import WriterProcess, WriterStats
from revive.store._sqlite_writer import Op, T, single_write, translate
from revive.store.migrate import (
    SCHEMA_VERSION_DDL,
    Migration,
    load_migrations,
    pending,
    split_statements,
)
from revive.store.models import (
    ACTION_STATES,
    CASE_UPDATABLE_FIELDS,
    FINAL_CASE_STATES,
    MAX_RESPONSE_CHARS,
    ActionRow,
    ActionState,
    AtRiskRow,
    CaseDraft,
    CaseRow,
    ClaimOutcome,
    ClaimRequest,
    FinishedAction,
    ConnectionRow,
    FinishState,
    Outcome,
    RedeemResult,
    RunRow,
    StoreUnavailable,
    TransitionRow,
)

_FINISH_STATES = frozenset({"committed", "failed", "not_committed", "unknown"})


def _check_response(response: str | None) -> None:
    if response is not None and len(response) > MAX_RESPONSE_CHARS:
        raise ValueError(f"stored response over {MAX_RESPONSE_CHARS} characters")


class SqliteStore:
    """The SQLite ``Store``; build it with :meth:`open`, which also applies the migrations."""

    def __init__(
        self, path: Path, reader: ConnectionThread, clock: Callable[[], float]
    ) -> None:
        self.path = path
        self.stats = WriterStats()
        self._reader = reader
        self._writer = WriterProcess(path, self.stats)
        self._clock = clock

    def __repr__(self) -> str:
        return f"SqliteStore(path={str(self.path)!r})"

    @classmethod
    @asynccontextmanager
    async def open(
        cls, path: Path | str, *, clock: Callable[[], float] = time.time
    ) -> AsyncIterator[SqliteStore]:
        """Open (creating the file and its directory if needed) and migrate the database.

        Args:
            path: the database file.
            clock: unix-seconds clock for every timestamp (tests pass a fake one).

        Raises:
            StoreUnavailable: the file cannot be created or opened, or a migration failed.
        """
        path = Path(path)
        try:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the database directory: {exc}") from exc
        reader = ConnectionThread("revive-sqlite-reader")
        store = cls(path, reader, clock)
        try:
            await store.setup()
            try:
                await reader.open(path)
            except sqlite3.Error as exc:
                raise translate(exc) from exc
            await store._writer.start()
            yield store
        finally:
            await store._close()

    async def setup(self) -> None:
        """Apply pending migrations in one transaction under the write lock (idempotent)."""
        migrations = await load_migrations()
        now = self._clock()
        # A connection of its own, on a thread, closed again: before the writer process starts.
        thread = ConnectionThread("revive-sqlite-migrate")
        try:
            await thread.open(self.path)
            await thread.call(lambda conn: _migrate(conn, migrations, now))
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        finally:
            await thread.close()

    async def schema_version(self) -> int | None:
        """The highest applied migration (``None`` before :meth:`setup`)."""
        row = await self._read(rows.fetch_one, "SELECT MAX(version) FROM schema_version", ())
        return None if row is None else row[0]

    async def _close(self) -> None:
        """Let the writer process finish what it was sent and stop, then close the reader."""
        try:
            await self._writer.close()
        finally:
            await self._reader.close()

    async def _write(self, op: Op[T]) -> T:
        return await self._writer.submit(op)

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(connection, *args)`` on the reader's thread: one trip, however many statements."""
        try:
            return await self._reader.call(lambda conn: fn(conn, *args))
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    async def ping(self) -> None:
        await self._read(rows.fetch_one, "SELECT 1", ())

    # -- connections ---------------------------------------------------------------------------

    async def ensure_connection(self, connection_id: str) -> ConnectionRow:
        return await self._write(
            functools.partial(ops.ensure_connection, now=self._clock(), connection_id=connection_id)
        )

    async def get_connection(self, connection_id: str) -> ConnectionRow | None:
        found: ConnectionRow | None = await self._read(rows.get_connection, connection_id)
        return found

    async def record_reconnect(self, connection_id: str, expected_generation: int) -> ConnectionRow:
        return await self._write(functools.partial(
            ops.record_reconnect, now=self._clock(), connection_id=connection_id,
            expected_generation=expected_generation,
        ))

    async def mark_at_risk(
        self, connection_id: str, reason: str, detail: str, expires_at: float | None = None
    ) -> AtRiskRow:
        return await self._write(functools.partial(
            ops.mark_at_risk, now=self._clock(), connection_id=connection_id, reason=reason,
            detail=detail, expires_at=expires_at,
        ))

    async def clear_at_risk(self, connection_id: str) -> bool:
        return await self._write(
            functools.partial(ops.clear_at_risk, now=self._clock(), connection_id=connection_id)
        )

    async def list_at_risk(self) -> list[AtRiskRow]:
        found = await self._read(
            rows.fetch_all,
            f"SELECT {rows.AT_RISK_COLUMNS} FROM connections_at_risk ORDER BY connection_id", (),
        )
        return [rows.at_risk_row(r) for r in found]

    # -- runs ----------------------------------------------------------------------------------

    async def mint_check(self, run_id: str, epoch: int, workflow: str | None = None) -> RunRow:
        return await self._write(functools.partial(
            ops.mint_check, now=self._clock(), run_id=run_id, epoch=epoch, workflow=workflow
        ))

    async def get_run(self, run_id: str) -> RunRow | None:
        found: RunRow | None = await self._read(rows.get_run, run_id)
        return found

    async def check_fence(
        self, run_id: str, epoch: int, connection_id: str, generation: int
    ) -> None:
        stored_epoch, stored_generation = await self._read(rows.fence_values, run_id, connection_id)
        refusal = ops.fence_error(
            run_id, epoch, stored_epoch, connection_id, generation, stored_generation
        )
        if refusal is not None:
            raise refusal

    # -- action ledger -------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> ClaimOutcome:
        return await self._write(
            single_write(functools.partial(ops.claim, now=self._clock(), req=request))
        )

    async def finish(
        self, idempotency_key: str, owner: str, state: FinishState,
        status: int | None = None, response: str | None = None, case_id: str | None = None,
    ) -> FinishedAction:
        if state not in _FINISH_STATES:
            raise ValueError(f"cannot finish an action as {state!r}")
        _check_response(response)
        return await self._write(single_write(functools.partial(
            ops.finish, now=self._clock(), key=idempotency_key, owner=owner, state=state,
            status=status, response=response, case_id=case_id,
        )))

    async def settle(
        self, idempotency_key: str, outcome: Outcome, evidence: Mapping[str, Any],
        status: int | None = None, response: str | None = None,
    ) -> ActionRow:
        if outcome not in ("committed", "not_committed"):
            raise ValueError(f"cannot settle an action as {outcome!r}")
        _check_response(response)
        return await self._write(functools.partial(
            ops.settle, now=self._clock(), key=idempotency_key, outcome=outcome,
            evidence=rows.dump_json(evidence), status=status, response=response,
        ))

    async def sweep_in_flight(self, owner: str) -> int:
        return await self._write(
            functools.partial(ops.sweep_in_flight, now=self._clock(), owner=owner)
        )

    async def get_action(self, idempotency_key: str) -> ActionRow | None:
        found: ActionRow | None = await self._read(rows.get_action, idempotency_key)
        return found

    async def list_actions(self, run_id: str) -> list[ActionRow]:
        found = await self._read(
            rows.fetch_all,
            f"SELECT {rows.ACTION_COLUMNS} FROM actions WHERE run_id = ?"
            " ORDER BY updated_at, idempotency_key",
            (run_id,),
        )
        return [rows.action_row(r) for r in found]

    async def count_actions(self, state: ActionState) -> int:
        if state not in ACTION_STATES:
            raise ValueError(f"no action state {state!r}")
        row = await self._read(
            rows.fetch_one, "SELECT COUNT(*) FROM actions WHERE state = ?", (state,)
        )
        return int(row[0])

    # -- recovery cases ------------------------------------------------------------------------

    async def open_case(self, draft: CaseDraft) -> tuple[CaseRow, bool]:
        return await self._write(functools.partial(ops.open_case, now=self._clock(), draft=draft))

    async def transition(
        self, case_id: str, from_state: str, to_state: str, actor: str,
        evidence: Mapping[str, Any], **fields: str | None,
    ) -> CaseRow:
        unknown = set(fields) - CASE_UPDATABLE_FIELDS
        if unknown:
            raise ValueError(f"a transition cannot set {sorted(unknown)}")
        return await self._write(functools.partial(
            ops.transition, now=self._clock(), case_id=case_id, from_state=from_state,
            to_state=to_state, actor=actor, evidence=rows.dump_json(evidence), fields=fields,
        ))

    async def get_case(self, case_id: str) -> CaseRow | None:
        found: CaseRow | None = await self._read(rows.get_case, case_id)
        return found

    async def list_cases(
        self, state: str | None = None, connection_id: str | None = None,
        run_id: str | None = None, open_only: bool = False,
    ) -> list[CaseRow]:
        where, params = ["1 = 1"], []
        for column, value in (("state", state), ("connection_id", connection_id),
                              ("run_id", run_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if open_only:
            final = sorted(FINAL_CASE_STATES)
            where.append(f"state NOT IN ({', '.join('?' for _ in final)})")
            params.extend(final)
        found = await self._read(
            rows.fetch_all,
            f"SELECT {rows.CASE_COLUMNS} FROM cases WHERE {' AND '.join(where)}"
            " ORDER BY created_at, case_id",
            tuple(params),
        )
        return [rows.case_row(r) for r in found]

    async def transitions(self, case_id: str) -> list[TransitionRow]:
        found = await self._read(
            rows.fetch_all,
            f"SELECT {rows.TRANSITION_COLUMNS} FROM transitions WHERE case_id = ? ORDER BY seq",
            (case_id,),
        )
        return [rows.transition_row(r) for r in found]

    # -- redemption ----------------------------------------------------------------------------

    async def redeem(
        self, jti: str, exp: float, case_id: str, run_id: str, expected_epoch: int, actor: str
    ) -> RedeemResult:
        return await self._write(functools.partial(
            ops.redeem, now=self._clock(), jti=jti, exp=exp, case_id=case_id, run_id=run_id,
            expected_epoch=expected_epoch, actor=actor,
        ))


def _migrate(conn: sqlite3.Connection, migrations: tuple[Migration, ...], now: float) -> None:
    """Apply the pending migrations in one transaction under the write lock (on a thread)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(SCHEMA_VERSION_DDL)
        row = rows.fetch_one(conn, "SELECT MAX(version) FROM schema_version", ())
        for migration in pending(migrations, row[0] if row else None):
            for statement in split_statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, now),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
