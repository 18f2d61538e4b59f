"""Recovery cases (DESIGN §8): the declared state machine; the service that drives it."""

from revive.recovery.machine import (
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

__all__ = [
    "FINAL_STATES",
    "INITIAL_STATE",
    "TRANSITIONS",
    "CaseEvent",
    "CaseState",
    "TransitionNotAllowed",
    "TransitionTableError",
    "allowed_events",
    "is_final",
    "next_state",
    "validate",
]
