"""The case machine and the store's compare-and-set, driven together by random events (issue #9).

``test_machine.py`` walks the table in memory; here every event goes to a real ``SqliteStore``
the way ``RecoveryService._move`` does it: read the case, ask :func:`next_state`, then
``Store.transition`` with compare-and-set on the state read. A model (the table plus a list of
accepted changes) says what the store must hold after each step, so a refused event that
wrote anyway, a lost or doubled ``transitions`` row, or a gap in ``seq`` shows up at once.
Redemption goes through ``Store.redeem`` (burn, ``ready → resumed``, epoch + 1 in one
transaction) as often as through the plain driver.

One store and one event loop serve all examples of a test (``asyncio.Runner``): opening and
migrating a database per example would cost more than the example. Every example uses its
own run, connection and case, so examples cannot see each other.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from revive.errors import CapabilityInvalid
from revive.recovery import (
    FINAL_STATES,
    INITIAL_STATE,
    TRANSITIONS,
    CaseEvent,
    CaseState,
    TransitionNotAllowed,
    allowed_events,
    is_final,
    next_state,
)
from revive.store import CaseDraft, CaseRow, ConflictError, SqliteStore, Store

T = TypeVar("T")
PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None)
STEP_TIMEOUT_S = 60.0


# -- harness: one migrated store on one loop for every example of a test -----------------------


@dataclass
class Harness:
    runner: asyncio.Runner
    store: Store
    ids: Iterator[int] = field(default_factory=itertools.count)

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(_bounded(work))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self.ids)}"


async def _bounded(work: Coroutine[Any, Any, T]) -> T:
    async with asyncio.timeout(STEP_TIMEOUT_S):
        return await work


@contextmanager
def sqlite_harness(path: Path) -> Iterator[Harness]:
    with asyncio.Runner() as runner:
        opened = SqliteStore.open(path)
        store = runner.run(_bounded(opened.__aenter__()))
        try:
            yield Harness(runner, store)
        finally:
            runner.run(_bounded(opened.__aexit__(None, None, None)))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with sqlite_harness(tmp_path / "revive.db") as opened:
        yield opened


async def new_case(h: Harness) -> CaseRow:
    connection_id, run_id = h.new_id("conn"), h.new_id("run")
    await h.store.ensure_connection(connection_id)
    await h.store.mint_check(run_id, 1)
    case, created = await h.store.open_case(CaseDraft(
        run_id=run_id, connection_id=connection_id, generation=1, epoch=1,
        checkpoint_id="chk_1", action_key="send_mail", failure_class="dead_grant",
        actor="proxy", provider_code="AADSTS700082", provider_message="grant expired",
        evidence={"status": 400},
    ))
    assert created and case.state == INITIAL_STATE and case.version == 1
    return case


async def advance(store: Store, case_id: str, event: CaseEvent, actor: str) -> CaseRow:
    """The service's move: read, let the table decide, compare-and-set on the state read."""
    case = await store.get_case(case_id)
    assert case is not None
    target = next_state(case.state, event)  # TransitionNotAllowed before anything is written
    return await store.transition(case_id, case.state, target.value, actor,
                                  {"event": event.value})


# -- random event sequences ------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    event: CaseEvent
    via_redeem: bool  # REDEEMED through Store.redeem instead of the plain driver


@dataclass(frozen=True)
class Legal:
    """An event the case accepts now (chosen by ``pick``): walks reach the final states."""

    pick: int  # 0..9
    via_redeem: bool


@dataclass(frozen=True)
class Stale:
    """A compare-and-set from a state the case may no longer be in."""

    seen: CaseState
    to: CaseState


ops = st.lists(
    st.one_of(
        st.builds(Event, st.sampled_from(list(CaseEvent)), st.booleans()),
        st.builds(Legal, st.integers(0, 9), st.booleans()),  # legal moves three times as often
        st.builds(Legal, st.integers(0, 9), st.booleans()),
        st.builds(Legal, st.integers(0, 9), st.booleans()),
        st.builds(Stale, st.sampled_from(list(CaseState)), st.sampled_from(list(CaseState))),
    ),
    min_size=3,
    max_size=25,
)


@dataclass
class Model:
    """What the store must hold: the table applied to the accepted events only."""

    state: CaseState = INITIAL_STATE
    epoch: int = 1
    rows: list[tuple[str | None, str, str]] = field(
        default_factory=lambda: [(None, INITIAL_STATE.value, "proxy")]
    )  # (from_state, to_state, actor) per transitions row

    def accept(self, to: CaseState, actor: str) -> None:
        self.rows.append((self.state.value, to.value, actor))
        self.state = to


async def _unchanged(store: Store, before: CaseRow, model: Model) -> None:
    assert await store.get_case(before.case_id) == before
    assert len(await store.transitions(before.case_id)) == len(model.rows)
    run = await store.get_run(before.run_id)
    assert run is not None and run.epoch == model.epoch


async def _apply(
    h: Harness, case: CaseRow, model: Model, step: int, op: Event | Legal | Stale
) -> None:
    store, actor = h.store, f"actor{step}"
    if isinstance(op, Legal):
        allowed = allowed_events(model.state)
        forward = sorted(allowed - {CaseEvent.ABANDONED})
        if forward and op.pick < 8:  # abandon only now and then, or few walks get far
            event = forward[op.pick % len(forward)]
        else:
            event = CaseEvent.ABANDONED if allowed else list(CaseEvent)[op.pick % len(CaseEvent)]
        op = Event(event, op.via_redeem)
    before = await store.get_case(case.case_id)
    assert before is not None
    if isinstance(op, Stale):
        if op.seen == model.state:
            return  # not stale: the plain driver covers legal moves
        with pytest.raises(ConflictError) as lost:
            await store.transition(case.case_id, op.seen.value, op.to.value, actor, {})
        assert (lost.value.expected, lost.value.actual) == (op.seen.value, model.state.value)
        await _unchanged(store, before, model)
        return
    legal = (model.state, op.event) in TRANSITIONS
    if op.event is CaseEvent.REDEEMED and op.via_redeem:
        jti = h.new_id("jti")
        if legal:
            result = await store.redeem(jti, 2e9, case.case_id, case.run_id, model.epoch, actor)
            model.epoch += 1
            model.accept(CaseState.RESUMED, actor)
            assert (result.case.state, result.epoch) == ("resumed", model.epoch)
        else:
            with pytest.raises(CapabilityInvalid):
                await store.redeem(jti, 2e9, case.case_id, case.run_id, model.epoch, actor)
            await _unchanged(store, before, model)
        return
    if legal:
        moved = await advance(store, case.case_id, op.event, actor)
        model.accept(TRANSITIONS[(before.state, op.event)], actor)  # type: ignore[index]
        assert (moved.state, moved.version) == (model.state.value, len(model.rows))
    else:
        with pytest.raises(TransitionNotAllowed) as refused:
            await advance(store, case.case_id, op.event, actor)
        assert (refused.value.state, refused.value.event) == (model.state.value, op.event)
        assert op.event not in refused.value.allowed
        await _unchanged(store, before, model)


async def _check_record(h: Harness, case_id: str, model: Model) -> None:
    """The incident record: one row per accepted change, seq 1..n, each from the last's to."""
    case = await h.store.get_case(case_id)
    rows = await h.store.transitions(case_id)
    assert case is not None and case.state == model.state.value
    assert [t.seq for t in rows] == list(range(1, len(rows) + 1))
    assert [(t.from_state, t.to_state, t.actor) for t in rows] == model.rows
    assert case.version == len(rows) and rows[-1].to_state == case.state
    for prev, row in zip(rows, rows[1:]):
        assert row.from_state == prev.to_state
        assert any(TRANSITIONS.get((CaseState(row.from_state), e)) == row.to_state
                   for e in CaseEvent), f"{row.from_state} -> {row.to_state} is not in the table"
    assert all(t.to_state in set(CaseState) for t in rows)


def test_random_event_sequences_against_the_store(harness: Harness) -> None:
    @settings(PROPS, max_examples=150)
    @given(steps=ops)
    def check(steps: list[Event | Legal | Stale]) -> None:
        async def scenario() -> None:
            case = await new_case(harness)
            model = Model()
            for step, op in enumerate(steps):
                await _apply(harness, case, model, step, op)
            await _check_record(harness, case.case_id, model)
            if is_final(model.state):  # a final state accepts nothing, from anyone
                before = await harness.store.get_case(case.case_id)
                assert before is not None and allowed_events(model.state) == frozenset()
                for event in CaseEvent:
                    with pytest.raises(TransitionNotAllowed):
                        await advance(harness.store, case.case_id, event, "late")
                await _unchanged(harness.store, before, model)

        harness.run(scenario())

    check()


def test_every_table_edge_is_reachable_by_the_strategy() -> None:
    """Guard: the happy path and every abandon are short enough for ``max_size`` above."""
    assert {s for (s, _), _ in TRANSITIONS.items()} == set(CaseState) - FINAL_STATES
    longest = [CaseEvent.NOTIFIED, CaseEvent.RECONNECTED, CaseEvent.RECONCILED,
               CaseEvent.REDEEMED, CaseEvent.COMMITTED]
    state = INITIAL_STATE
    for event in longest:
        state = next_state(state, event)
    assert state is CaseState.CLOSED and len(longest) < 25


# -- races ---------------------------------------------------------------------------------------

walks = st.lists(st.sampled_from(list(CaseEvent)), max_size=6)
racers = st.lists(st.sampled_from(list(CaseEvent)), min_size=2, max_size=8)


async def _walk(h: Harness, case: CaseRow, events: list[CaseEvent]) -> CaseRow:
    """Apply the legal ones of ``events`` in order: a random reachable state."""
    for event in events:
        current = await h.store.get_case(case.case_id)
        assert current is not None
        if event in allowed_events(current.state):
            case = await advance(h.store, case.case_id, event, "walk")
    got = await h.store.get_case(case.case_id)
    assert got is not None
    return got


def test_racing_compare_and_sets_admit_exactly_one(harness: Harness) -> None:
    """Racers that all read the same state: one wins, the rest lose with ConflictError."""

    @PROPS
    @given(walk=walks, events=racers)
    def check(walk: list[CaseEvent], events: list[CaseEvent]) -> None:
        async def scenario() -> None:
            case = await _walk(harness, await new_case(harness), walk)
            legal = [e for e in events if e in allowed_events(case.state)]
            assume(len(legal) >= 2)
            results = await asyncio.gather(
                *(harness.store.transition(case.case_id, case.state,
                                           next_state(case.state, e).value, f"racer{i}",
                                           {"event": e.value})
                  for i, e in enumerate(legal)),
                return_exceptions=True,
            )
            won = [r for r in results if isinstance(r, CaseRow)]
            lost = [r for r in results if isinstance(r, ConflictError)]
            assert (len(won), len(lost)) == (1, len(results) - 1), results
            winner = won[0]
            assert winner.version == case.version + 1
            assert all((r.expected, r.actual) == (case.state, winner.state) for r in lost)
            rows = await harness.store.transitions(case.case_id)
            assert len(rows) == case.version + 1 and rows[-1].to_state == winner.state
            assert rows[-1].actor == f"racer{results.index(winner)}"
            assert await harness.store.get_case(case.case_id) == winner

        harness.run(scenario())

    check()


def test_racing_drivers_keep_the_record_whole(harness: Harness) -> None:
    """Racers that each read, decide and write: whatever interleaving, no change is lost."""

    @PROPS
    @given(walk=walks, events=racers)
    def check(walk: list[CaseEvent], events: list[CaseEvent]) -> None:
        async def scenario() -> None:
            case = await _walk(harness, await new_case(harness), walk)
            results = await asyncio.gather(
                *(advance(harness.store, case.case_id, e, f"racer{i}")
                  for i, e in enumerate(events)),
                return_exceptions=True,
            )
            for r in results:
                assert isinstance(r, (CaseRow, ConflictError, TransitionNotAllowed)), r
            won = [r for r in results if isinstance(r, CaseRow)]
            rows = await harness.store.transitions(case.case_id)
            new = rows[case.version:]
            assert [t.seq for t in rows] == list(range(1, len(rows) + 1))
            assert len(new) == len(won)  # one row per accepted change, none lost or doubled
            assert sorted(r.version for r in won) == [t.seq for t in new]
            if new:
                assert new[0].from_state == case.state
            for prev, row in zip(rows, rows[1:]):
                assert row.from_state == prev.to_state
                event = CaseEvent(row.evidence["event"]) if "event" in row.evidence else None
                if event is not None:
                    assert TRANSITIONS[(CaseState(row.from_state), event)] == row.to_state
            final = await harness.store.get_case(case.case_id)
            assert final is not None and final.state == rows[-1].to_state
            assert final.version == len(rows)

        harness.run(scenario())

    check()
