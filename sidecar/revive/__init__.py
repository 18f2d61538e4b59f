"""Revive: a credential-broker sidecar that turns dead OAuth grants into resumable recovery cases.

The top-level names are the worker library (:mod:`revive.client`), which imports nothing of
the server: ``from revive import protect_action, RecoveryRequired``.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    # Loaded on first use: a process that needs only part of the package (the SQLite store's
    # writer process imports revive.store) does not pay for aiohttp and the worker library.
    if name in __all__:
        import revive.client

        return getattr(revive.client, name)
    raise AttributeError(f"module 'revive' has no attribute {name!r}")


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
