"""The SQLite store's write operations, each run by the group-commit writer in its savepoint.

Each function is plain synchronous code over the stdlib ``sqlite3`` connection the writer process
owns (it runs a whole batch of them in one transaction, never on the event loop); each reaches
the writer pickled, as a ``functools.partial`` of the function. Each is one logical transaction: it reads and writes through that connection only and
raises a ``revive.errors`` problem or :class:`ConflictError` to refuse, which rolls back
its savepoint and nothing else. ``now`` is taken by the caller when it submits the operation.
"""

from __future__ import annotations

import sqlite3
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
from revive.store.models import (
    PAST_RECOVERY_CASE_STATES,
    ActionRow,
    AtRiskRow,
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

Conn = sqlite3.Connection


def fence_error(
    run_id: str, epoch: int, stored_epoch: int | None,
    connection_id: str, generation: int, stored_generation: int | None,
) -> Fenced | None:
    """The refusal for a capability whose epoch or generation is not the store's, if any.

    The stored values stay out of the problem: telling a stale worker the current epoch would
    hand it what it needs to mint its way back in.
    """
    if stored_epoch is None or epoch != stored_epoch:
        return Fenced("stale or unknown run epoch", run_id=run_id, epoch=epoch)
    if stored_generation is None or generation != stored_generation:
        return Fenced(
            "stale or unknown credential generation",
            connection_id=connection_id, generation=generation,
        )
    return None


def _count(conn: Conn, sql: str, params: tuple[Any, ...]) -> int:
    cursor = conn.execute(sql, params)
    try:
        return cursor.rowcount
    finally:
        cursor.close()


# -- connections ---------------------------------------------------------------------------------


def ensure_connection(conn: Conn, now: float, connection_id: str) -> ConnectionRow:
    conn.execute(
        "INSERT INTO connections (connection_id, generation, state, updated_at)"
        " VALUES (?, 1, 'active', ?) ON CONFLICT (connection_id) DO NOTHING",
        (connection_id, now),
    )
    found = rows.get_connection(conn, connection_id)
    assert found is not None
    return found


def record_reconnect(
    conn: Conn, now: float, connection_id: str, expected_generation: int
) -> ConnectionRow:
    row = rows.fetch_one(
        conn,
        "UPDATE connections SET generation = generation + 1, state = 'active', updated_at = ?"
        f" WHERE connection_id = ? AND generation = ? RETURNING {rows.CONNECTION_COLUMNS}",
        (now, connection_id, expected_generation),
    )
    if row is not None:
        return rows.connection_row(row)
    current = rows.get_connection(conn, connection_id)
    if current is None:
        raise NotFound("unknown connection", connection_id=connection_id)
    raise ConflictError(
        "connection", connection_id, f"generation {expected_generation}",
        f"generation {current.generation}",
    )


def mark_at_risk(
    conn: Conn, now: float, connection_id: str, reason: str, detail: str,
    expires_at: float | None,
) -> AtRiskRow:
    row = rows.fetch_one(
        conn, rows.UPSERT_AT_RISK.format("?", "?", "?", "?", "?"),
        (connection_id, reason, detail, expires_at, now),
    )
    assert row is not None  # an upsert with RETURNING always yields its row
    return rows.at_risk_row(row)


def clear_at_risk(conn: Conn, now: float, connection_id: str) -> bool:
    return _count(
        conn, "DELETE FROM connections_at_risk WHERE connection_id = ?", (connection_id,)
    ) > 0


# -- runs ------------------------------------------------------------------------------------------


def blocking_case(conn: Conn, run_id: str) -> CaseRow | None:
    """The oldest case of the run that still stands between it and new capabilities."""
    past = sorted(PAST_RECOVERY_CASE_STATES)
    marks = ", ".join("?" for _ in past)
    row = rows.fetch_one(
        conn,
        f"SELECT {rows.CASE_COLUMNS} FROM cases WHERE run_id = ? AND state NOT IN ({marks})"
        " ORDER BY created_at, case_id LIMIT 1",
        (run_id, *past),
    )
    return None if row is None else rows.case_row(row)


def mint_check(
    conn: Conn, now: float, run_id: str, epoch: int, workflow: str | None
) -> RunRow:
    run = rows.get_run(conn, run_id)
    if run is None:
        if epoch != 1:
            raise Fenced("unknown run: the first epoch is 1", run_id=run_id, epoch=epoch)
        conn.execute(
            "INSERT INTO runs (run_id, epoch, workflow, created_at, updated_at)"
            " VALUES (?, 1, ?, ?, ?)",
            (run_id, workflow, now, now),
        )
        return RunRow(run_id, 1, workflow, now, now)
    if epoch != run.epoch:
        raise Fenced("stale or unknown run epoch", run_id=run_id, epoch=epoch)
    case = blocking_case(conn, run_id)
    if case is not None:
        raise RecoveryRequired(
            "the run waits for a recovery case",
            case_id=case.case_id, run_id=case.run_id, checkpoint_id=case.checkpoint_id,
            action_key=case.action_key, provider_code=case.provider_code,
        )
    return run


# -- action ledger -------------------------------------------------------------------------------

_CLAIM_NEW = (
    "INSERT INTO actions (idempotency_key, run_id, action_key, checkpoint_id, connection_id,"
    " fingerprint, state, attempts, owner, updated_at)"
    " SELECT ?, ?, ?, ?, ?, ?, 'in_flight', 1, ?, ?"
    " WHERE (SELECT epoch FROM runs WHERE run_id = ?) = ?"
    " AND (SELECT generation FROM connections WHERE connection_id = ?) = ?"
    " ON CONFLICT (idempotency_key) DO NOTHING"
)
_CLAIM_PROBE = (
    "SELECT (SELECT epoch FROM runs WHERE run_id = ?),"
    " (SELECT generation FROM connections WHERE connection_id = ?),"
    " EXISTS (SELECT 1 FROM actions WHERE idempotency_key = ?)"
)


def claim(conn: Conn, now: float, req: ClaimRequest) -> ClaimOutcome:
    # Every mutating request runs this in the writer process. The usual case, a fresh key under
    # a current epoch and generation, is one statement: the insert happens only if the fence holds and the key is new, and the row
    # is built from what was inserted rather than read back. Anything else takes the probe.
    key = req.idempotency_key
    inserted = _count(conn, _CLAIM_NEW, (
        key, req.run_id, req.action_key, req.checkpoint_id, req.connection_id, req.fingerprint,
        req.owner, now, req.run_id, req.epoch, req.connection_id, req.generation,
    ))
    if inserted:
        return ClaimOutcome("claimed", ActionRow(
            key, req.run_id, req.action_key, req.checkpoint_id, req.connection_id,
            req.fingerprint, "in_flight", 1, None, None, None, req.owner, None, now,
        ))
    found = rows.fetch_one(conn, _CLAIM_PROBE, (req.run_id, req.connection_id, key))
    assert found is not None  # a SELECT without FROM always yields one row
    refusal = fence_error(
        req.run_id, req.epoch, found[0], req.connection_id, req.generation, found[1]
    )
    if refusal is not None:
        raise refusal
    current = rows.get_action(conn, key)
    if current is None:  # fenced out above, or inserted: nothing else leaves no row
        raise ConflictError("action", key, "a row after the claim", "none")
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
            row = rows.fetch_one(
                conn,
                "UPDATE actions SET state = 'in_flight', attempts = attempts + 1, owner = ?,"
                " checkpoint_id = ?, connection_id = ?, status = NULL, response = NULL,"
                " updated_at = ? WHERE idempotency_key = ? AND state = 'not_committed'"
                f" RETURNING {rows.ACTION_COLUMNS}",
                (req.owner, req.checkpoint_id, req.connection_id, now, key),
            )
            assert row is not None
            return ClaimOutcome("claimed", rows.action_row(row))
    raise ConflictError("action", key, "a ledger state", current.state)


def finish(
    conn: Conn, now: float, key: str, owner: str, state: FinishState,
    status: int | None, response: str | None, case_id: str | None,
) -> FinishedAction:
    row = rows.fetch_one(
        conn,
        "UPDATE actions SET state = ?, status = ?, response = ?,"
        " case_id = COALESCE(?, case_id), updated_at = ?"
        " WHERE idempotency_key = ? AND state = 'in_flight' AND owner = ? RETURNING case_id",
        (state, status, response, case_id, now, key, owner),
    )
    if row is not None:
        return FinishedAction(key, state, status, row[0])
    current = rows.get_action(conn, key)
    if current is None:
        raise NotFound("unknown idempotency key", idempotency_key=key)
    raise ConflictError(
        "action", key, f"in_flight owned by {owner}", f"{current.state} owned by {current.owner}"
    )


def settle(
    conn: Conn, now: float, key: str, outcome: str, evidence: str,
    status: int | None, response: str | None,
) -> ActionRow:
    row = rows.fetch_one(
        conn,
        "UPDATE actions SET state = ?, evidence = ?, status = COALESCE(?, status),"
        " response = COALESCE(?, response), updated_at = ?"
        f" WHERE idempotency_key = ? AND state = 'unknown' RETURNING {rows.ACTION_COLUMNS}",
        (outcome, evidence, status, response, now, key),
    )
    if row is not None:
        return rows.action_row(row)
    current = rows.get_action(conn, key)
    if current is None:
        raise NotFound("unknown idempotency key", idempotency_key=key)
    if current.state == outcome:
        return current
    raise ConflictError("action", key, f"unknown or {outcome}", current.state)


def sweep_in_flight(conn: Conn, now: float, owner: str) -> int:
    return _count(
        conn,
        "UPDATE actions SET state = 'unknown', updated_at = ?"
        " WHERE owner = ? AND state = 'in_flight'",
        (now, owner),
    )


# -- recovery cases ------------------------------------------------------------------------------


def _append(
    conn: Conn, case_id: str, seq: int, from_state: str | None, to_state: str,
    at: float, actor: str, evidence: str,
) -> None:
    conn.execute(
        f"INSERT INTO transitions ({rows.TRANSITION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (case_id, seq, from_state, to_state, at, actor, evidence),
    )


def open_case(conn: Conn, now: float, draft: CaseDraft) -> tuple[CaseRow, bool]:
    evidence = rows.dump_json(draft.evidence)
    case_id = draft.case_id or f"case_{uuid.uuid4().hex}"
    row = rows.fetch_one(
        conn,
        f"INSERT INTO cases ({rows.CASE_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', 1, NULL, ?, ?, ?)"
        " ON CONFLICT (run_id, connection_id, generation) DO NOTHING"
        f" RETURNING {rows.CASE_COLUMNS}",
        (case_id, draft.run_id, draft.connection_id, draft.generation, draft.epoch,
         draft.checkpoint_id, draft.action_key, draft.idempotency_key, draft.failure_class,
         draft.provider_code, draft.provider_message, evidence, draft.workflow, now, now),
    )
    created = row is not None
    if row is None:
        row = rows.fetch_one(
            conn,
            f"SELECT {rows.CASE_COLUMNS} FROM cases"
            " WHERE run_id = ? AND connection_id = ? AND generation = ?",
            (draft.run_id, draft.connection_id, draft.generation),
        )
        if row is None:  # the draft's case_id is taken by another case
            raise ConflictError("case", case_id, "a new case id", "taken")
    case = rows.case_row(row)
    if created:
        _append(conn, case.case_id, 1, None, "open", now, draft.actor, evidence)
        conn.execute(
            "UPDATE connections SET state = 'dead', updated_at = ?"
            " WHERE connection_id = ? AND generation = ?",
            (now, draft.connection_id, draft.generation),
        )
    if draft.idempotency_key is not None:
        conn.execute(
            "UPDATE actions SET case_id = ? WHERE idempotency_key = ? AND case_id IS NULL",
            (case.case_id, draft.idempotency_key),
        )
    return case, created


def transition(
    conn: Conn, now: float, case_id: str, from_state: str, to_state: str,
    actor: str, evidence: str, fields: dict[str, str | None],
) -> CaseRow:
    # Column names come from CASE_UPDATABLE_FIELDS (checked by the caller), never from input.
    sets = "".join(f", {name} = ?" for name in fields)
    row = rows.fetch_one(
        conn,
        f"UPDATE cases SET state = ?, version = version + 1, updated_at = ?{sets}"
        f" WHERE case_id = ? AND state = ? RETURNING {rows.CASE_COLUMNS}",
        (to_state, now, *fields.values(), case_id, from_state),
    )
    if row is None:
        current = rows.get_case(conn, case_id)
        if current is None:
            raise NotFound("unknown case", case_id=case_id)
        raise ConflictError("case", case_id, from_state, current.state)
    case = rows.case_row(row)
    _append(conn, case_id, case.version, from_state, to_state, now, actor, evidence)
    return case


def redeem(
    conn: Conn, now: float, jti: str, exp: float, case_id: str, run_id: str,
    expected_epoch: int, actor: str,
) -> RedeemResult:
    case = rows.get_case(conn, case_id)
    if case is None or case.run_id != run_id:
        raise CapabilityInvalid("the capability names no case of this run", case_id=case_id)
    try:
        conn.execute(
            "INSERT INTO burned_capabilities (jti, case_id, exp, burned_at) VALUES (?, ?, ?, ?)",
            (jti, case_id, exp, now),
        )
    except sqlite3.IntegrityError as exc:
        raise CapabilityInvalid("capability already used", case_id=case_id) from exc
    epoch = expected_epoch + 1
    evidence = rows.dump_json({"jti": jti, "epoch": epoch})
    try:
        resumed = transition(conn, now, case_id, "ready", "resumed", actor, evidence, {})
    except ConflictError as exc:
        raise CapabilityInvalid(
            "the case is not ready for redemption", case_id=case_id, case_state=exc.actual
        ) from exc
    bumped = _count(
        conn,
        "UPDATE runs SET epoch = ?, updated_at = ? WHERE run_id = ? AND epoch = ?",
        (epoch, now, run_id, expected_epoch),
    )
    if not bumped:
        raise Fenced("the run's epoch moved", run_id=run_id, epoch=expected_epoch)
    action = None
    if resumed.idempotency_key is not None:
        action = rows.get_action(conn, resumed.idempotency_key)
    return RedeemResult(epoch, resumed, action)
