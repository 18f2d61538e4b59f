"""Revive: a credential-broker sidecar that turns dead OAuth grants into resumable recovery cases.

The top-level names are the worker library (:mod:`revive.client`), which imports nothing of
the server: ``from revive import protect_action, RecoveryRequired``.
"""

from revive.client import (
    ActionContext,
    ActionResult,
    Fenced,
    ReconcileRequired,
    RecoveryCase,
    RecoveryRequired,
    ReviveClientError,
    SidecarProblem,
    derive_idempotency_key,
    protect_action,
)

__all__ = [
    "ActionContext",
    "ActionResult",
    "Fenced",
    "ReconcileRequired",
    "RecoveryCase",
    "RecoveryRequired",
    "ReviveClientError",
    "SidecarProblem",
    "derive_idempotency_key",
    "protect_action",
]
