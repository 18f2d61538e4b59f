"""``PostgresStore``: the ``Store`` that several sidecars share (DESIGN §9, issue 6).

One asyncpg pool per sidecar. Every method borrows one connection for one transaction (or for
one statement, which PostgreSQL runs as its own transaction), and every decision that two
sidecars could race for is a row-level compare-and-set in ``_pg_ops``. Driver exceptions are
translated once, here, in :meth:`PostgresStore._run`: a constraint violation is a lost race
(:class:`ConflictError`), anything else the driver or the server raises is
:class:`StoreUnavailable`; a deadlock or serialization failure is retried first, because the
transaction was rolled back whole and can simply run again.

Migrations are the same numbered files SQLite runs, applied in one transaction holding a
transaction-scoped advisory lock, so any number of sidecars starting at once apply each file once.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from revive.errors import ReviveError
from revive.store import _pg_ops as ops
from revive.store import _sqlite_rows as rows
from revive.store._pg_connect import PgTarget, parse_url, resolve
from revive.store._sqlite_ops import fence_error
from revive.store.migrate import SCHEMA_VERSION_DDL, load_migrations, pending
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
    ConflictError,
    ConnectionRow,
    FinishState,
    Outcome,
    RedeemResult,
    RunRow,
    StoreUnavailable,
    TransitionRow,
)

T = TypeVar("T")

MIGRATION_LOCK = 0x7265_7669  # "revi": advisory lock class id; the object id hashes the schema
RETRIES = 3
"""Attempts for a transaction PostgreSQL aborted as a deadlock or serialization failure."""
ACQUIRE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0
_FINISH_STATES = frozenset({"committed", "failed", "not_committed", "unknown"})
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def translate(exc: BaseException) -> ReviveError:
    """Map a driver error onto the store's own errors (STYLE 11); callers raise ``from exc``."""
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return ConflictError("row", "?", "no constraint violation", str(exc))
    return StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}")


def _check_response(response: str | None) -> None:
    if response is not None and len(response) > MAX_RESPONSE_CHARS:
        raise ValueError(f"stored response over {MAX_RESPONSE_CHARS} characters")


class PostgresStore:
    """The PostgreSQL ``Store``; build it with :meth:`open`, which also applies the migrations."""

    def __init__(self, pool: Any, target: PgTarget, clock: Callable[[], float]) -> None:
        self._pool = pool
        self.schema = target.schema
        self._clock = clock

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, *, schema: str | None = None, pool_size: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> AsyncIterator[PostgresStore]:
        """Connect a pool, migrate, and close the pool on exit.

        Args:
            url: ``postgresql://user[:password]@host[:port]/db[?schema=NAME&pool_size=N&...]``;
                other query parameters (``sslmode``, ...) are libpq's.
            schema: the schema holding the tables (overrides ``schema=``); created if missing.
                ``None``: the server's ``search_path`` decides (usually ``public``).
            pool_size: connections at most (overrides ``pool_size=``; default 10).
            clock: unix-seconds clock for every timestamp (tests pass a fake one).

        Raises:
            ConfigError: a malformed URL.
            StoreUnavailable: the server cannot be reached, or a migration failed.
        """
        target = parse_url(url, schema, pool_size)
        pool = await _create_pool(target)
        store = cls(pool, target, clock)
        try:
            await store.setup()
            yield store
        finally:
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
            except TimeoutError:
                pool.terminate()

    async def setup(self) -> None:
        """Apply pending migrations in one transaction under an advisory lock (idempotent)."""
        migrations = await load_migrations()
        now = self._clock()

        async def migrate(conn: Any) -> None:
            async with conn.transaction():
                # Keyed by search_path: stores in other schemas of one database do not wait.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext(current_setting('search_path')))",
                    MIGRATION_LOCK,
                )
                if self.schema is not None:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(SCHEMA_VERSION_DDL)
                current = await conn.fetchval("SELECT MAX(version) FROM schema_version")
                for migration in pending(migrations, current):
                    await conn.execute(migration.sql)  # a script: simple query protocol
                    await conn.execute(
                        "INSERT INTO schema_version (version, name, applied_at)"
                        " VALUES ($1, $2, $3)",
                        migration.version, migration.name, now,
                    )

        await self._run(migrate)

    async def schema_version(self) -> int | None:
        """The highest applied migration (``None`` before :meth:`setup`)."""
        version: int | None = await self._run(
            lambda c: c.fetchval("SELECT MAX(version) FROM schema_version")
        )
        return version

    async def _run(self, fn: Callable[[Any], Awaitable[T]], tx: bool = False) -> T:
        """``fn(connection)`` on a pooled connection (in a transaction when ``tx``); the one
        place driver errors become the store's errors."""
        for attempt in range(1, RETRIES + 1):
            try:
                async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                    if not tx:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except _RETRYABLE as exc:
                if attempt == RETRIES:
                    raise translate(exc) from exc
            except _DRIVER_ERRORS as exc:
                raise translate(exc) from exc
        raise AssertionError("unreachable")

    async def _tx(self, op: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
        return await self._run(functools.partial(op, now=self._clock(), **kwargs), tx=True)

    async def _one(self, op: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
        """An operation whose only change is one statement: its own transaction."""
        return await self._run(functools.partial(op, now=self._clock(), **kwargs))

    async def ping(self) -> None:
        await self._run(lambda c: c.fetchval("SELECT 1"))

    # -- connections ---------------------------------------------------------------------------

    async def ensure_connection(self, connection_id: str) -> ConnectionRow:
        return await self._one(ops.ensure_connection, connection_id=connection_id)

    async def get_connection(self, connection_id: str) -> ConnectionRow | None:
        return await self._run(lambda c: ops.get_connection(c, connection_id))

    async def record_reconnect(self, connection_id: str, expected_generation: int) -> ConnectionRow:
        return await self._one(
            ops.record_reconnect, connection_id=connection_id,
            expected_generation=expected_generation,
        )

    async def mark_at_risk(
        self, connection_id: str, reason: str, detail: str, expires_at: float | None = None
    ) -> AtRiskRow:
        now = self._clock()
        row = await self._run(lambda c: c.fetchrow(
            rows.UPSERT_AT_RISK.format("$1", "$2", "$3", "$4", "$5"),
            connection_id, reason, detail, expires_at, now,
        ))
        return rows.at_risk_row(row)

    async def clear_at_risk(self, connection_id: str) -> bool:
        status: str = await self._run(lambda c: c.execute(
            "DELETE FROM connections_at_risk WHERE connection_id = $1", connection_id
        ))
        return ops.updated(status) > 0

    async def list_at_risk(self) -> list[AtRiskRow]:
        found = await self._run(lambda c: c.fetch(
            f"SELECT {rows.AT_RISK_COLUMNS} FROM connections_at_risk ORDER BY connection_id"
        ))
        return [rows.at_risk_row(r) for r in found]

    # -- runs ----------------------------------------------------------------------------------

    async def mint_check(self, run_id: str, epoch: int, workflow: str | None = None) -> RunRow:
        return await self._tx(ops.mint_check, run_id=run_id, epoch=epoch, workflow=workflow)

    async def get_run(self, run_id: str) -> RunRow | None:
        return await self._run(lambda c: ops.get_run(c, run_id))

    async def check_fence(
        self, run_id: str, epoch: int, connection_id: str, generation: int
    ) -> None:
        row = await self._run(lambda c: c.fetchrow(
            "SELECT (SELECT epoch FROM runs WHERE run_id = $1),"
            " (SELECT generation FROM connections WHERE connection_id = $2)",
            run_id, connection_id,
        ))
        refusal = fence_error(run_id, epoch, row[0], connection_id, generation, row[1])
        if refusal is not None:
            raise refusal

    # -- action ledger -------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> ClaimOutcome:
        claimed = await self._one(ops.claim_new, req=request)
        if claimed is not None:
            return claimed
        return await self._tx(ops.claim_existing, req=request)

    async def finish(
        self, idempotency_key: str, owner: str, state: FinishState,
        status: int | None = None, response: str | None = None, case_id: str | None = None,
    ) -> FinishedAction:
        if state not in _FINISH_STATES:
            raise ValueError(f"cannot finish an action as {state!r}")
        _check_response(response)
        return await self._one(
            ops.finish, key=idempotency_key, owner=owner, state=state, status=status,
            response=response, case_id=case_id,
        )

    async def settle(
        self, idempotency_key: str, outcome: Outcome, evidence: Mapping[str, Any],
        status: int | None = None, response: str | None = None,
    ) -> ActionRow:
        if outcome not in ("committed", "not_committed"):
            raise ValueError(f"cannot settle an action as {outcome!r}")
        _check_response(response)
        return await self._one(
            ops.settle, key=idempotency_key, outcome=outcome, evidence=rows.dump_json(evidence),
            status=status, response=response,
        )

    async def sweep_in_flight(self, owner: str) -> int:
        now = self._clock()
        status: str = await self._run(lambda c: c.execute(
            "UPDATE actions SET state = 'unknown', updated_at = $1"
            " WHERE owner = $2 AND state = 'in_flight'",
            now, owner,
        ))
        return ops.updated(status)

    async def get_action(self, idempotency_key: str) -> ActionRow | None:
        return await self._run(lambda c: ops.get_action(c, idempotency_key))

    async def list_actions(self, run_id: str) -> list[ActionRow]:
        found = await self._run(lambda c: c.fetch(
            f"SELECT {rows.ACTION_COLUMNS} FROM actions WHERE run_id = $1"
            " ORDER BY updated_at, idempotency_key",
            run_id,
        ))
        return [rows.action_row(r) for r in found]

    async def count_actions(self, state: ActionState) -> int:
        if state not in ACTION_STATES:
            raise ValueError(f"no action state {state!r}")
        count = await self._run(
            lambda c: c.fetchval("SELECT COUNT(*) FROM actions WHERE state = $1", state)
        )
        return int(count)

    # -- recovery cases ------------------------------------------------------------------------

    async def open_case(self, draft: CaseDraft) -> tuple[CaseRow, bool]:
        return await self._tx(ops.open_case, draft=draft)

    async def transition(
        self, case_id: str, from_state: str, to_state: str, actor: str,
        evidence: Mapping[str, Any], **fields: str | None,
    ) -> CaseRow:
        unknown = set(fields) - CASE_UPDATABLE_FIELDS
        if unknown:
            raise ValueError(f"a transition cannot set {sorted(unknown)}")
        return await self._tx(
            ops.transition, case_id=case_id, from_state=from_state, to_state=to_state,
            actor=actor, evidence=rows.dump_json(evidence), fields=fields,
        )

    async def get_case(self, case_id: str) -> CaseRow | None:
        return await self._run(lambda c: ops.get_case(c, case_id))

    async def list_cases(
        self, state: str | None = None, connection_id: str | None = None,
        run_id: str | None = None, open_only: bool = False,
    ) -> list[CaseRow]:
        where: list[str] = ["TRUE"]
        params: list[Any] = []
        for column, value in (("state", state), ("connection_id", connection_id),
                              ("run_id", run_id)):
            if value is not None:
                params.append(value)
                where.append(f"{column} = ${len(params)}")
        if open_only:
            params.append(sorted(FINAL_CASE_STATES))
            where.append(f"state <> ALL(${len(params)}::text[])")
        found = await self._run(lambda c: c.fetch(
            f"SELECT {rows.CASE_COLUMNS} FROM cases WHERE {' AND '.join(where)}"
            " ORDER BY created_at, case_id",
            *params,
        ))
        return [rows.case_row(r) for r in found]

    async def transitions(self, case_id: str) -> list[TransitionRow]:
        found = await self._run(lambda c: c.fetch(
            f"SELECT {rows.TRANSITION_COLUMNS} FROM transitions WHERE case_id = $1 ORDER BY seq",
            case_id,
        ))
        return [rows.transition_row(r) for r in found]

    # -- redemption ----------------------------------------------------------------------------

    async def redeem(
        self, jti: str, exp: float, case_id: str, run_id: str, expected_epoch: int, actor: str
    ) -> RedeemResult:
        return await self._tx(
            ops.redeem, jti=jti, exp=exp, case_id=case_id, run_id=run_id,
            expected_epoch=expected_epoch, actor=actor,
        )


async def _create_pool(target: PgTarget) -> Any:
    """Open the pool with resolved credentials; ``sslmode=prefer`` falls back to plain TCP."""
    try:
        connect = await resolve(target)
    except (OSError, ValueError) as exc:
        raise StoreUnavailable(f"postgresql: cannot read TLS or password files: {exc}") from exc
    settings = {"application_name": "revive"}
    if target.schema is not None:
        settings["search_path"] = f'"{target.schema}"'
    kwargs = connect.kwargs()

    async def create() -> Any:
        return await asyncpg.create_pool(
            target.dsn, min_size=1, max_size=target.pool_size, server_settings=settings,
            **kwargs,
        )

    try:
        try:
            return await create()
        except ConnectionError as exc:
            if not (connect.ssl_fallback and "SSL" in str(exc)):
                raise
            kwargs["ssl"] = False  # prefer: the server refused TLS, so go without
            return await create()
    except _DRIVER_ERRORS as exc:
        raise translate(exc) from exc
