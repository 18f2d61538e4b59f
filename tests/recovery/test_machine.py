"""The recovery case transition table: paths, refusals, the validator, a property test."""

from __future__ import annotations

from collections.abc import Mapping, Set

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revive.errors import ReviveError
from revive.recovery import (
    FINAL_STATES,
    INITIAL_STATE,
    TRANSITIONS,
    CaseEvent,
    CaseState,
    TransitionNotAllowed,
    TransitionTableError,
    allowed_events,
    is_final,
    next_state,
    validate,
)

S, E = CaseState, CaseEvent
NON_FINAL = [s for s in CaseState if s not in FINAL_STATES]


def _walk(*events: CaseEvent, start: CaseState = INITIAL_STATE) -> CaseState:
    state = start
    for event in events:
        state = next_state(state, event)
    return state


def test_happy_path() -> None:
    assert INITIAL_STATE is S.OPEN
    path = [E.NOTIFIED, E.RECONNECTED, E.RECONCILED, E.REDEEMED, E.COMMITTED]
    seen = [S.OPEN]
    for event in path:
        seen.append(next_state(seen[-1], event))
    assert seen == [S.OPEN, S.AWAITING_RECONNECT, S.RECONNECTED, S.READY, S.RESUMED, S.CLOSED]
    assert is_final(S.CLOSED) and not is_final(S.RESUMED)


def test_reconnect_before_notification() -> None:
    assert _walk(E.RECONNECTED) is S.RECONNECTED


def test_committed_found_by_reconcile_still_goes_through_redemption() -> None:
    assert (S.READY, E.COMMITTED) not in TRANSITIONS
    assert _walk(E.REDEEMED, E.COMMITTED, start=S.READY) is S.CLOSED


def test_ready_has_no_expiry_event() -> None:
    """A recovery capability expiring unredeemed changes nothing: ready stays ready."""
    assert allowed_events(S.READY) == {E.REDEEMED, E.ABANDONED}


@pytest.mark.parametrize("state", NON_FINAL)
def test_abandon_from_every_non_final_state(state: CaseState) -> None:
    assert next_state(state, E.ABANDONED) is S.ABANDONED


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_final_states_accept_nothing(state: CaseState) -> None:
    assert allowed_events(state) == frozenset()
    for event in CaseEvent:
        with pytest.raises(TransitionNotAllowed):
            next_state(state, event)


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.OPEN, E.REDEEMED), (S.OPEN, E.RECONCILED), (S.AWAITING_RECONNECT, E.NOTIFIED),
     (S.RECONNECTED, E.REDEEMED), (S.READY, E.COMMITTED), (S.RESUMED, E.REDEEMED),
     (S.CLOSED, E.ABANDONED), (S.ABANDONED, E.RECONNECTED)],
)
def test_illegal_transitions_raise_with_attributes(state: CaseState, event: CaseEvent) -> None:
    with pytest.raises(TransitionNotAllowed) as info:
        next_state(state, event)
    exc = info.value
    assert isinstance(exc, ReviveError)
    assert (exc.state, exc.event) == (state, event)
    assert exc.allowed == allowed_events(state)
    assert exc.__cause__ is None and exc.__suppress_context__


def test_plain_strings_from_the_store_work() -> None:
    assert next_state("ready", "redeemed") is S.RESUMED
    with pytest.raises(TransitionNotAllowed) as info:
        next_state("limbo", "redeemed")
    assert info.value.state == "limbo" and info.value.allowed == frozenset()


def test_table_is_immutable_and_declared() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(S.OPEN, E.COMMITTED)] = S.CLOSED  # type: ignore[index]
    assert all(isinstance(s, CaseState) and isinstance(e, CaseEvent) and isinstance(t, CaseState)
               for (s, e), t in TRANSITIONS.items())
    validate(TRANSITIONS)


# -- the validator -----------------------------------------------------------------------------


def _broken(
    drop: Set[tuple[CaseState, CaseEvent]] = frozenset(),
    add: Mapping[tuple[str, str], str] | None = None,
) -> dict[tuple[str, str], str]:
    table: dict[tuple[str, str], str] = {k: v for k, v in TRANSITIONS.items() if k not in drop}
    table.update(add or {})
    return table


def _problems(table: Mapping[tuple[str, str], str]) -> str:
    with pytest.raises(TransitionTableError) as info:
        validate(table)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ReviveError)
    return " | ".join(info.value.problems)


def test_validator_rejects_trap_state() -> None:
    problems = _problems(_broken(drop={(S.RESUMED, E.COMMITTED), (S.RESUMED, E.ABANDONED)}))
    assert "trap" in problems and "resumed" in problems


def test_validator_rejects_trap_cycle() -> None:
    """A loop between two non-final states with no way out is still a trap."""
    table = _broken(drop={(S.RESUMED, E.COMMITTED), (S.RESUMED, E.ABANDONED),
                          (S.READY, E.ABANDONED)},
                    add={(S.RESUMED, E.NOTIFIED): S.READY})
    problems = _problems(table)
    assert "trap" in problems and "ready" in problems and "resumed" in problems


def test_validator_rejects_unreachable_state() -> None:
    table = _broken(drop={(S.OPEN, E.NOTIFIED)})
    problems = _problems(table)
    assert "unreachable" in problems and "awaiting_reconnect" in problems
    assert "trap" not in problems


def test_validator_rejects_edge_out_of_final_state() -> None:
    problems = _problems(_broken(add={(S.CLOSED, E.ABANDONED): S.ABANDONED}))
    assert "final state 'closed'" in problems


def test_validator_rejects_unknown_states_and_events() -> None:
    problems = _problems(_broken(add={(S.READY, "expired"): "limbo"}))
    assert "unknown event 'expired'" in problems and "unknown target state 'limbo'" in problems
    problems = _problems(_broken(add={("limbo", E.ABANDONED): S.ABANDONED}))
    assert "unknown source state 'limbo'" in problems


def test_validator_checks_declared_vocabulary() -> None:
    with pytest.raises(TransitionTableError, match="initial state"):
        validate({}, states=["a"], events=[], initial="b", final=["a"])
    with pytest.raises(TransitionTableError, match="final states not declared"):
        validate({("a", "go"): "a"}, states=["a"], events=["go"], initial="a", final=["z"])
    validate({("a", "go"): "b"}, states=["a", "b"], events=["go"], initial="a", final=["b"])


# -- property ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(CaseEvent)), max_size=30))
def test_random_event_sequences_stay_in_the_table(events: list[CaseEvent]) -> None:
    state = INITIAL_STATE
    for event in events:
        try:
            new = next_state(state, event)
        except TransitionNotAllowed as exc:
            assert (state, event) not in TRANSITIONS
            assert event not in exc.allowed
            continue  # a refused event leaves the case where it was
        assert TRANSITIONS[(state, event)] is new
        assert isinstance(new, CaseState)
        assert state not in FINAL_STATES
        state = new
    assert state in set(CaseState)
