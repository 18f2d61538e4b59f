"""The PostgreSQL store's operations: each one transaction, each decided by row-level CAS.

SQLite serialises every writer, so ``_sqlite_ops`` may read, decide, then write. Here several
sidecars write at once under READ COMMITTED, so every decision is taken by the row itself:

- a state change is ``UPDATE ... WHERE <expected state> RETURNING``: of two racers the second
  waits for the first's row lock, re-reads the row, no longer matches and gets no row back;
- a creation is ``INSERT ... ON CONFLICT DO NOTHING RETURNING``: the loser waits for the
  winner's commit and gets no row back (a burned ``jti``, an existing case or key);
- a check another transaction could invalidate before we commit takes a lock: the fence reads
  the run and connection rows ``FOR SHARE``, so a redemption (``UPDATE runs``) or a reconnect
  (``UPDATE connections``) waits for the claim to commit, or the claim sees the new values.

Only the first statement of a failed CAS is a write; the read that explains the failure
(``NotFound`` vs ``ConflictError``) runs after it. Functions raise the same ``revive.errors``
problems, with the same extras, as the SQLite backend; the caller's ``transaction()`` rolls back.
Locks are always taken in one order (run, connection, action; case, run) so there is no deadlock
cycle between two operations here. Driver rows are converted by ``_sqlite_rows``' converters:
asyncpg records index like ``sqlite3.Row`` and the column lists are shared.
"""

from __future__ import annotations

import uuid
from typing import Any

from revive.errors import (
    CapabilityInvalid,
    Fenced,
    IdempotencyMismatch,
    InFlight,
    NotFound,
    ReconcileRequired,
    RecoveryRequired,
)
from revive.store import _sqlite_rows as rows
from revive.store._sqlite_ops import fence_error
from revive.store.models import (
    PAST_RECOVERY_CASE_STATES,
    ActionRow,
    CaseDraft,
    CaseRow,
    ClaimOutcome,
    FinishedAction,
    FinishState,
    ClaimRequest,
    ConflictError,
    ConnectionRow,
    RedeemResult,
    RunRow,
)

Conn = Any
"""An ``asyncpg.Connection`` (asyncpg ships no type information)."""

A, C, R = rows.ACTION_COLUMNS, rows.CASE_COLUMNS, rows.RUN_COLUMNS
_LOCKED_FENCE = (
    "SELECT (SELECT epoch FROM runs WHERE run_id = $1 FOR SHARE) AS fence_epoch,"
    " (SELECT generation FROM connections WHERE connection_id = $2 FOR SHARE) AS fence_generation"
)


def updated(status: str) -> int:
    """Rows an ``UPDATE`` touched, from asyncpg's command tag (``"UPDATE 3"``)."""
    return int(status.rsplit(" ", 1)[-1])


async def get_action(conn: Conn, key: str, lock: bool = False) -> ActionRow | None:
    sql = f"SELECT {A} FROM actions WHERE idempotency_key = $1" + (" FOR UPDATE" if lock else "")
    row = await conn.fetchrow(sql, key)
    return None if row is None else rows.action_row(row)


async def get_case(conn: Conn, case_id: str) -> CaseRow | None:
    row = await conn.fetchrow(f"SELECT {C} FROM cases WHERE case_id = $1", case_id)
    return None if row is None else rows.case_row(row)


async def get_connection(conn: Conn, connection_id: str) -> ConnectionRow | None:
    row = await conn.fetchrow(
        f"SELECT {rows.CONNECTION_COLUMNS} FROM connections WHERE connection_id = $1",
        connection_id,
    )
    return None if row is None else rows.connection_row(row)


async def get_run(conn: Conn, run_id: str, lock: bool = False) -> RunRow | None:
    sql = f"SELECT {R} FROM runs WHERE run_id = $1" + (" FOR SHARE" if lock else "")
    row = await conn.fetchrow(sql, run_id)
    return None if row is None else rows.run_row(row)


# -- connections ---------------------------------------------------------------------------------


async def ensure_connection(conn: Conn, now: float, connection_id: str) -> ConnectionRow:
    # Two statements, no transaction: the INSERT is the only change, and the SELECT's fresh
    # snapshot sees a row a concurrent caller committed while our INSERT waited on it.
    await conn.execute(
        "INSERT INTO connections (connection_id, generation, state, updated_at)"
        " VALUES ($1, 1, 'active', $2) ON CONFLICT (connection_id) DO NOTHING",
        connection_id, now,
    )
    found = await get_connection(conn, connection_id)
    assert found is not None
    return found


async def record_reconnect(
    conn: Conn, now: float, connection_id: str, expected_generation: int
) -> ConnectionRow:
    row = await conn.fetchrow(
        "UPDATE connections SET generation = generation + 1, state = 'active', updated_at = $1"
        f" WHERE connection_id = $2 AND generation = $3 RETURNING {rows.CONNECTION_COLUMNS}",
        now, connection_id, expected_generation,
    )
    if row is not None:
        return rows.connection_row(row)
    current = await get_connection(conn, connection_id)
    if current is None:
        raise NotFound("unknown connection", connection_id=connection_id)
    raise ConflictError(
        "connection", connection_id, f"generation {expected_generation}",
        f"generation {current.generation}",
    )


# -- runs (inside a transaction) -----------------------------------------------------------------


async def mint_check(
    conn: Conn, now: float, run_id: str, epoch: int, workflow: str | None
) -> RunRow:
    """The run row is read ``FOR SHARE``: a redemption cannot bump the epoch under our answer."""
    run = await get_run(conn, run_id, lock=True)
    if run is None:
        if epoch != 1:
            raise Fenced("unknown run: the first epoch is 1", run_id=run_id, epoch=epoch)
        row = await conn.fetchrow(
            "INSERT INTO runs (run_id, epoch, workflow, created_at, updated_at)"
            f" VALUES ($1, 1, $2, $3, $3) ON CONFLICT (run_id) DO NOTHING RETURNING {R}",
            run_id, workflow, now,
        )
        if row is not None:
            return rows.run_row(row)
        run = await get_run(conn, run_id, lock=True)  # another sidecar created it just now
        assert run is not None
    if epoch != run.epoch:
        raise Fenced("stale or unknown run epoch", run_id=run_id, epoch=epoch)
    past = sorted(PAST_RECOVERY_CASE_STATES)
    row = await conn.fetchrow(
        f"SELECT {C} FROM cases WHERE run_id = $1 AND state <> ALL($2::text[])"
        " ORDER BY created_at, case_id LIMIT 1",
        run_id, past,
    )
    if row is not None:
        case = rows.case_row(row)
        raise RecoveryRequired(
            "the run waits for a recovery case",
            case_id=case.case_id, run_id=case.run_id, checkpoint_id=case.checkpoint_id,
            action_key=case.action_key, provider_code=case.provider_code,
        )
    return run


# -- action ledger -------------------------------------------------------------------------------

CLAIM_NEW_SQL = (
    f"WITH fence AS ({_LOCKED_FENCE}), claimed AS ("
    " INSERT INTO actions (idempotency_key, run_id, action_key, checkpoint_id, connection_id,"
    " fingerprint, state, attempts, owner, updated_at)"
    " SELECT $3::text, $1::text, $4::text, $5::text, $2::text, $6::text, 'in_flight', 1,"
    " $7::text, $8::double precision FROM fence"
    " WHERE fence_epoch = $9::integer AND fence_generation = $10::integer"
    f" ON CONFLICT (idempotency_key) DO NOTHING RETURNING {A})"
    " SELECT claimed.*, fence.* FROM fence LEFT JOIN claimed ON true"
)
"""A new key's whole claim in one statement (its own transaction): locked fence, then insert.

It returns the inserted row's columns (all NULL unless the fence held and the key was new), then
the fence values, so ``action_row`` reads the row by position as it does elsewhere.
"""


async def claim_new(conn: Conn, now: float, req: ClaimRequest) -> ClaimOutcome | None:
    """The common case in one round trip; ``None``: the key exists, use :func:`claim_existing`."""
    row = await conn.fetchrow(
        CLAIM_NEW_SQL, req.run_id, req.connection_id, req.idempotency_key, req.action_key,
        req.checkpoint_id, req.fingerprint, req.owner, now, req.epoch, req.generation,
    )
    refusal = fence_error(
        req.run_id, req.epoch, row["fence_epoch"], req.connection_id, req.generation,
        row["fence_generation"],
    )
    if refusal is not None:
        raise refusal
    if row["idempotency_key"] is None:
        return None
    return ClaimOutcome("claimed", rows.action_row(row))


async def claim_existing(conn: Conn, now: float, req: ClaimRequest) -> ClaimOutcome:
    """Claim a key that exists, inside a transaction: fence again, then lock the action row."""
    fence = await conn.fetchrow(_LOCKED_FENCE, req.run_id, req.connection_id)
    refusal = fence_error(
        req.run_id, req.epoch, fence[0], req.connection_id, req.generation, fence[1]
    )
    if refusal is not None:
        raise refusal
    key = req.idempotency_key
    current = await get_action(conn, key, lock=True)
    if current is None:  # rows are never deleted: only a vanished schema gets here
        raise ConflictError("action", key, "an existing key", "none")
    if current.fingerprint != req.fingerprint or current.run_id != req.run_id:
        raise IdempotencyMismatch("the key was used for another request", idempotency_key=key)
    match current.state:
        case "in_flight":
            raise InFlight(idempotency_key=key)
        case "committed" | "failed":
            return ClaimOutcome("replay", current)
        case "unknown":
            raise ReconcileRequired(idempotency_key=key)
        case "not_committed":
            row = await conn.fetchrow(
                "UPDATE actions SET state = 'in_flight', attempts = attempts + 1, owner = $1,"
                " checkpoint_id = $2, connection_id = $3, status = NULL, response = NULL,"
                " updated_at = $4 WHERE idempotency_key = $5 AND state = 'not_committed'"
                f" RETURNING {A}",
                req.owner, req.checkpoint_id, req.connection_id, now, key,
            )
            assert row is not None  # the row is locked FOR UPDATE by us
            return ClaimOutcome("claimed", rows.action_row(row))
    raise ConflictError("action", key, "a ledger state", current.state)


async def finish(
    conn: Conn, now: float, key: str, owner: str, state: FinishState,
    status: int | None, response: str | None, case_id: str | None,
) -> FinishedAction:
    row = await conn.fetchrow(
        "UPDATE actions SET state = $1, status = $2, response = $3,"
        " case_id = COALESCE($4, case_id), updated_at = $5"
        " WHERE idempotency_key = $6 AND state = 'in_flight' AND owner = $7 RETURNING case_id",
        state, status, response, case_id, now, key, owner,
    )
    if row is not None:
        return FinishedAction(key, state, status, row[0])
    current = await get_action(conn, key)
    if current is None:
        raise NotFound("unknown idempotency key", idempotency_key=key)
    raise ConflictError(
        "action", key, f"in_flight owned by {owner}", f"{current.state} owned by {current.owner}"
    )


async def settle(
    conn: Conn, now: float, key: str, outcome: str, evidence: str,
    status: int | None, response: str | None,
) -> ActionRow:
    row = await conn.fetchrow(
        "UPDATE actions SET state = $1, evidence = $2, status = COALESCE($3, status),"
        " response = COALESCE($4, response), updated_at = $5"
        f" WHERE idempotency_key = $6 AND state = 'unknown' RETURNING {A}",
        outcome, evidence, status, response, now, key,
    )
    if row is not None:
        return rows.action_row(row)
    current = await get_action(conn, key)
    if current is None:
        raise NotFound("unknown idempotency key", idempotency_key=key)
    if current.state == outcome:
        return current
    raise ConflictError("action", key, f"unknown or {outcome}", current.state)


# -- recovery cases (inside a transaction) -------------------------------------------------------


async def _append(
    conn: Conn, case_id: str, seq: int, from_state: str | None, to_state: str,
    at: float, actor: str, evidence: str,
) -> None:
    await conn.execute(
        f"INSERT INTO transitions ({rows.TRANSITION_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        case_id, seq, from_state, to_state, at, actor, evidence,
    )


async def open_case(conn: Conn, now: float, draft: CaseDraft) -> tuple[CaseRow, bool]:
    evidence = rows.dump_json(draft.evidence)
    case_id = draft.case_id or f"case_{uuid.uuid4().hex}"
    row = await conn.fetchrow(
        f"INSERT INTO cases ({C}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
        " 'open', 1, NULL, $13, $14, $14) ON CONFLICT (run_id, connection_id, generation)"
        f" DO NOTHING RETURNING {C}",
        case_id, draft.run_id, draft.connection_id, draft.generation, draft.epoch,
        draft.checkpoint_id, draft.action_key, draft.idempotency_key, draft.failure_class,
        draft.provider_code, draft.provider_message, evidence, draft.workflow, now,
    )
    created = row is not None
    if row is None:  # a fresh statement: sees the case whose commit our INSERT waited for
        row = await conn.fetchrow(
            f"SELECT {C} FROM cases WHERE run_id = $1 AND connection_id = $2 AND generation = $3",
            draft.run_id, draft.connection_id, draft.generation,
        )
        if row is None:
            raise ConflictError("case", case_id, "a new case id", "taken")
    case = rows.case_row(row)
    if created:
        await _append(conn, case.case_id, 1, None, "open", now, draft.actor, evidence)
        await conn.execute(
            "UPDATE connections SET state = 'dead', updated_at = $1"
            " WHERE connection_id = $2 AND generation = $3",
            now, draft.connection_id, draft.generation,
        )
    if draft.idempotency_key is not None:
        await conn.execute(
            "UPDATE actions SET case_id = $1 WHERE idempotency_key = $2 AND case_id IS NULL",
            case.case_id, draft.idempotency_key,
        )
    return case, created


async def transition(
    conn: Conn, now: float, case_id: str, from_state: str, to_state: str,
    actor: str, evidence: str, fields: dict[str, str | None],
) -> CaseRow:
    # Column names come from CASE_UPDATABLE_FIELDS (checked by the caller), never from input.
    sets = "".join(f", {name} = ${i}" for i, name in enumerate(fields, start=5))
    row = await conn.fetchrow(
        f"UPDATE cases SET state = $1, version = version + 1, updated_at = $2{sets}"
        f" WHERE case_id = $3 AND state = $4 RETURNING {C}",
        to_state, now, case_id, from_state, *fields.values(),
    )
    if row is None:
        current = await get_case(conn, case_id)
        if current is None:
            raise NotFound("unknown case", case_id=case_id)
        raise ConflictError("case", case_id, from_state, current.state)
    case = rows.case_row(row)
    await _append(conn, case_id, case.version, from_state, to_state, now, actor, evidence)
    return case


async def redeem(
    conn: Conn, now: float, jti: str, exp: float, case_id: str, run_id: str,
    expected_epoch: int, actor: str,
) -> RedeemResult:
    """Burn, resume, bump: three CAS writes in one transaction; any refusal undoes them all."""
    case = await get_case(conn, case_id)
    if case is None or case.run_id != run_id:
        raise CapabilityInvalid("the capability names no case of this run", case_id=case_id)
    burned = await conn.fetchval(
        "INSERT INTO burned_capabilities (jti, case_id, exp, burned_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (jti) DO NOTHING RETURNING jti",
        jti, case_id, exp, now,
    )
    if burned is None:
        raise CapabilityInvalid("capability already used", case_id=case_id)
    epoch = expected_epoch + 1
    evidence = rows.dump_json({"jti": jti, "epoch": epoch})
    try:
        resumed = await transition(conn, now, case_id, "ready", "resumed", actor, evidence, {})
    except ConflictError as exc:
        raise CapabilityInvalid(
            "the case is not ready for redemption", case_id=case_id, case_state=exc.actual
        ) from exc
    bumped = await conn.execute(
        "UPDATE runs SET epoch = $1, updated_at = $2 WHERE run_id = $3 AND epoch = $4",
        epoch, now, run_id, expected_epoch,
    )
    if not updated(bumped):
        raise Fenced("the run's epoch moved", run_id=run_id, epoch=expected_epoch)
    action = None
    if resumed.idempotency_key is not None:  # read after the bump: sees any claim it waited for
        action = await get_action(conn, resumed.idempotency_key)
    return RedeemResult(epoch, resumed, action)
