"""The recovery case state machine (DESIGN §8), declared as one transition table.

::

    open ──notified──▶ awaiting_reconnect
      │                        │
      └──────reconnected───────┴──▶ reconnected ──reconciled──▶ ready ──redeemed──▶ resumed
                                                                                       │
                                                                            committed  ▼
                                                                                    closed
    any non-final state ──abandoned──▶ abandoned            (closed, abandoned are final)

The table is the whole behaviour: :func:`next_state` only looks it up, and :func:`validate`
checks it at import (STYLE 9/12): no unknown states, every state reachable from ``open``,
every non-final state able to reach a final one, no edge out of a final state. A broken table
fails the import, not a case at 3 a.m.

Decisions the table encodes:

- ``reconnected`` may skip ``awaiting_reconnect``: a reconnect can land before the notifier
  ran, and one reconnect advances every case of the connection whichever of the two it is in.
- ``reconciled`` covers both endings of reconcile: the outcome was settled (committed /
  not_committed) or no reconcile exists and it stays ``unknown`` for the redeeming worker.
- There is no ``ready → closed`` edge. "Found committed by reconcile and reported at
  redemption" still needs the redemption (it bumps the epoch and tells the run the outcome),
  so that path is ``ready ─redeemed▶ resumed ─committed▶ closed``, both steps applied in the
  redeem transaction. One way into ``closed`` keeps the incident record uniform.
- Issuing a recovery capability, and one expiring unredeemed, are not events: the case stays
  ``ready`` and a new capability can be issued.

Errors::

    ReviveError
    ├── TransitionNotAllowed   -- the event does not apply in the case's state (state, event)
    └── TransitionTableError   -- the table itself is malformed (import time, or a test)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from revive.errors import ReviveError

__all__ = [
    "CaseState",
    "CaseEvent",
    "FINAL_STATES",
    "INITIAL_STATE",
    "TRANSITIONS",
    "TransitionNotAllowed",
    "TransitionTableError",
    "allowed_events",
    "is_final",
    "next_state",
    "validate",
]


class CaseState(StrEnum):
    """Where a recovery case stands; the value is what the store's ``state`` column holds."""

    OPEN = "open"
    AWAITING_RECONNECT = "awaiting_reconnect"
    RECONNECTED = "reconnected"
    READY = "ready"
    RESUMED = "resumed"
    CLOSED = "closed"
    ABANDONED = "abandoned"


class CaseEvent(StrEnum):
    """What happened to a case; each accepted event is one ``transitions`` row."""

    NOTIFIED = "notified"
    """The notifier told a human (or the identity layer) that a reconnect is needed."""
    RECONNECTED = "reconnected"
    """The identity layer holds a new grant and the policy's probe proved it."""
    RECONCILED = "reconciled"
    """The failed action's outcome is settled, or left ``unknown`` for lack of a reconcile."""
    REDEEMED = "redeemed"
    """The recovery capability was burned; the run's epoch was bumped."""
    COMMITTED = "committed"
    """The failed action is committed: executed by the resumed run or found by reconcile."""
    ABANDONED = "abandoned"
    """An operator (or the service) gave up on the case."""


INITIAL_STATE: Final = CaseState.OPEN
FINAL_STATES: Final = frozenset({CaseState.CLOSED, CaseState.ABANDONED})

_S, _E = CaseState, CaseEvent

TRANSITIONS: Final[Mapping[tuple[CaseState, CaseEvent], CaseState]] = MappingProxyType(
    {
        (_S.OPEN, _E.NOTIFIED): _S.AWAITING_RECONNECT,
        (_S.OPEN, _E.RECONNECTED): _S.RECONNECTED,
        (_S.AWAITING_RECONNECT, _E.RECONNECTED): _S.RECONNECTED,
        (_S.RECONNECTED, _E.RECONCILED): _S.READY,
        (_S.READY, _E.REDEEMED): _S.RESUMED,
        (_S.RESUMED, _E.COMMITTED): _S.CLOSED,
        **{
            (state, _E.ABANDONED): _S.ABANDONED
            for state in CaseState
            if state not in FINAL_STATES
        },
    }
)
"""``(state, event) → new state``; anything absent is refused by :func:`next_state`."""


class TransitionNotAllowed(ReviveError):
    """An event that does not apply in the case's current state.

    Attributes:
        state: the state the case was in (unchanged).
        event: the refused event.
        allowed: the events that state does accept, for the caller's error answer.
    """

    def __init__(self, state: CaseState | str, event: CaseEvent | str) -> None:
        self.state = state
        self.event = event
        self.allowed = allowed_events(state)
        super().__init__(f"event {str(event)!r} is not allowed in case state {str(state)!r}")


class TransitionTableError(ReviveError, ValueError):
    """A transition table breaks a structural rule; raised by :func:`validate`.

    Attributes:
        problems: one line per violated rule, naming the states involved.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid transition table: " + "; ".join(self.problems))


def next_state(state: CaseState | str, event: CaseEvent | str) -> CaseState:
    """The state ``event`` moves a case in ``state`` to.

    The caller persists it with compare-and-set on ``state`` (DESIGN §8); this function only
    decides.

    Args:
        state: the case's current state (a plain string from the store works too).
        event: what happened.

    Raises:
        TransitionNotAllowed: the table has no ``(state, event)`` entry.
    """
    # StrEnum members hash and compare as their values, so plain strings look up the same.
    try:
        return TRANSITIONS[(state, event)]  # type: ignore[index]
    except KeyError:
        raise TransitionNotAllowed(state, event) from None


def allowed_events(state: CaseState | str) -> frozenset[CaseEvent]:
    """The events ``state`` accepts (empty for final and unknown states)."""
    return frozenset(event for (source, event) in TRANSITIONS if source == state)


def is_final(state: CaseState | str) -> bool:
    """Whether a case in ``state`` is over (``closed`` or ``abandoned``)."""
    return state in FINAL_STATES


_Table = Mapping[tuple[CaseState, CaseEvent], CaseState] | Mapping[tuple[str, str], str]


def validate(
    table: _Table,
    *,
    states: Iterable[str] = tuple(CaseState),
    events: Iterable[str] = tuple(CaseEvent),
    initial: str = INITIAL_STATE,
    final: Iterable[str] = FINAL_STATES,
) -> None:
    """Check a transition table's structure; the defaults describe :class:`CaseState`.

    Rules: every state and event in the table is declared; every declared state is reachable
    from ``initial``; final states have no outgoing edge; every non-final state can reach a
    final state (no trap states, after ``statemachine``'s factory checks).

    Args:
        table: ``(state, event) → state``.
        states, events: the declared vocabulary.
        initial: where every case starts.
        final: states a case ends in.

    Raises:
        TransitionTableError: listing every violated rule.
    """
    # Plain strings throughout, so messages read 'ready' and not <CaseState.READY: 'ready'>.
    declared = {str(s) for s in states}
    known_events, finals, initial = {str(e) for e in events}, {str(f) for f in final}, str(initial)
    problems: list[str] = []
    if initial not in declared:
        problems.append(f"initial state {initial!r} is not declared")
    if undeclared_finals := sorted(finals - declared):
        problems.append(f"final states not declared: {undeclared_finals}")

    edges: dict[str, set[str]] = {state: set() for state in declared}
    for key, value in table.items():
        (source, event), target = (str(key[0]), str(key[1])), str(value)
        for role, state in (("source", source), ("target", target)):
            if state not in declared:
                problems.append(f"unknown {role} state {state!r} in ({source!r}, {event!r})")
        if event not in known_events:
            problems.append(f"unknown event {event!r} in ({source!r}, {event!r})")
        if source in finals:
            problems.append(f"final state {source!r} has an outgoing edge on {event!r}")
        edges.setdefault(source, set()).add(target)

    reachable = _closure([initial], edges)
    if unreachable := sorted(declared - reachable):
        problems.append(f"states unreachable from {initial!r}: {unreachable}")

    reverse: dict[str, set[str]] = {}
    for source, targets in edges.items():
        for target in targets:
            reverse.setdefault(target, set()).add(source)
    can_finish = _closure(finals, reverse)
    if traps := sorted(declared - finals - can_finish):
        problems.append(f"trap states (cannot reach a final state): {traps}")

    if problems:
        raise TransitionTableError(problems)


def _closure(start: Iterable[str], edges: Mapping[str, set[str]]) -> set[str]:
    seen = set(start)
    queue = deque(seen)
    while queue:
        for nxt in edges.get(queue.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


validate(TRANSITIONS)
