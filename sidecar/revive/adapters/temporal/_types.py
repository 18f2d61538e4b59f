"""What crosses Temporal's history between the workflow helper and protected activities.

Only these travel: the run's coordinates and epoch, a recovery capability on the way back in
(single use, minutes long, names no provider token), the case a dead grant opened, and the
activity's own result. Never a provider token: the sidecar keeps those.
"""

# No ``from __future__ import annotations`` here: Temporal's converter resolves these fields'
# hints inside the workflow sandbox, whose ``sys.modules`` need not hold this module, so the
# annotations must be objects rather than strings to evaluate.

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CAPABILITY_INVALID",
    "FENCED",
    "RECOVERED_SIGNAL",
    "RECOVERY_REQUIRED",
    "RECOVERY_TIMEOUT",
    "STATUS_QUERY",
    "ProtectedResult",
    "ReviveRun",
]

RECOVERY_REQUIRED = "ReviveRecoveryRequired"
"""``ApplicationError.type`` when the grant is dead; ``details[0]`` is the case as a dict."""
FENCED = "ReviveFenced"
"""``ApplicationError.type`` when the epoch the activity held is stale."""
CAPABILITY_INVALID = "ReviveCapabilityInvalid"
"""``ApplicationError.type`` when a capability was refused (expired, burned, forged)."""
RECOVERY_TIMEOUT = "ReviveRecoveryTimeout"
"""``ApplicationError.type`` the workflow fails with when no recovery came in time."""
RECOVERED_SIGNAL = "revive_recovered"
"""The signal that delivers a recovery capability: ``revive_recovered(capability: str)``."""
STATUS_QUERY = "revive_status"
"""The query answering ``{"epoch": int, "waiting": [case, ...]}``."""


@dataclass(frozen=True, slots=True)
class ReviveRun:
    """The run's side of one protected activity call; one field of the activity's ``…Input``.

    Built by :meth:`ReviveWorkflow.execute_activity`, never by hand in a workflow.

    Attributes:
        run_id: the run (the workflow id).
        checkpoint_id: where in the workflow this call stands.
        epoch: the run's epoch as the workflow holds it.
        recovery_capability: set only on the re-run after a recovery; the activity redeems it.
    """

    run_id: str
    checkpoint_id: str
    epoch: int = 1
    recovery_capability: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ProtectedResult:
    """What a protected activity returns: its value and the run's epoch after it.

    Attributes:
        value: what ``execute`` returned (JSON-able); ``None`` when it was skipped.
        epoch: the run's epoch after the action (the new one after a redemption).
        skipped: ``execute`` did not run because the side effect already exists.
        replayed: the side effect happened before this call (ledger, reconcile or replay).
        idempotency_key: the action's ledger key.
    """

    value: Any
    epoch: int
    skipped: bool = False
    replayed: bool = False
    idempotency_key: str = ""
