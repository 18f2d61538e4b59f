"""The seam between the ``/v1`` handlers and the recovery service: :class:`RecoveryApi`.

The handlers in ``revive.api.routes`` parse and render; everything they decide is asked of a
``RecoveryApi`` stored under an ``AppKey``. ``revive.recovery.service`` implements it over the
``Store``, the keyring and the credential sources; the API tests use a fake.

Errors: every method raises ``revive.errors`` problems (rendered as problem+json by
``with_problems``). Besides those, a handler translates two foreign errors once, at the
boundary: ``revive.store.ConflictError`` (a compare-and-set lost a race) and
``revive.recovery.TransitionNotAllowed`` (the case is not in a state that accepts the event),
both into a 400 ``urn:revive:bad-request`` naming the state found.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from revive.recovery.risk import AtRisk, WebhookOutcome
from revive.recovery.service import Minted, Redemption
from revive.store.models import ActionRow, CaseRow, RunRow, TransitionRow

__all__ = ["AtRisk", "Minted", "RecoveryApi", "Redemption", "WebhookOutcome"]


class RecoveryApi(Protocol):
    """What the ``/v1`` routes need from the recovery service; one implementation per app."""

    async def mint_run_capability(
        self,
        run_id: str,
        connection_id: str,
        checkpoint_id: str,
        epoch: int,
        workflow: str | None,
    ) -> Minted:
        """Mint a run capability for ``(run_id, epoch)`` on the connection's current generation.

        The first call with ``epoch == 1`` creates the run (DESIGN §4).

        Args:
            run_id: the runtime's logical execution id.
            connection_id: the configured connection the run will act through.
            checkpoint_id: the runtime's checkpoint the run stands at.
            epoch: the epoch the runtime holds in its own durable state (≥ 1).
            workflow: the runtime's workflow name, kept for operators; may be ``None``.

        Returns:
            the capability and its claims.

        Raises:
            Fenced: ``epoch`` is older or newer than the store's.
            RecoveryRequired: the run has an open case; the problem carries ``case_id`` (and
                ``run_id``, ``checkpoint_id``, ``action_key``, ``provider_code`` when known).
            NotFound: no connection named ``connection_id`` is configured.
        """
        ...

    async def renew(self, token: str) -> Minted:
        """Mint the same run claims with a new ``exp`` (and a new ``jti``).

        Args:
            token: a run capability that still verifies.

        Returns:
            the new capability.

        Raises:
            CapabilityInvalid: forged, expired, wrong audience or not a run capability.
            Fenced: its epoch or generation is older than the store's.
        """
        ...

    async def redeem(self, token: str) -> Redemption:
        """Burn a recovery capability, bump the run's epoch and return a run capability.

        Args:
            token: the recovery capability issued for a ``ready`` case.

        Returns:
            the redemption: new run capability, epoch, generation, checkpoint and the action.

        Raises:
            CapabilityInvalid: forged, expired, already burned, or its case is not ``ready``.
            Fenced: the run or connection moved past what the capability names.
        """
        ...

    async def settle_action(
        self,
        idempotency_key: str,
        outcome: Literal["committed", "not_committed"],
        evidence: dict[str, Any],
    ) -> ActionRow:
        """Settle an ``unknown`` action from the worker's reconcile callback (DESIGN §7).

        Args:
            idempotency_key: the ledger key.
            outcome: what the worker found out.
            evidence: redacted proof (e.g. the provider's id of the created object).

        Returns:
            the settled row.

        Raises:
            NotFound: no action has that key.
            revive.store.ConflictError: the action is not ``unknown`` (the handler answers 400).
        """
        ...

    async def run_status(self, run_id: str) -> tuple[RunRow, list[CaseRow]]:
        """The run and its cases that are not in a final state (``closed``/``abandoned``).

        Args:
            run_id: the run.

        Returns:
            ``(run, open_cases)``.

        Raises:
            NotFound: the run has never minted a capability.
        """
        ...

    async def list_cases(
        self,
        state: str | None,
        connection_id: str | None,
        run_id: str | None,
    ) -> list[CaseRow]:
        """Cases matching every filter given (``None`` = any), newest first.

        Args:
            state: a ``revive.recovery.CaseState`` value.
            connection_id: the connection the case belongs to.
            run_id: the run the case belongs to.

        Returns:
            the matching cases (possibly none).
        """
        ...

    async def get_case(
        self, case_id: str
    ) -> tuple[CaseRow, list[TransitionRow], list[ActionRow]]:
        """One case, its incident record and its run's actions.

        Args:
            case_id: the case.

        Returns:
            ``(case, transitions in seq order, the run's actions)``.

        Raises:
            NotFound: no such case.
        """
        ...

    async def reconnected(
        self, connection_id: str, actor: str, evidence: dict[str, Any]
    ) -> list[CaseRow]:
        """The identity layer holds a new grant: lease generation + 1, probe, advance cases.

        Args:
            connection_id: the connection that was reconnected.
            actor: who reported it (an operator name, ``"webhook"``...).
            evidence: redacted context recorded in each transition.

        Returns:
            the cases this call advanced, in their new state.

        Raises:
            NotFound: no connection named ``connection_id`` is configured.
            CredentialError: the source cannot lease or the probe failed (rendered as its
                problem: recovery-required, upstream-unavailable or source-misconfigured).
        """
        ...

    async def nango_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookOutcome:
        """Act on one webhook from Nango, authenticated by its signature, not the admin token.

        Args:
            body: the raw request body (the signature covers these exact bytes).
            headers: the request headers (``X-Nango-Hmac-Sha256``, any case).

        Returns:
            what it did: ``handled`` is false for webhook types and connections not handled
            here, which are acknowledged so that Nango does not retry them.

        Raises:
            WebhookSignatureInvalid: no configured nango signing key verifies the signature;
                nothing changed.
            BadRequest: a signed body that is not JSON, or an auth webhook missing its fields.
            CredentialError / RecoveryRequired / UpstreamUnavailable: the reported new grant
                failed its probe; nothing changed.
        """
        ...

    async def connections_at_risk(self) -> list[AtRisk]:
        """Connections whose grant works but is expected to die.

        Returns:
            the store's durable marks (e.g. a failed refresh reported by Nango) and each
            source's own report (``ReportsGrantRisk``), one per (connection, reason), sorted.
        """
        ...

    async def begin_connect(self, connection_id: str, redirect_uri: str) -> str:
        """Start the built-in oauth2 authorization-code flow (PKCE, ``state``).

        Args:
            connection_id: an ``oauth2`` connection.
            redirect_uri: the callback URL the provider must send the browser back to.

        Returns:
            the provider's authorize URL to redirect the browser to.

        Raises:
            NotFound: no such connection.
            BadRequest: the connection's source has no built-in connect flow.
        """
        ...

    async def complete_connect(
        self, connection_id: str, params: Mapping[str, str]
    ) -> list[CaseRow]:
        """Finish the flow from the provider's redirect and report the connection reconnected.

        Args:
            connection_id: the connection named in the callback path.
            params: the callback's query (``code`` and ``state``, or ``error``...).

        Returns:
            the cases advanced, as for :meth:`reconnected`.

        Raises:
            NotFound: no such connection.
            BadRequest: unknown, expired or reused ``state``; consent denied; missing ``code``.
            CredentialError: the token endpoint refused or failed the exchange.
        """
        ...

    async def issue_recovery_capability(self, case_id: str, actor: str) -> Minted:
        """Issue a single-use recovery capability bound to a ``ready`` case (DESIGN §8).

        Args:
            case_id: the case.
            actor: who asked, recorded for the incident record.

        Returns:
            the capability; its claims name the case, the new generation and the next epoch.

        Raises:
            NotFound: no such case.
            BadRequest: the case is not ``ready``.
        """
        ...

    async def abandon(self, case_id: str, actor: str, reason: str) -> CaseRow:
        """Give up on a case; it moves to ``abandoned`` and stops blocking its run.

        Args:
            case_id: the case.
            actor: who gave up.
            reason: why, recorded in the transition's evidence.

        Returns:
            the case, now ``abandoned``.

        Raises:
            NotFound: no such case.
            BadRequest or revive.recovery.TransitionNotAllowed: the case is already final.
        """
        ...

    def jwks(self) -> dict[str, Any]:
        """The public keys that verify capabilities, as a JWK Set (RFC 7517)."""
        ...
