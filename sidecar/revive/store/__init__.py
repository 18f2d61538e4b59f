"""Durable state behind the ``Store`` Protocol: runs, the action ledger, recovery cases.

Open a backend with :func:`open_store` (an async context manager); code above this package
depends on :class:`Store` only.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from revive.store.base import Store
    from revive.store.factory import open_store
    from revive.store.models import (
        ActionRow,
        ActionState,
        AtRiskRow,
        CaseDraft,
        CaseRow,
        ClaimOutcome,
        ClaimRequest,
        ConflictError,
        ConnectionRow,
        FinishedAction,
        FinishState,
        Outcome,
        RedeemResult,
        RunRow,
        StoreUnavailable,
        TransitionRow,
    )
    from revive.store.postgres import PostgresStore
    from revive.store.sqlite import SqliteStore

_HOMES = {
    "Store": "revive.store.base",
    "open_store": "revive.store.factory",
    "PostgresStore": "revive.store.postgres",
    "SqliteStore": "revive.store.sqlite",
}


def __getattr__(name: str) -> Any:
    # Loaded on first use: PostgresStore loads asyncpg, which only a sidecar configured for
    # PostgreSQL should pay for, and the SQLite writer process needs the models and the
    # SQLite operations only, not the event-loop side of the store.
    if name not in __all__:
        raise AttributeError(f"module 'revive.store' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_HOMES.get(name, "revive.store.models"))
    return getattr(module, name)


__all__ = [
    "ActionRow",
    "ActionState",
    "AtRiskRow",
    "CaseDraft",
    "CaseRow",
    "ClaimOutcome",
    "FinishedAction",
    "ClaimRequest",
    "ConflictError",
    "ConnectionRow",
    "FinishState",
    "Outcome",
    "PostgresStore",
    "RedeemResult",
    "RunRow",
    "SqliteStore",
    "Store",
    "StoreUnavailable",
    "TransitionRow",
    "open_store",
]
