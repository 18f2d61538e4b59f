"""The ``Store`` contract: every backend must pass all of it, through the Protocol only.

Covers DESIGN §4 (mint and fence rules), §7 (the ledger's claim table, finish, settle, sweep),
§8 (one case per dead generation, compare-and-set transitions, the incident record) and §5
(single-use redemption). Ids are unique per test, so the suite also runs on a shared database.

Not tested here, on purpose: that a token in evidence is stored verbatim. Redaction is the
caller's job, and no table has a column meant for a token (see migrations/0001_initial.sql).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from revive.errors import (
    CapabilityInvalid,
    Fenced,
    IdempotencyMismatch,
    InFlight,
    NotFound,
    ReconcileRequired,
    RecoveryRequired,
)
from revive.store import (
    CaseDraft,
    CaseRow,
    ClaimRequest,
    ConflictError,
    SqliteStore,
    Store,
    open_store,
)

NewId = Callable[[str], str]
OWNER = "sidecar-a"


@dataclass(frozen=True)
class World:
    """A run at epoch 1 on a connection at generation 1."""

    run_id: str
    connection_id: str

    def key(self, name: str) -> str:
        """An idempotency key or jti unique to this test (the suite may share a database)."""
        return f"{self.run_id}:{name}"


@pytest.fixture
async def world(store: Store, new_id: NewId) -> World:
    connection_id = new_id("conn")
    await store.ensure_connection(connection_id)
    run_id = new_id("run")
    await store.mint_check(run_id, 1)
    return World(run_id, connection_id)


def claim_req(w: World, key: str, **changes: Any) -> ClaimRequest:
    base = ClaimRequest(
        idempotency_key=key, run_id=w.run_id, action_key="send_mail", checkpoint_id="chk_1",
        connection_id=w.connection_id, fingerprint="fp_1", owner=OWNER, epoch=1, generation=1,
    )
    return replace(base, **changes)


def draft(w: World, **changes: Any) -> CaseDraft:
    base = CaseDraft(
        run_id=w.run_id, connection_id=w.connection_id, generation=1, epoch=1,
        checkpoint_id="chk_1", action_key="send_mail", failure_class="dead_grant",
        actor="proxy", provider_code="AADSTS700082", provider_message="grant expired",
        evidence={"status": 400, "error": "invalid_grant"},
    )
    return replace(base, **changes)


async def ready_case(store: Store, w: World, **changes: Any) -> CaseRow:
    """A new case walked to ``ready`` the way the recovery service does."""
    case, _ = await store.open_case(draft(w, **changes))
    return await ready_case_from_open(store, w, case)


async def ready_case_from_open(store: Store, w: World, case: CaseRow) -> CaseRow:
    """Walk an ``open`` case to ``ready``, reconnecting its connection (generation 1 → 2)."""
    await store.transition(case.case_id, "open", "awaiting_reconnect", "svc", {})
    await store.record_reconnect(w.connection_id, 1)
    await store.transition(case.case_id, "awaiting_reconnect", "reconnected", "svc", {})
    return await store.transition(case.case_id, "reconnected", "ready", "svc", {})


async def test_ping(store: Store) -> None:
    await store.ping()


# -- connections ---------------------------------------------------------------------------------


async def test_ensure_connection_creates_generation_one_once(store: Store, new_id: NewId) -> None:
    cid = new_id("conn")
    assert await store.get_connection(cid) is None
    created = await store.ensure_connection(cid)
    assert (created.connection_id, created.generation, created.state) == (cid, 1, "active")
    await store.record_reconnect(cid, 1)
    again = await store.ensure_connection(cid)  # never resets a known connection
    assert again.generation == 2
    assert await store.get_connection(cid) == again


async def test_record_reconnect_is_compare_and_set(store: Store, world: World) -> None:
    cid = world.connection_id
    await store.open_case(draft(world))
    assert (await store.get_connection(cid)).state == "dead"  # type: ignore[union-attr]
    row = await store.record_reconnect(cid, 1)
    assert (row.generation, row.state) == (2, "active")
    with pytest.raises(ConflictError):
        await store.record_reconnect(cid, 1)  # the same reconnect reported twice
    assert (await store.get_connection(cid)).generation == 2  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        await store.record_reconnect("conn_nobody_knows", 1)


# -- connections at risk -------------------------------------------------------------------------


async def _marks(store: Store, *connection_ids: str) -> dict[str, Any]:
    """This test's marks only: the suite may share its database with other tests."""
    found = await store.list_at_risk()
    return {m.connection_id: m for m in found if m.connection_id in connection_ids}


async def test_mark_list_and_clear_at_risk(store: Store, new_id: NewId) -> None:
    a, b = new_id("conn"), new_id("conn")
    assert await _marks(store, a, b) == {}
    mark = await store.mark_at_risk(a, "identity-layer-auth-failed", "nango refresh failed")
    assert (mark.connection_id, mark.reason, mark.detail, mark.expires_at) == (
        a, "identity-layer-auth-failed", "nango refresh failed", None,
    )
    await store.mark_at_risk(b, "idle-grant-expiring", "unused for 80 days", 1_900_000_000.5)
    marks = await _marks(store, a, b)
    assert marks[a] == mark
    assert (marks[b].reason, marks[b].expires_at) == ("idle-grant-expiring", 1_900_000_000.5)
    listed = [m.connection_id for m in await store.list_at_risk() if m.connection_id in (a, b)]
    assert listed == sorted([a, b])
    assert await store.clear_at_risk(a) is True
    assert await store.clear_at_risk(a) is False  # clearing twice is harmless
    assert set(await _marks(store, a, b)) == {b}


async def test_one_mark_per_connection_keeps_since_when(store: Store, new_id: NewId) -> None:
    cid = new_id("conn")
    first = await store.mark_at_risk(cid, "identity-layer-auth-failed", "first failure")
    again = await store.mark_at_risk(cid, "identity-layer-auth-failed", "second failure", 5.0)
    assert (again.detail, again.expires_at) == ("second failure", 5.0)
    assert again.marked_at == first.marked_at  # at risk since the first report
    other = await store.mark_at_risk(cid, "idle-grant-expiring", "idle")
    assert other.reason == "idle-grant-expiring" and other.marked_at >= first.marked_at
    assert list((await _marks(store, cid)).values()) == [other]


async def test_marks_are_shared_by_every_store_on_the_database(
    store: Store, backend: tuple[str, str | None], tmp_path: Path, new_id: NewId
) -> None:
    """The webhook may reach another replica than the one leasing: marks live in the database."""
    cid = new_id("conn")
    name, url = backend
    await store.mark_at_risk(cid, "identity-layer-auth-failed", "reported to replica a")
    if name == "sqlite":
        other_replica = SqliteStore.open(tmp_path / "data" / "revive.db")
    else:
        assert url is not None
        other_replica = open_store(url)
    async with other_replica as other:
        assert set(await _marks(other, cid)) == {cid}
        assert await other.clear_at_risk(cid)
    assert await _marks(store, cid) == {}


# -- runs and fences -----------------------------------------------------------------------------


async def test_mint_creates_a_run_at_epoch_one(store: Store, new_id: NewId) -> None:
    run_id = new_id("run")
    assert await store.get_run(run_id) is None
    run = await store.mint_check(run_id, 1, workflow="mail-digest")
    assert (run.run_id, run.epoch, run.workflow) == (run_id, 1, "mail-digest")
    assert await store.mint_check(run_id, 1) == await store.get_run(run_id)


@pytest.mark.parametrize("epoch", [0, 2])
async def test_mint_refuses_a_new_run_not_at_epoch_one(
    store: Store, new_id: NewId, epoch: int
) -> None:
    run_id = new_id("run")
    with pytest.raises(Fenced):
        await store.mint_check(run_id, epoch)
    assert await store.get_run(run_id) is None


async def test_mint_refuses_older_and_newer_epochs(store: Store, world: World) -> None:
    jti = world.key("jti_1")
    case = await ready_case(store, world)
    await store.redeem(jti, 9e9, case.case_id, world.run_id, 1, "worker")
    assert (await store.mint_check(world.run_id, 2)).epoch == 2
    for stale_or_invented in (1, 3):
        with pytest.raises(Fenced):
            await store.mint_check(world.run_id, stale_or_invented)


async def test_mint_refuses_while_a_case_is_unresolved(store: Store, world: World) -> None:
    key = world.key("key_1")
    case, _ = await store.open_case(draft(world, idempotency_key=key))
    for state in ("open", "awaiting_reconnect"):
        with pytest.raises(RecoveryRequired) as refused:
            await store.mint_check(world.run_id, 1)
        assert refused.value.extra["case_id"] == case.case_id
        assert refused.value.extra["checkpoint_id"] == "chk_1"
        assert refused.value.extra["action_key"] == "send_mail"
        assert refused.value.extra["provider_code"] == "AADSTS700082"
        if state == "open":
            await store.transition(case.case_id, "open", "awaiting_reconnect", "svc", {})
    await store.transition(case.case_id, "awaiting_reconnect", "abandoned", "admin", {})
    assert (await store.mint_check(world.run_id, 1)).epoch == 1


async def test_mint_allowed_once_the_case_is_resumed(store: Store, world: World) -> None:
    """DESIGN §10: the run's other actions mint for the new epoch while the case is resumed."""
    jti = world.key("jti_1")
    case = await ready_case(store, world)
    with pytest.raises(RecoveryRequired):
        await store.mint_check(world.run_id, 1)
    await store.redeem(jti, 9e9, case.case_id, world.run_id, 1, "worker")
    assert (await store.get_case(case.case_id)).state == "resumed"  # type: ignore[union-attr]
    assert (await store.mint_check(world.run_id, 2)).epoch == 2


async def test_check_fence(store: Store, world: World) -> None:
    run, cid = world.run_id, world.connection_id
    await store.check_fence(run, 1, cid, 1)
    for args in [(run, 0, cid, 1), (run, 2, cid, 1), (run, 1, cid, 2), ("run_unknown", 1, cid, 1),
                 (run, 1, "conn_unknown", 1)]:
        with pytest.raises(Fenced):
            await store.check_fence(*args)
    await store.record_reconnect(cid, 1)
    with pytest.raises(Fenced):
        await store.check_fence(run, 1, cid, 1)  # a lease from before the reconnect
    await store.check_fence(run, 1, cid, 2)


# -- the action ledger ---------------------------------------------------------------------------


async def test_claim_new_key(store: Store, world: World) -> None:
    key = world.key("key_1")
    outcome = await store.claim(claim_req(world, key))
    assert outcome.kind == "claimed"
    a = outcome.action
    assert (a.idempotency_key, a.state, a.attempts, a.owner) == (key, "in_flight", 1, OWNER)
    assert (a.run_id, a.action_key, a.checkpoint_id, a.fingerprint) == (
        world.run_id, "send_mail", "chk_1", "fp_1")
    assert await store.get_action(key) == a


async def test_claim_in_flight_key(store: Store, world: World) -> None:
    key = world.key("key_1")
    await store.claim(claim_req(world, key))
    with pytest.raises(InFlight):
        await store.claim(claim_req(world, key, owner="sidecar-b"))


@pytest.mark.parametrize(("state", "status"), [("committed", 202), ("failed", 403)])
async def test_claim_finished_key_replays(
    store: Store, world: World, state: Any, status: int
) -> None:
    key = world.key("key_1")
    await store.claim(claim_req(world, key))
    await store.finish(key, OWNER, state, status=status, response='{"body_b64":""}')
    outcome = await store.claim(claim_req(world, key))
    assert outcome.kind == "replay"
    assert (outcome.action.state, outcome.action.status) == (state, status)
    assert outcome.action.response == '{"body_b64":""}'
    assert outcome.action.attempts == 1


async def test_claim_unknown_key_needs_reconcile(store: Store, world: World) -> None:
    key = world.key("key_1")
    await store.claim(claim_req(world, key))
    await store.finish(key, OWNER, "unknown")
    with pytest.raises(ReconcileRequired):
        await store.claim(claim_req(world, key))


async def test_claim_not_committed_key_reclaims(store: Store, world: World) -> None:
    key = world.key("key_1")
    await store.claim(claim_req(world, key))
    await store.finish(key, OWNER, "not_committed", status=401)
    outcome = await store.claim(claim_req(world, key, owner="sidecar-b"))
    assert outcome.kind == "claimed"
    a = outcome.action
    assert (a.state, a.attempts, a.owner, a.status) == ("in_flight", 2, "sidecar-b", None)


@pytest.mark.parametrize("finished", [None, "committed"])
async def test_claim_with_other_fingerprint_is_a_mismatch(
    store: Store, world: World, finished: Any
) -> None:
    key = world.key("key_1")
    await store.claim(claim_req(world, key))
    if finished:
        await store.finish(key, OWNER, finished, status=200)
    with pytest.raises(IdempotencyMismatch):
        await store.claim(claim_req(world, key, fingerprint="fp_2"))


@pytest.mark.parametrize("stale", [{"epoch": 2}, {"epoch": 0}, {"generation": 2}])
async def test_claim_is_fenced_first(store: Store, world: World, stale: dict[str, int]) -> None:
    key = world.key("key_1")
    key2 = world.key("key_2")
    with pytest.raises(Fenced):
        await store.claim(claim_req(world, key, **stale))
    assert await store.get_action(key) is None
    await store.claim(claim_req(world, key2))
    await store.finish(key2, OWNER, "committed", status=200)
    with pytest.raises(Fenced):  # even a replay needs a current capability
        await store.claim(claim_req(world, key2, **stale))


async def test_claim_fenced_after_reconnect(store: Store, world: World) -> None:
    key = world.key("key_1")
    await store.record_reconnect(world.connection_id, 1)
    with pytest.raises(Fenced):
        await store.claim(claim_req(world, key))
    assert (await store.claim(claim_req(world, key, generation=2))).kind == "claimed"


async def test_concurrent_claims_of_one_key_admit_one(store: Store, world: World) -> None:
    key = world.key("key_1")
    results = await asyncio.gather(
        *(store.claim(claim_req(world, key, owner=f"o{i}")) for i in range(20)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, InFlight) for r in results if isinstance(r, BaseException))


async def test_finish_only_by_the_owner_of_an_in_flight_row(store: Store, world: World) -> None:
    key = world.key("key_1")
    with pytest.raises(NotFound):
        await store.finish(key, OWNER, "committed")
    await store.claim(claim_req(world, key))
    with pytest.raises(ConflictError):
        await store.finish(key, "sidecar-b", "committed")
    with pytest.raises(ValueError):
        await store.finish(key, OWNER, "in_flight")  # type: ignore[arg-type]
    done = await store.finish(key, OWNER, "committed", status=201, response="{}")
    assert (done.idempotency_key, done.state, done.status, done.case_id) == (
        key, "committed", 201, None
    )
    stored = await store.get_action(key)
    assert stored is not None and (stored.status, stored.response) == (201, "{}")
    with pytest.raises(ConflictError):
        await store.finish(key, OWNER, "failed")
    assert (await store.get_action(key)).state == "committed"  # type: ignore[union-attr]


async def test_finish_reports_the_case_waiting_on_the_action(store: Store, world: World) -> None:
    key = world.key("key_1")
    case, _ = await store.open_case(draft(world))
    await store.claim(claim_req(world, key))
    first = await store.finish(key, OWNER, "not_committed", status=401, case_id=case.case_id)
    assert first.case_id == case.case_id
    await store.claim(claim_req(world, key))
    # The resumed attempt names no case; the one recorded before still waits on the action.
    done = await store.finish(key, OWNER, "committed", status=202)
    assert (done.state, done.case_id) == ("committed", case.case_id)


async def test_settle_rules(store: Store, world: World) -> None:
    key = world.key("key_1")
    with pytest.raises(NotFound):
        await store.settle(key, "committed", {})
    await store.claim(claim_req(world, key))
    with pytest.raises(ConflictError):
        await store.settle(key, "committed", {})  # still in flight
    await store.finish(key, OWNER, "unknown")
    settled = await store.settle(key, "committed", {"found": "sent-items"}, status=202)
    assert (settled.state, settled.status, settled.evidence) == (
        "committed", 202, {"found": "sent-items"})
    assert await store.settle(key, "committed", {"again": True}) == settled  # idempotent
    with pytest.raises(ConflictError):
        await store.settle(key, "not_committed", {})
    assert (await store.claim(claim_req(world, key))).kind == "replay"


async def test_settle_not_committed_allows_a_new_attempt(store: Store, world: World) -> None:
    key = world.key("key_1")
    await store.claim(claim_req(world, key))
    await store.finish(key, OWNER, "unknown")
    await store.settle(key, "not_committed", {"lookup": "none"})
    outcome = await store.claim(claim_req(world, key))
    assert (outcome.kind, outcome.action.attempts) == ("claimed", 2)


async def test_sweep_touches_only_its_owners_in_flight_rows(store: Store, world: World) -> None:
    me = world.key(OWNER)  # other tests' OWNER rows may share the database
    before = await store.count_actions("unknown")
    await store.claim(claim_req(world, world.key("mine_1"), owner=me))
    await store.claim(claim_req(world, world.key("mine_2"), owner=me))
    await store.claim(claim_req(world, world.key("mine_done"), owner=me))
    await store.finish(world.key("mine_done"), me, "committed", status=200)
    await store.claim(claim_req(world, world.key("theirs"), owner="sidecar-b"))
    assert await store.sweep_in_flight(me) == 2
    states = {a.idempotency_key: a.state for a in await store.list_actions(world.run_id)}
    assert states == {
        world.key("mine_1"): "unknown",
        world.key("mine_2"): "unknown",
        world.key("mine_done"): "committed",
        world.key("theirs"): "in_flight",
    }
    assert await store.count_actions("unknown") - before == 2
    assert await store.sweep_in_flight(me) == 0


async def test_list_and_count_actions(store: Store, world: World, new_id: NewId) -> None:
    before = await store.count_actions("in_flight")
    assert await store.get_action(world.key("key_none")) is None
    keys = [new_id("key") for _ in range(3)]
    for key in keys:
        await store.claim(claim_req(world, key))
    assert [a.idempotency_key for a in await store.list_actions(world.run_id)] == keys
    assert await store.list_actions("run_without_actions") == []
    assert await store.count_actions("in_flight") - before == 3


# -- recovery cases ------------------------------------------------------------------------------


async def test_open_case_records_everything_in_one_go(store: Store, world: World) -> None:
    key = world.key("key_1")
    await store.claim(claim_req(world, key))
    await store.finish(key, OWNER, "not_committed", status=401)
    case, created = await store.open_case(draft(world, idempotency_key=key, workflow="wf"))
    assert created
    assert (case.state, case.version, case.outcome) == ("open", 1, None)
    assert (case.run_id, case.connection_id, case.generation, case.epoch) == (
        world.run_id, world.connection_id, 1, 1)
    assert (case.checkpoint_id, case.action_key, case.idempotency_key) == (
        "chk_1", "send_mail", key)
    assert (case.failure_class, case.provider_code, case.provider_message, case.workflow) == (
        "dead_grant", "AADSTS700082", "grant expired", "wf")
    assert case.evidence == {"status": 400, "error": "invalid_grant"}
    assert await store.get_case(case.case_id) == case
    [first] = await store.transitions(case.case_id)
    assert (first.seq, first.from_state, first.to_state, first.actor) == (1, None, "open", "proxy")
    assert first.evidence == case.evidence
    conn = await store.get_connection(world.connection_id)
    assert conn is not None and (conn.generation, conn.state) == (1, "dead")
    assert (await store.get_action(key)).case_id == case.case_id  # type: ignore[union-attr]


async def test_one_case_per_run_connection_and_dead_generation(
    store: Store, world: World, new_id: NewId
) -> None:
    first, created = await store.open_case(draft(world))
    again, created_again = await store.open_case(draft(world, checkpoint_id="chk_2"))
    assert created and not created_again
    assert again == first
    assert len(await store.transitions(first.case_id)) == 1
    both = await asyncio.gather(*(store.open_case(draft(world)) for _ in range(10)))
    assert {c.case_id for c, _ in both} == {first.case_id}
    other_run = new_id("run")
    await store.mint_check(other_run, 1)
    other, created_other = await store.open_case(draft(world, run_id=other_run))
    assert created_other and other.case_id != first.case_id
    await store.record_reconnect(world.connection_id, 1)
    later, created_later = await store.open_case(draft(world, generation=2))
    assert created_later and later.case_id != first.case_id


async def test_open_case_leaves_a_newer_generation_alive(store: Store, world: World) -> None:
    await store.record_reconnect(world.connection_id, 1)
    await store.open_case(draft(world, generation=1))  # reported late, about the old grant
    conn = await store.get_connection(world.connection_id)
    assert conn is not None and (conn.generation, conn.state) == (2, "active")


async def test_open_case_keeps_a_chosen_id(store: Store, world: World, new_id: NewId) -> None:
    case_id = new_id("case")
    case, _ = await store.open_case(draft(world, case_id=case_id))
    assert case.case_id == case_id


async def test_transition_is_compare_and_set(store: Store, world: World) -> None:
    case, _ = await store.open_case(draft(world))
    moved = await store.transition(
        case.case_id, "open", "awaiting_reconnect", "svc", {"notified": True}
    )
    assert (moved.state, moved.version) == ("awaiting_reconnect", 2)
    with pytest.raises(ConflictError) as lost:
        await store.transition(case.case_id, "open", "abandoned", "admin", {})
    assert (lost.value.expected, lost.value.actual) == ("open", "awaiting_reconnect")
    assert await store.get_case(case.case_id) == moved
    assert [t.seq for t in await store.transitions(case.case_id)] == [1, 2]
    with pytest.raises(NotFound):
        await store.transition("case_unknown", "open", "ready", "svc", {})
    with pytest.raises(ValueError):
        await store.transition(case.case_id, "awaiting_reconnect", "ready", "svc", {}, state="x")


async def test_concurrent_transitions_from_one_state_admit_one(store: Store, world: World) -> None:
    case, _ = await store.open_case(draft(world))
    results = await asyncio.gather(
        *(store.transition(case.case_id, "open", "abandoned", f"admin{i}", {}) for i in range(10)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, ConflictError) for r in results if isinstance(r, BaseException))
    assert [t.seq for t in await store.transitions(case.case_id)] == [1, 2]


async def test_transitions_are_the_incident_record(store: Store, world: World) -> None:
    case, _ = await store.open_case(draft(world))
    steps: list[tuple[str, str, str, dict[str, Any]]] = [
        ("open", "awaiting_reconnect", "svc", {"notified": "ops"}),
        ("awaiting_reconnect", "reconnected", "webhook:nango", {"generation": 2}),
        ("reconnected", "ready", "reconciler", {"outcome": "not_committed"}),
    ]
    for from_state, to_state, actor, evidence in steps:
        await store.transition(case.case_id, from_state, to_state, actor, evidence)
    closed = await store.transition(case.case_id, "ready", "closed", "svc", {}, outcome="committed")
    assert (closed.outcome, closed.version) == ("committed", 5)
    record = await store.transitions(case.case_id)
    assert [t.seq for t in record] == [1, 2, 3, 4, 5]
    assert [(t.from_state, t.to_state, t.actor, t.evidence) for t in record[1:4]] == steps
    assert all(t.case_id == case.case_id for t in record)
    assert [t.at for t in record] == sorted(t.at for t in record)
    assert record[0].at >= case.created_at - 1 and record[-1].at <= closed.updated_at + 1
    assert await store.transitions("case_unknown") == []


async def test_list_cases_filters(store: Store, world: World, new_id: NewId) -> None:
    open_case, _ = await store.open_case(draft(world))
    other_conn = new_id("conn")
    await store.ensure_connection(other_conn)
    gone, _ = await store.open_case(draft(world, connection_id=other_conn))
    await store.transition(gone.case_id, "open", "abandoned", "admin", {})

    def ids(cases: list[CaseRow]) -> list[str]:
        return [c.case_id for c in cases]

    assert ids(await store.list_cases(run_id=world.run_id)) == [open_case.case_id, gone.case_id]
    assert ids(await store.list_cases(run_id=world.run_id, open_only=True)) == [open_case.case_id]
    assert ids(await store.list_cases(connection_id=other_conn)) == [gone.case_id]
    assert gone.case_id in ids(await store.list_cases(state="abandoned"))
    assert open_case.case_id not in ids(await store.list_cases(state="abandoned"))
    assert ids(await store.list_cases(state="open", connection_id=other_conn)) == []
    assert await store.get_case("case_unknown") is None


# -- redemption ----------------------------------------------------------------------------------


async def test_redeem_resumes_the_case_and_bumps_the_epoch(store: Store, world: World) -> None:
    key = world.key("key_1")
    jti = world.key("jti_1")
    await store.claim(claim_req(world, key))
    await store.finish(key, OWNER, "not_committed", status=401)
    case = await ready_case(store, world, idempotency_key=key)
    result = await store.redeem(jti, 9e9, case.case_id, world.run_id, 1, "worker")
    assert result.epoch == 2
    assert (result.case.state, result.case.version) == ("resumed", case.version + 1)
    assert result.action is not None and result.action.idempotency_key == key
    assert result.action.state == "not_committed"
    assert (await store.get_run(world.run_id)).epoch == 2  # type: ignore[union-attr]
    last = (await store.transitions(case.case_id))[-1]
    assert (last.from_state, last.to_state, last.actor) == ("ready", "resumed", "worker")
    await store.check_fence(world.run_id, 2, world.connection_id, 2)
    with pytest.raises(Fenced):
        await store.claim(claim_req(world, key, generation=2))  # epoch 1 is gone
    assert (await store.claim(claim_req(world, key, epoch=2, generation=2))).kind == "claimed"


async def test_redeem_without_an_action(store: Store, world: World) -> None:
    jti = world.key("jti_1")
    case = await ready_case(store, world)
    result = await store.redeem(jti, 9e9, case.case_id, world.run_id, 1, "worker")
    assert result.action is None


async def test_redeem_is_single_use(store: Store, world: World) -> None:
    jti = world.key("jti_1")
    case = await ready_case(store, world)
    await store.redeem(jti, 9e9, case.case_id, world.run_id, 1, "worker")
    with pytest.raises(CapabilityInvalid):
        await store.redeem(jti, 9e9, case.case_id, world.run_id, 2, "worker")
    with pytest.raises(CapabilityInvalid):  # a second capability for the same case
        await store.redeem(world.key("jti_2"), 9e9, case.case_id, world.run_id, 1, "worker")
    assert (await store.get_run(world.run_id)).epoch == 2  # type: ignore[union-attr]


async def test_a_refused_redemption_keeps_nothing(store: Store, world: World) -> None:
    jti = world.key("jti_1")
    case, _ = await store.open_case(draft(world))
    with pytest.raises(CapabilityInvalid):  # not ready yet
        await store.redeem(jti, 9e9, case.case_id, world.run_id, 1, "worker")
    case = await ready_case_from_open(store, world, case)
    with pytest.raises(Fenced):
        await store.redeem(jti, 9e9, case.case_id, world.run_id, 5, "worker")
    with pytest.raises(CapabilityInvalid):
        await store.redeem(jti, 9e9, case.case_id, "run_other", 1, "worker")
    with pytest.raises(CapabilityInvalid):
        await store.redeem(jti, 9e9, "case_unknown", world.run_id, 1, "worker")
    assert (await store.get_case(case.case_id)).state == "ready"  # type: ignore[union-attr]
    assert (await store.get_run(world.run_id)).epoch == 1  # type: ignore[union-attr]
    # ... and the jti was not burned by any of the refusals:
    assert (await store.redeem(jti, 9e9, case.case_id, world.run_id, 1, "w")).epoch == 2


@pytest.mark.parametrize("same_jti", [True, False], ids=["one-capability", "many-capabilities"])
async def test_concurrent_redemptions_admit_exactly_one(
    store: Store, world: World, same_jti: bool
) -> None:
    jti = world.key("jti_1")
    case = await ready_case(store, world)
    jtis = [jti if same_jti else world.key(f"jti_{i}") for i in range(20)]
    results = await asyncio.gather(
        *(store.redeem(j, 9e9, case.case_id, world.run_id, 1, "worker") for j in jtis),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    assert len(won) == 1
    assert all(isinstance(r, CapabilityInvalid) for r in results if isinstance(r, BaseException))
    assert (await store.get_run(world.run_id)).epoch == 2  # type: ignore[union-attr]
    assert [t.to_state for t in await store.transitions(case.case_id)][-1] == "resumed"
    assert len(await store.transitions(case.case_id)) == case.version + 1
