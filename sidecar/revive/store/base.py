"""The ``Store`` seam: everything Revive keeps durably, behind one Protocol (DESIGN §9).

Backends (``SqliteStore`` today, ``PostgresStore`` with the shared-store issue) are chosen once at
start-up by ``revive.store.factory.open_store`` and must pass ``tests/store/test_conformance.py``.
A backend is constructed by an async context manager that applies the numbered migrations
(``setup()``) and closes its connections on exit.

Every method that changes state is one transaction: a caller that sees it return knows the change
is durable, and a caller that sees it raise knows nothing of it was kept. Domain refusals are the
``revive.errors`` problems (``Fenced``, ``InFlight``, ...), so the API answers them as they are;
a lost compare-and-set is :class:`ConflictError`; a failing database is :class:`StoreUnavailable`.
Driver exceptions never escape a backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from revive.store.models import (
    ActionRow,
    AtRiskRow,
    ActionState,
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

__all__ = [
    "ActionRow", "ActionState", "AtRiskRow", "CaseDraft", "CaseRow", "ClaimOutcome", "ClaimRequest",
    "ConflictError", "ConnectionRow", "FinishedAction", "FinishState", "Outcome", "RedeemResult",
    "RunRow", "Store", "StoreUnavailable", "TransitionRow",
]


class Store(Protocol):
    """Durable state of one sidecar (or of several sharing one database).

    Every method may also raise :class:`StoreUnavailable` when the database fails.
    """

    async def ping(self) -> None:
        """Prove the database answers (for ``/readyz``).

        Raises:
            StoreUnavailable: it does not.
        """
        ...

    # -- connections ---------------------------------------------------------------------------

    async def ensure_connection(self, connection_id: str) -> ConnectionRow:
        """Return the connection, creating it at generation 1, ``active``, if it is new.

        Args:
            connection_id: a configured connection's id.
        """
        ...

    async def get_connection(self, connection_id: str) -> ConnectionRow | None:
        """Return the connection, or ``None`` if the store never heard of it."""
        ...

    async def record_reconnect(self, connection_id: str, expected_generation: int) -> ConnectionRow:
        """Record a new grant: generation + 1, state ``active`` (compare-and-set).

        Args:
            connection_id: the connection that was reconnected.
            expected_generation: the generation the caller saw; guards against double counting
                one reconnect reported twice (webhook and callback).

        Raises:
            revive.errors.NotFound: unknown connection.
            ConflictError: the generation moved since the caller read it.
        """
        ...

    async def mark_at_risk(
        self, connection_id: str, reason: str, detail: str, expires_at: float | None = None
    ) -> AtRiskRow:
        """Mark a connection's grant at risk (it works, but is expected to die), one transaction.

        A connection has at most one mark: a new one replaces it. ``marked_at`` is kept when
        the reason is unchanged (so it says since when), and reset when the reason changes.

        Args:
            connection_id: the connection; the store does not check that it is known.
            reason: a stable slug (``identity-layer-auth-failed``, ``idle-grant-expiring``).
            detail: a short sentence, already redacted by the caller.
            expires_at: unix time the grant is expected to die, if known.

        Returns:
            The mark as stored.
        """
        ...

    async def clear_at_risk(self, connection_id: str) -> bool:
        """Remove the connection's mark (its grant was replaced or works again).

        Returns:
            Whether there was a mark to remove.
        """
        ...

    async def list_at_risk(self) -> list[AtRiskRow]:
        """Every mark, ordered by ``connection_id``."""
        ...

    # -- runs ----------------------------------------------------------------------------------

    async def mint_check(self, run_id: str, epoch: int, workflow: str | None = None) -> RunRow:
        """Decide whether a run capability may be minted for ``epoch`` (DESIGN §4), atomically.

        An unknown run is created when ``epoch`` is 1. Only the store's current epoch is granted:
        an older one belongs to a worker left over from before a recovery, a newer one was made
        up. A run with an unresolved case (any state but ``resumed``, ``closed``, ``abandoned``)
        is refused until the case is redeemed.

        Args:
            run_id: the runtime's id of the execution.
            epoch: the epoch the runtime holds in its own durable state.
            workflow: the workflow's name, kept when the run is created.

        Raises:
            revive.errors.Fenced: ``epoch`` is not the store's (or not 1 for a new run).
            revive.errors.RecoveryRequired: an unresolved case blocks the run; ``extra`` carries
                ``case_id``, ``run_id``, ``checkpoint_id``, ``action_key``, ``provider_code``.
        """
        ...

    async def get_run(self, run_id: str) -> RunRow | None:
        """Return the run, or ``None``."""
        ...

    async def check_fence(
        self, run_id: str, epoch: int, connection_id: str, generation: int
    ) -> None:
        """Refuse a non-mutating request made with a stale run capability (DESIGN §4).

        Mutating requests get the same check inside :meth:`claim`, in the claiming transaction.

        Args:
            run_id, epoch: the capability's run and epoch.
            connection_id, generation: the capability's connection and grant generation.

        Raises:
            revive.errors.Fenced: the run or connection is unknown, or the epoch or generation
                differs from the store's (older: stale worker; newer: cannot exist).
        """
        ...

    # -- action ledger -------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> ClaimOutcome:
        """Claim an idempotency key before forwarding a mutating request (DESIGN §7).

        In one transaction: the fence check, then by the key's state: none → insert
        ``in_flight``, ``claimed``; ``not_committed`` → ``in_flight`` again, attempts + 1, this
        owner, ``claimed``; ``committed``/``failed`` → ``replay`` the stored answer.

        Args:
            request: the key, the request's fingerprint, the claiming owner and the fence.

        Raises:
            revive.errors.Fenced: stale epoch or generation (checked first).
            revive.errors.IdempotencyMismatch: the key is held by another request (other
                fingerprint or another run).
            revive.errors.InFlight: the key is being executed right now.
            revive.errors.ReconcileRequired: the key's outcome is ``unknown``.
        """
        ...

    async def finish(
        self,
        idempotency_key: str,
        owner: str,
        state: FinishState,
        status: int | None = None,
        response: str | None = None,
        case_id: str | None = None,
    ) -> FinishedAction:
        """Record how an ``in_flight`` action ended; only its owner may.

        Args:
            idempotency_key: the claimed key.
            owner: the claimant; another owner's (or a swept) row is not touched.
            state: ``committed`` (2xx), ``failed`` (permanent 4xx), ``not_committed``,
                ``unknown``.
            status: the upstream status to replay.
            response: the caller's serialised answer to replay (bounded, opaque here).
            case_id: the recovery case the failure opened, if any.

        Returns:
            The recorded state, with the case the action belongs to (given now or before).

        Raises:
            revive.errors.NotFound: no such key.
            ConflictError: the row is not ``in_flight`` or belongs to another owner.
            ValueError: ``state`` is not a finishing state or ``response`` is too large.
        """
        ...

    async def settle(
        self,
        idempotency_key: str,
        outcome: Outcome,
        evidence: Mapping[str, Any],
        status: int | None = None,
        response: str | None = None,
    ) -> ActionRow:
        """Settle an ``unknown`` action by reconcile or by the worker (DESIGN §7).

        Settling again with the outcome the row already has returns it unchanged, so a retried
        callback is harmless.

        Args:
            idempotency_key: the key whose outcome was unknown.
            outcome: what reconcile found.
            evidence: why (the lookup's redacted answer, the worker's note); kept on the row.
            status, response: an answer to replay later, when reconcile found one.

        Raises:
            revive.errors.NotFound: no such key.
            ConflictError: the row is neither ``unknown`` nor already ``outcome``.
        """
        ...

    async def sweep_in_flight(self, owner: str) -> int:
        """Turn this owner's ``in_flight`` rows into ``unknown`` (start-up, DESIGN §7).

        Args:
            owner: the starting sidecar's stable identity; other owners' rows are left alone.

        Returns:
            How many rows were swept.
        """
        ...

    async def get_action(self, idempotency_key: str) -> ActionRow | None:
        """Return one ledger row, or ``None``."""
        ...

    async def list_actions(self, run_id: str) -> list[ActionRow]:
        """Return a run's ledger rows, oldest change first."""
        ...

    async def count_actions(self, state: ActionState) -> int:
        """Count ledger rows in ``state`` (for metrics)."""
        ...

    # -- recovery cases ------------------------------------------------------------------------

    async def open_case(self, draft: CaseDraft) -> tuple[CaseRow, bool]:
        """Open the case for (run, connection, dead generation), or find the one already open.

        In one transaction: insert the case ``open`` at version 1 with transition 1
        (``None`` → ``open``); mark the connection ``dead`` if it is still at the draft's
        generation; link the draft's action (if any, and not linked yet) to the case.

        Args:
            draft: the case's identity, context and redacted evidence.

        Returns:
            The case, and whether this call created it.
        """
        ...

    async def transition(
        self,
        case_id: str,
        from_state: str,
        to_state: str,
        actor: str,
        evidence: Mapping[str, Any],
        **fields: str | None,
    ) -> CaseRow:
        """Move a case from ``from_state`` to ``to_state`` (compare-and-set), one transaction.

        The store enforces only the compare-and-set; which moves are legal is
        ``revive.recovery.machine``'s business.

        Args:
            case_id: the case.
            from_state: the state the caller saw.
            to_state: the new state.
            actor: who moves it (``"api"``, ``"admin:alice"``, ``"reconciler"``, ...).
            evidence: redacted context, kept in the new transition row.
            **fields: other columns to set: ``outcome``, ``workflow``.

        Returns:
            The case at its new version.

        Raises:
            revive.errors.NotFound: no such case.
            ConflictError: the case is not in ``from_state`` any more.
            ValueError: a field outside ``outcome``/``workflow``.
        """
        ...

    async def get_case(self, case_id: str) -> CaseRow | None:
        """Return one case, or ``None``."""
        ...

    async def list_cases(
        self,
        state: str | None = None,
        connection_id: str | None = None,
        run_id: str | None = None,
        open_only: bool = False,
    ) -> list[CaseRow]:
        """Return cases matching every filter given, oldest first.

        Args:
            state: exactly this state.
            connection_id, run_id: cases of this connection / run.
            open_only: skip ``closed`` and ``abandoned`` cases.
        """
        ...

    async def transitions(self, case_id: str) -> list[TransitionRow]:
        """Return a case's incident record ordered by ``seq`` (empty for an unknown case)."""
        ...

    # -- redemption ----------------------------------------------------------------------------

    async def redeem(
        self, jti: str, exp: float, case_id: str, run_id: str, expected_epoch: int, actor: str
    ) -> RedeemResult:
        """Burn a recovery capability and resume its case, atomically (DESIGN §5, §8).

        In one transaction: burn ``jti``; move the case ``ready`` → ``resumed``; raise the
        run's epoch from ``expected_epoch`` to ``expected_epoch + 1``; append the transition.
        If any step is refused, nothing is kept (the ``jti`` stays unburned). Of any number of
        concurrent redemptions for one case exactly one wins.

        Args:
            jti: the capability's id.
            exp: its expiry (unix seconds), kept so burned ids can be pruned after it.
            case_id, run_id: what the capability names.
            expected_epoch: the epoch the capability was issued against (its ``epc`` - 1).
            actor: who redeemed (for the incident record).

        Raises:
            revive.errors.CapabilityInvalid: the ``jti`` is already burned, or the case is
                missing, belongs to another run or is not ``ready`` (another capability won):
                to the worker all mean "this capability cannot be used".
            revive.errors.Fenced: the run's epoch is not ``expected_epoch``.
        """
        ...
