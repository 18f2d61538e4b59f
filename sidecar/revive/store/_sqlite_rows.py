"""Driver rows → the store's frozen rows, and the small synchronous reads both SQLite
connections share (each runs on its connection's own thread, never on the event loop)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any, cast

from revive.store.models import (
    ActionRow,
    ActionState,
    AtRiskRow,
    CaseRow,
    ConnectionRow,
    ConnectionState,
    RunRow,
    TransitionRow,
)

CONNECTION_COLUMNS = "connection_id, generation, state, updated_at"
RUN_COLUMNS = "run_id, epoch, workflow, created_at, updated_at"
ACTION_COLUMNS = (
    "idempotency_key, run_id, action_key, checkpoint_id, connection_id, fingerprint, state,"
    " attempts, status, response, case_id, owner, evidence, updated_at"
)
CASE_COLUMNS = (
    "case_id, run_id, connection_id, generation, epoch, checkpoint_id, action_key,"
    " idempotency_key, failure_class, provider_code, provider_message, evidence, state, version,"
    " outcome, workflow, created_at, updated_at"
)
TRANSITION_COLUMNS = "case_id, seq, from_state, to_state, at, actor, evidence"
AT_RISK_COLUMNS = "connection_id, reason, detail, expires_at, marked_at"
# One mark per connection; ``marked_at`` says since when, so a repeat of the same reason keeps
# it. Both engines spell the upsert this way (SQLite >= 3.24); parameters are named by position.
UPSERT_AT_RISK = (
    f"INSERT INTO connections_at_risk ({AT_RISK_COLUMNS}) VALUES ({{}}, {{}}, {{}}, {{}}, {{}})"
    " ON CONFLICT (connection_id) DO UPDATE SET reason = excluded.reason,"
    " detail = excluded.detail, expires_at = excluded.expires_at,"
    " marked_at = CASE WHEN connections_at_risk.reason = excluded.reason"
    " THEN connections_at_risk.marked_at ELSE excluded.marked_at END"
    f" RETURNING {AT_RISK_COLUMNS}"
)


def dump_json(value: Mapping[str, Any]) -> str:
    """Serialise evidence; a value JSON cannot hold is the caller's bug, raised as ValueError."""
    try:
        return json.dumps(dict(value), ensure_ascii=False, separators=(",", ":"))
    except TypeError as exc:
        raise ValueError(f"evidence is not JSON-serialisable: {exc}") from exc


def _load(text: str | None) -> dict[str, Any] | None:
    return None if text is None else cast(dict[str, Any], json.loads(text))


def connection_row(r: sqlite3.Row) -> ConnectionRow:
    return ConnectionRow(r[0], r[1], cast(ConnectionState, r[2]), r[3])


def run_row(r: sqlite3.Row) -> RunRow:
    return RunRow(r[0], r[1], r[2], r[3], r[4])


def action_row(r: sqlite3.Row) -> ActionRow:
    return ActionRow(
        idempotency_key=r[0], run_id=r[1], action_key=r[2], checkpoint_id=r[3],
        connection_id=r[4], fingerprint=r[5], state=cast(ActionState, r[6]), attempts=r[7],
        status=r[8], response=r[9], case_id=r[10], owner=r[11], evidence=_load(r[12]),
        updated_at=r[13],
    )


def case_row(r: sqlite3.Row) -> CaseRow:
    return CaseRow(
        case_id=r[0], run_id=r[1], connection_id=r[2], generation=r[3], epoch=r[4],
        checkpoint_id=r[5], action_key=r[6], idempotency_key=r[7], failure_class=r[8],
        provider_code=r[9], provider_message=r[10], evidence=_load(r[11]) or {}, state=r[12],
        version=r[13], outcome=r[14], workflow=r[15], created_at=r[16], updated_at=r[17],
    )


def transition_row(r: sqlite3.Row) -> TransitionRow:
    return TransitionRow(r[0], r[1], r[2], r[3], r[4], r[5], _load(r[6]) or {})


def at_risk_row(r: sqlite3.Row) -> AtRiskRow:
    return AtRiskRow(r[0], r[1], r[2], r[3], r[4])


def fetch_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
    cursor = conn.execute(sql, params)
    try:
        row: sqlite3.Row | None = cursor.fetchone()
        return row
    finally:
        cursor.close()  # resets the statement at once, so it holds nothing open


def fetch_all(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
    cursor = conn.execute(sql, params)
    try:
        return list(cursor.fetchall())
    finally:
        cursor.close()


def get_connection(conn: sqlite3.Connection, connection_id: str) -> ConnectionRow | None:
    sql = f"SELECT {CONNECTION_COLUMNS} FROM connections WHERE connection_id = ?"
    row = fetch_one(conn, sql, (connection_id,))
    return None if row is None else connection_row(row)


def get_run(conn: sqlite3.Connection, run_id: str) -> RunRow | None:
    row = fetch_one(conn, f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
    return None if row is None else run_row(row)


def get_action(conn: sqlite3.Connection, key: str) -> ActionRow | None:
    sql = f"SELECT {ACTION_COLUMNS} FROM actions WHERE idempotency_key = ?"
    row = fetch_one(conn, sql, (key,))
    return None if row is None else action_row(row)


def get_case(conn: sqlite3.Connection, case_id: str) -> CaseRow | None:
    row = fetch_one(conn, f"SELECT {CASE_COLUMNS} FROM cases WHERE case_id = ?", (case_id,))
    return None if row is None else case_row(row)


def fence_values(
    conn: sqlite3.Connection, run_id: str, connection_id: str
) -> tuple[int | None, int | None]:
    """The run's epoch and the connection's generation, in one statement (``None``: unknown)."""
    row = fetch_one(
        conn,
        "SELECT (SELECT epoch FROM runs WHERE run_id = ?),"
        " (SELECT generation FROM connections WHERE connection_id = ?)",
        (run_id, connection_id),
    )
    assert row is not None  # a SELECT without FROM always yields one row
    return row[0], row[1]
