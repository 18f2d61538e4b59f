"""Durable state behind the ``Store`` Protocol: runs, the action ledger, recovery cases.

Open a backend with :func:`open_store` (an async context manager); code above this package
depends on :class:`Store` only.
"""

from revive.store.base import Store
from revive.store.factory import open_store
from revive.store.models import (
    ActionRow,
    ActionState,
    AtRiskRow,
    CaseDraft,
    CaseRow,
    ClaimOutcome,
    FinishedAction,
    ClaimRequest,
    ConflictError,
    ConnectionRow,
    FinishState,
    Outcome,
    RedeemResult,
    RunRow,
    StoreUnavailable,
    TransitionRow,
)
from revive.store.sqlite import SqliteStore

def __getattr__(name: str) -> object:
    # PostgresStore loads asyncpg; only a sidecar configured for PostgreSQL pays for it.
    if name == "PostgresStore":
        from revive.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module 'revive.store' has no attribute {name!r}")


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
