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
from revive.recovery.reconcile import ReconcileResult, Reconciler, odata_escape, stamp_request

__all__ = [
    "FINAL_STATES",
    "INITIAL_STATE",
    "TRANSITIONS",
    "CaseEvent",
    "CaseState",
    "ReconcileResult",
    "Reconciler",
    "TransitionNotAllowed",
    "TransitionTableError",
    "allowed_events",
    "is_final",
    "next_state",
    "odata_escape",
    "stamp_request",
    "validate",
]
