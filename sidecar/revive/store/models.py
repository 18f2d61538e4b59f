"""What the store hands out and takes in: frozen rows, requests, results and the store's errors.

Rows are plain frozen dataclasses, never driver rows, so that callers cannot tell the backends
apart and cannot mutate what another caller read. JSON columns come back parsed (``evidence``);
the action's stored ``response`` stays the opaque text the caller gave.

Errors the store raises (besides the ``revive.errors`` problems it enforces)::

    ReviveError
    ├── ConflictError     -- a compare-and-set lost: the row moved under the caller
    └── StoreUnavailable  -- the database failed (I/O, locked too long, closed store)
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from revive.errors import ReviveError

_Row = TypeVar("_Row")


def pickles_as_tuple(cls: type[_Row]) -> type[_Row]:
    """Pickle a frozen dataclass as its constructor call over its fields' values.

    Requests and rows cross the pipe to the SQLite writer process for every mutating request.
    The default pickling of a slotted dataclass goes through ``__getstate__``/``__setstate__``
    and its field list, several times slower than one tuple and one constructor call.
    """
    values = operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))  # type: ignore[arg-type]

    def __reduce__(self: _Row) -> tuple[type[_Row], tuple[Any, ...]]:
        found = values(self)
        return (cls, found if isinstance(found, tuple) else (found,))

    cls.__reduce__ = __reduce__  # type: ignore[method-assign,assignment]
    return cls

ActionState = Literal["in_flight", "committed", "failed", "not_committed", "unknown"]
"""Where one idempotency key stands (DESIGN §7)."""

FinishState = Literal["committed", "failed", "not_committed", "unknown"]
"""What the owner of an ``in_flight`` action may turn it into."""

Outcome = Literal["committed", "not_committed"]
"""How an ``unknown`` action is settled by reconcile."""

ConnectionState = Literal["active", "dead"]

ACTION_STATES: frozenset[str] = frozenset(
    {"in_flight", "committed", "failed", "not_committed", "unknown"}
)

FINAL_CASE_STATES: frozenset[str] = frozenset({"closed", "abandoned"})
"""Cases in these states are over; ``list_cases(open_only=True)`` skips them."""

PAST_RECOVERY_CASE_STATES: frozenset[str] = FINAL_CASE_STATES | {"resumed"}
"""Cases in these states no longer block minting run capabilities for their run.

``resumed`` is included because DESIGN §10 has the other actions of a recovered run mint for the
new epoch while the case waits to be closed. Any other state, including one this module has never
heard of, blocks: the safe default, and it keeps the transition table in ``revive.recovery``.
"""

CASE_UPDATABLE_FIELDS: frozenset[str] = frozenset({"outcome", "workflow"})
"""Columns ``Store.transition`` may change besides ``state`` and ``version``."""

MAX_RESPONSE_CHARS = 4 * 1024 * 1024
"""A safety net for a stored answer; the proxy bounds bodies well below it (DESIGN §7)."""


class ConflictError(ReviveError):
    """A compare-and-set found the row in another state than the caller expected.

    Attributes:
        entity: the table the row lives in (``"case"``, ``"action"``, ``"connection"``).
        key: the row's primary key.
        expected: the state (or generation) the caller expected, as text.
        actual: what the store holds, as text.
    """

    def __init__(self, entity: str, key: str, expected: str, actual: str) -> None:
        self.entity, self.key, self.expected, self.actual = entity, key, expected, actual
        super().__init__(f"{entity} {key}: expected {expected}, found {actual}")

    def __reduce__(self) -> tuple[type[ConflictError], tuple[str, str, str, str]]:
        # Raised in the SQLite writer process and pickled back to the caller.
        return (type(self), (self.entity, self.key, self.expected, self.actual))


class StoreUnavailable(ReviveError):
    """The database could not be reached or failed; ``/readyz`` and callers branch on it."""


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class ConnectionRow:
    """A connection's grant generation and whether that generation is dead. Never a token."""

    connection_id: str
    generation: int
    state: ConnectionState
    updated_at: float


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class AtRiskRow:
    """A connection whose grant still works but is expected to die, as the store keeps it.

    The same fields as ``revive.sources.GrantRisk`` plus ``marked_at``; the store does not
    import ``revive.sources`` (siblings stay independent), the recovery service converts.

    Attributes:
        connection_id: the connection at risk; one mark per connection.
        reason: a stable slug (``identity-layer-auth-failed``, ...).
        detail: a short human sentence, already free of secrets.
        expires_at: unix time the grant is expected to die, when known.
        marked_at: since when the connection has been at risk for this ``reason``.
    """

    connection_id: str
    reason: str
    detail: str
    expires_at: float | None
    marked_at: float


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class RunRow:
    """One logical execution of the runtime and its current epoch (DESIGN §4)."""

    run_id: str
    epoch: int
    workflow: str | None
    created_at: float
    updated_at: float


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class ActionRow:
    """One idempotency key of the action ledger (DESIGN §7).

    ``response`` is the caller's own serialisation of the answer to replay (JSON text of
    ``{headers, body_b64}``); ``evidence`` is what settled an ``unknown`` outcome, if anything.
    """

    idempotency_key: str
    run_id: str
    action_key: str
    checkpoint_id: str
    connection_id: str
    fingerprint: str
    state: ActionState
    attempts: int
    status: int | None
    response: str | None = field(repr=False)
    case_id: str | None
    owner: str
    evidence: Mapping[str, Any] | None
    updated_at: float


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class CaseRow:
    """A recovery case (DESIGN §8); ``version`` counts its transitions."""

    case_id: str
    run_id: str
    connection_id: str
    generation: int
    epoch: int
    checkpoint_id: str
    action_key: str
    idempotency_key: str | None
    failure_class: str
    provider_code: str | None
    provider_message: str | None
    evidence: Mapping[str, Any]
    state: str
    version: int
    outcome: str | None
    workflow: str | None
    created_at: float
    updated_at: float


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class TransitionRow:
    """One line of a case's incident record; ``seq`` equals the case version it produced."""

    case_id: str
    seq: int
    from_state: str | None
    to_state: str
    at: float
    actor: str
    evidence: Mapping[str, Any]


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Everything ``Store.claim`` needs: the key, the request's identity and its fence.

    Attributes:
        idempotency_key: the ledger key (given by the worker or derived from run and action).
        run_id, action_key, checkpoint_id, connection_id: where the action belongs.
        fingerprint: a digest of the request; the same key with another digest is refused.
        owner: the claiming sidecar; its stale ``in_flight`` rows are swept at start-up.
        epoch, generation: from the run capability; checked in the claiming transaction.
    """

    idempotency_key: str
    run_id: str
    action_key: str
    checkpoint_id: str
    connection_id: str
    fingerprint: str
    owner: str
    epoch: int
    generation: int


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """What a claim decided: forward the request (``claimed``) or replay ``action.response``."""

    kind: Literal["claimed", "replay"]
    action: ActionRow


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class FinishedAction:
    """What ``Store.finish`` recorded: the new state and the case waiting on the action.

    Not the whole row: every mutating request finishes one, on a thread that shares the GIL
    with the event loop, and its caller needs only to know whether a recovery case waits.
    """

    idempotency_key: str
    state: FinishState
    status: int | None
    case_id: str | None


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class CaseDraft:
    """A case about to be opened (DESIGN §8 "open").

    Attributes:
        run_id, connection_id, generation: the case's identity; one case per triple.
        epoch, checkpoint_id, action_key: where the run stood when the grant died.
        idempotency_key: the failed action's key, linked to the case when given.
        failure_class, provider_code, provider_message: the classification, already redacted.
        evidence: the redacted provider answer, stored in the case and its first transition.
        actor: who opened it (``"proxy"``, ``"refresher"``, ...).
        workflow: the runtime's workflow name, for operators.
        case_id: a chosen id; the store makes one up when ``None``.
    """

    run_id: str
    connection_id: str
    generation: int
    epoch: int
    checkpoint_id: str
    action_key: str
    failure_class: str
    actor: str
    idempotency_key: str | None = None
    provider_code: str | None = None
    provider_message: str | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    workflow: str | None = None
    case_id: str | None = None


@pickles_as_tuple
@dataclass(frozen=True, slots=True)
class RedeemResult:
    """A won redemption: the run's new epoch, the ``resumed`` case and the failed action."""

    epoch: int
    case: CaseRow
    action: ActionRow | None
