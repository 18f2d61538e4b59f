"""The recovery service: minting, cases, reconnect, reconcile and redemption (DESIGN §4–§8).

Everything that changes a case goes through here, and every change is one store
transaction (compare-and-set plus a transition row). The state machine in ``machine.py``
decides which moves are legal; this module decides *when* to make them:

    proxy sees a dead grant ──▶ open_case ──▶ (open)
    identity layer reconnects ──▶ reconnected: probe the new grant ──▶ (reconnected)
        reconcile the failed action (did the email go out?) ──▶ (ready)
    operator / notifier ──▶ issue_recovery_capability (case stays ready)
    runtime ──▶ redeem: burn, bump epoch ──▶ (resumed) ──▶ the action commits ──▶ (closed)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from yarl import URL

from revive.classify import Policy
from revive.config import ConnectionConfig, OAuth2SourceConfig
from revive.errors import (
    BadRequest,
    CredentialError,
    Fenced,
    NotFound,
    ProblemError,
    RecoveryRequired,
    UpstreamUnavailable,
)
from revive.metrics import Metrics
from revive.recovery import closing, risk
from revive.recovery.fences import FenceCache
from revive.recovery.machine import CaseEvent, CaseState, TransitionNotAllowed, next_state
from revive.recovery.notify import CaseNotice, Notifier, NullNotifier
from revive.recovery.reconcile import Reconciler
from revive.sources import CredentialSource, OAuth2Source
from revive.sources.connect import ConnectFlow
from revive.sources.grants import read_secret_file
from revive.store import ActionRow, CaseDraft, CaseRow, ConflictError, RunRow, Store, TransitionRow
from revive.tokens import CapabilityClaims, CapabilityIssuer, CapabilityVerifier, Keyring

log = logging.getLogger("revive.recovery")

_ADVANCE_ON_RECONNECT = (CaseState.OPEN, CaseState.AWAITING_RECONNECT)


@dataclass(frozen=True, slots=True)
class Binding:
    """One configured connection with its policy and credential source."""

    connection: ConnectionConfig
    policy: Policy
    source: CredentialSource

    @property
    def base(self) -> URL:
        return self.connection.upstream


@dataclass(frozen=True, slots=True)
class Minted:
    """A signed capability and its claims; the token is a bearer secret (never in repr)."""

    token: str = field(repr=False)
    claims: CapabilityClaims


@dataclass(frozen=True, slots=True)
class Redemption:
    """What a won redemption hands the runtime (DESIGN §6 ``/v1/capabilities/redeem``)."""

    minted: Minted
    epoch: int
    generation: int
    checkpoint_id: str
    case_id: str
    action: ActionRow | None


class RecoveryService:
    """Drives cases through the machine; the API and the proxy both call it."""

    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        bindings: Mapping[str, Binding],
        http: aiohttp.ClientSession,
        *,
        fences: FenceCache | None = None,
        reconciler: Reconciler | None = None,
        connect: ConnectFlow | None = None,
        notifier: Notifier | None = None,
        reconnect_url: str | None = None,
        public_url: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.issuer = CapabilityIssuer(keyring)
        self.verifier = CapabilityVerifier(keyring)
        self.bindings = bindings
        self.http = http
        self.fences = fences or FenceCache(store)
        self.reconciler = reconciler or Reconciler()
        self.connect = connect or ConnectFlow()
        self.notifier: Notifier = notifier or NullNotifier()
        self.reconnect_url = reconnect_url
        """``{connection_id}`` template of the page a human opens to reconnect."""
        self.public_url = public_url
        """Where a human's browser reaches this sidecar (config ``public_url``), if set."""
        self.pending: set[asyncio.Task[None]] = set()
        self.metrics = metrics or Metrics()

    def binding(self, connection_id: str) -> Binding:
        found = self.bindings.get(connection_id)
        if found is None:
            raise NotFound(f"no connection named {connection_id!r} is configured")
        return found

    def jwks(self) -> dict[str, Any]:
        return self.keyring.jwks()

    # -- run capabilities -----------------------------------------------------------------

    async def mint_run_capability(
        self,
        run_id: str,
        connection_id: str,
        checkpoint_id: str,
        epoch: int,
        workflow: str | None = None,
    ) -> Minted:
        """Mint for the epoch the runtime holds (DESIGN §4 mint rules, enforced by the store).

        Raises:
            NotFound: unknown connection. Fenced: epoch not current.
            RecoveryRequired: the run has a case that is not yet resumed.
        """
        self.binding(connection_id)
        await self.store.mint_check(run_id, epoch, workflow)
        conn = await self.store.ensure_connection(connection_id)
        token, claims = self.issuer.mint_run(
            run_id, connection_id, conn.generation, epoch, checkpoint_id
        )
        return Minted(token, claims)

    async def renew(self, token: str) -> Minted:
        """Same claims, a new expiry; refused once the run or the grant moved on."""
        claims = self.verifier.verify(token, typ="run")
        await self.store.check_fence(
            claims.run_id, claims.epoch, claims.connection_id, claims.generation
        )
        fresh, new_claims = self.issuer.mint_run(
            claims.run_id, claims.connection_id, claims.generation, claims.epoch,
            claims.checkpoint_id,
        )
        return Minted(fresh, new_claims)

    # -- cases ------------------------------------------------------------------------------

    async def open_case(self, draft: CaseDraft) -> CaseRow:
        """Record a dead grant against the run that met it (one case per run/conn/gen)."""
        case, created = await self.store.open_case(draft)
        self.fences.forget_connection(draft.connection_id)
        if created:
            self.metrics.cases_opened[case.connection_id] += 1
            log.warning(
                "recovery case %s opened: run %s, connection %s, generation %s, code %s",
                case.case_id, case.run_id, case.connection_id, case.generation,
                case.provider_code, extra={"case_id": case.case_id, "run_id": case.run_id},
            )
            self.background(self._announce_opened(case))
        return case

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Notifications never hold up the worker's answer; shutdown drains them."""
        task = asyncio.create_task(work)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def drain(self) -> None:
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)

    async def _announce_opened(self, case: CaseRow) -> None:
        if isinstance(self.notifier, NullNotifier):
            return
        url = self.reconnect_url.format(connection_id=case.connection_id) if self.reconnect_url else None
        notice = CaseNotice.for_case("case.opened", case, reconnect_url=url)
        delivered = await self.notifier.notify(notice)
        if delivered:
            try:
                await self.move(case, CaseEvent.NOTIFIED, "notifier", {"reconnect_url": url})
            except (ConflictError, TransitionNotAllowed):
                pass  # the reconnect came first: nothing left to announce

    async def _announce_ready(self, case: CaseRow) -> None:
        """Hand the runtime a recovery capability so the same run can resume."""
        if isinstance(self.notifier, NullNotifier):
            return
        try:
            minted = await self.issue_recovery_capability(case.case_id, "notifier")
        except (BadRequest, NotFound):
            return  # moved on (abandoned, redeemed) before we got here
        await self.notifier.notify(
            CaseNotice.for_case("case.ready", case, capability=minted.token, outcome=case.outcome)
        )

    async def move(
        self, case: CaseRow, event: CaseEvent, actor: str, evidence: Mapping[str, Any],
        **fields: Any,
    ) -> CaseRow:
        """One case change: compare-and-set on ``case.state`` plus its transition row."""
        target = next_state(case.state, event)
        moved = await self.store.transition(
            case.case_id, case.state, target.value, actor, dict(evidence), **fields
        )
        log.info(
            "case %s: %s -> %s (%s)", case.case_id, case.state, moved.state, actor,
            extra={"case_id": case.case_id, "run_id": case.run_id},
        )
        return moved

    async def run_status(self, run_id: str) -> tuple[RunRow, list[CaseRow]]:
        run = await self.store.get_run(run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r}")
        return run, await self.store.list_cases(run_id=run_id, open_only=True)

    async def list_cases(
        self, state: str | None = None, connection_id: str | None = None, run_id: str | None = None
    ) -> list[CaseRow]:
        return await self.store.list_cases(state=state, connection_id=connection_id, run_id=run_id)

    async def get_case(self, case_id: str) -> tuple[CaseRow, list[TransitionRow], list[ActionRow]]:
        case = await self._case(case_id)
        return case, await self.store.transitions(case_id), await self.store.list_actions(case.run_id)

    async def _case(self, case_id: str) -> CaseRow:
        case = await self.store.get_case(case_id)
        if case is None:
            raise NotFound(f"no case {case_id!r}")
        return case

    async def abandon(self, case_id: str, actor: str, reason: str) -> CaseRow:
        case = await self._case(case_id)
        if case.state in (CaseState.CLOSED, CaseState.ABANDONED):
            raise BadRequest(f"case {case_id} is already {case.state}")
        return await self.move(case, CaseEvent.ABANDONED, actor, {"reason": reason})

    # -- reconnect, probe, reconcile ----------------------------------------------------------

    async def reconnected(
        self, connection_id: str, actor: str, evidence: Mapping[str, Any] | None = None
    ) -> list[CaseRow]:
        """The identity layer holds a new grant: prove it, then advance every case of it.

        Raises:
            NotFound: unknown connection. RecoveryRequired: the new grant fails the probe
            as dead. UpstreamUnavailable: the probe could not be completed.
        """
        binding = self.binding(connection_id)
        probe = await self._probe(binding)  # before anything changes: a failed probe changes nothing
        conn = await self.store.ensure_connection(connection_id)
        try:  # a new grant is a new generation: whoever holds the old one is fenced
            conn = await self.store.record_reconnect(connection_id, conn.generation)
        except ConflictError:  # another sidecar recorded the same reconnect first
            conn = await self.store.ensure_connection(connection_id)
        self.fences.forget_connection(connection_id)
        advanced: list[CaseRow] = []
        proof = {**(evidence or {}), "generation": conn.generation, "probe": probe}
        for case in await self.store.list_cases(connection_id=connection_id, open_only=True):
            if case.state in _ADVANCE_ON_RECONNECT:
                try:
                    case = await self.move(case, CaseEvent.RECONNECTED, actor, proof)
                except ConflictError:
                    continue  # advanced concurrently
            if case.state == CaseState.RECONNECTED:
                case = await self._reconcile_case(binding, case)
                advanced.append(case)
                self.background(self._announce_ready(case))
        return advanced

    async def _probe(self, binding: Binding) -> dict[str, Any]:
        """Lease the new grant and make the policy's cheap authenticated request."""
        spec = binding.policy.probe
        try:
            lease = await binding.source.lease()
            if spec is None:
                return {"skipped": "the policy has no probe", "leased": True}
            url = binding.base.join(URL(spec.path.lstrip("/")))
            for attempt in range(2):
                headers = {"Authorization": f"Bearer {lease.access_token}"}
                async with self.http.request(spec.method, url, headers=headers) as resp:
                    status = resp.status
                if status == 401 and attempt == 0:
                    lease = await binding.source.refresh(lease)
                    continue
                break
        except CredentialError as exc:
            if exc.failure_class == "dead_grant":
                raise RecoveryRequired(
                    "the reported reconnect did not produce a working grant",
                    provider_code=exc.provider_code,
                ) from None
            raise UpstreamUnavailable(f"the probe could not lease: {exc}") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"the probe failed: {type(exc).__name__}") from None
        if status not in spec.expect_status:
            raise UpstreamUnavailable(f"the probe answered {status}", upstream_status=status)
        return {"method": spec.method, "path": spec.path, "status": status}

    async def _reconcile_case(self, binding: Binding, case: CaseRow) -> CaseRow:
        """Settle the failed action's outcome (DESIGN §8 ``ready``) and move the case on."""
        action = (
            await self.store.get_action(case.idempotency_key) if case.idempotency_key else None
        )
        evidence: dict[str, Any] = {}
        if action is not None and action.state == "unknown":
            settled = await self.reconcile_action(binding, action, closing.request_of(case))
            action = settled or action
            evidence["reconcile"] = "committed" if settled and settled.state == "committed" else (
                "not_committed" if settled else "undetermined"
            )
        outcome = _outcome(action)
        evidence["outcome"] = outcome
        return await self.move(case, CaseEvent.RECONCILED, "reconciler", evidence, outcome=outcome)

    async def reconcile_action(
        self, binding: Binding, action: ActionRow, request: tuple[str, str] | None
    ) -> ActionRow | None:
        """Ask the provider whether an ``unknown`` action took effect; settle it if it knows.

        Returns the settled row, or None when the policy has no reconcile for it or the
        provider could not tell. Raises the source's CredentialError (e.g. DeadGrant).
        """
        if request is None:
            return None
        rule = binding.policy.reconcile_for(*request)
        if rule is None:
            return None
        result = await self.reconciler.lookup(
            rule, binding.base, binding.source, self.http, action.idempotency_key
        )
        if result.outcome == "undetermined":
            return None
        status = rule.committed_status if result.outcome == "committed" else None
        try:
            settled = await self.store.settle(
                action.idempotency_key, result.outcome, dict(result.evidence), status=status
            )
        except ConflictError:
            return await self.store.get_action(action.idempotency_key)
        await closing.close_if_committed(self, settled)
        return settled

    async def settle_action(
        self, idempotency_key: str, outcome: Literal["committed", "not_committed"],
        evidence: Mapping[str, Any],
    ) -> ActionRow:
        """A worker's own reconcile answer for an ``unknown`` action."""
        settled = await self.store.settle(idempotency_key, outcome, dict(evidence))
        await closing.close_if_committed(self, settled)
        return settled

    async def close_settled_cases(self) -> int:
        """Close the ``resumed`` cases a crash left open (start-up; see ``closing``)."""
        return await closing.close_settled_cases(self)

    async def action_committed(self, case_id: str, idempotency_key: str) -> None:
        """The resumed run committed the failed action: close its case (see ``closing``)."""
        await closing.action_committed(self, case_id, idempotency_key)

    # -- the built-in oauth2 reconnect ----------------------------------------------------------

    def _oauth2(self, connection_id: str) -> tuple[OAuth2Source, OAuth2SourceConfig]:
        binding = self.binding(connection_id)
        source, config = binding.source, binding.connection.source
        if not isinstance(source, OAuth2Source) or not isinstance(config, OAuth2SourceConfig):
            raise BadRequest(f"connection {connection_id!r} does not use the built-in oauth2 source")
        return source, config

    async def begin_connect(self, connection_id: str, redirect_uri: str) -> str:
        """Start the authorization-code flow; returns the provider URL to send the human to.

        The callback is the connection's configured ``redirect_uri`` (the one registered with
        the provider), else the callback under ``public_url``, else ``redirect_uri``: the
        callback on the address the request arrived at.
        """
        _, config = self._oauth2(connection_id)
        if config.redirect_uri is None and self.public_url is not None:
            base = self.public_url.rstrip("/")
            redirect_uri = f"{base}/v1/connections/{connection_id}/callback"
        return self.connect.begin(connection_id, config, config.redirect_uri or redirect_uri)

    async def complete_connect(
        self, connection_id: str, params: Mapping[str, str]
    ) -> list[CaseRow]:
        """The callback: exchange the code, store the grant encrypted, advance the cases."""
        source, config = self._oauth2(connection_id)
        secret = (
            await read_secret_file(config.client_secret_file, "client secret")
            if config.client_secret_file
            else None
        )
        result = await self.connect.complete(connection_id, params, self.http, secret)
        await source.install_grant(
            result.refresh_token, result.scope, result.access_token, result.expires_in
        )
        return await self.reconnected(connection_id, "oauth2-callback", {"flow": "authorization_code"})

    # -- identity-layer webhooks and grants at risk: revive.recovery.risk -------------------------

    async def nango_webhook(self, body: bytes, headers: Mapping[str, str]) -> risk.WebhookOutcome:
        """Nango's signed webhook: reconnect, or mark at risk (the rules are in ``risk``)."""
        return await risk.nango_webhook(self, body, headers)

    async def connections_at_risk(self) -> list[risk.AtRisk]:
        """The store's at-risk marks merged with each source's own report."""
        return await risk.connections_at_risk(self)

    # -- recovery capabilities --------------------------------------------------------------------

    async def issue_recovery_capability(self, case_id: str, actor: str) -> Minted:
        """A single-use capability bound to (case, run, checkpoint, new generation, next epoch)."""
        case = await self._case(case_id)
        if case.state != CaseState.READY:
            raise BadRequest(f"case {case_id} is {case.state}, not ready")
        run = await self.store.get_run(case.run_id)
        conn = await self.store.get_connection(case.connection_id)
        if run is None or conn is None:
            raise NotFound(f"case {case_id} names a run or connection the store does not know")
        token, claims = self.issuer.mint_recovery(
            case.run_id, case.connection_id, conn.generation, run.epoch + 1,
            case.checkpoint_id, case.case_id,
        )
        log.info(
            "recovery capability issued for case %s by %s", case_id, actor,
            extra={"case_id": case_id, "run_id": case.run_id},
        )
        return Minted(token, claims)

    async def redeem(self, token: str, actor: str = "worker") -> Redemption:
        """Burn a recovery capability, bump the run's epoch, hand back a run capability."""
        try:
            claims = self.verifier.verify(token, typ="recovery")
            assert claims.case_id is not None  # the verifier requires cid on recovery tokens
            conn = await self.store.get_connection(claims.connection_id)
            if conn is None or conn.generation != claims.generation:
                raise Fenced("the grant changed again after this capability was issued")
            result = await self.store.redeem(
                claims.jti, claims.exp, claims.case_id, claims.run_id, claims.epoch - 1, actor
            )
        except ProblemError as exc:
            self.metrics.redemptions[exc.type[11:]] += 1
            raise
        self.metrics.redemptions["ok"] += 1
        self.fences.forget_run(claims.run_id)
        case = result.case
        if result.action is not None and result.action.state == "committed":
            case = await self.move(
                case, CaseEvent.COMMITTED, "reconciler",
                {"reason": "found committed by reconcile; reported at redemption"},
            )
        elif result.action is None:
            # The grant died on a read: there is no side effect left to commit, and the
            # resumed run re-reads as it likes. Redemption is the end of the case.
            case = await self.move(
                case, CaseEvent.COMMITTED, "worker",
                {"reason": "no side effect was pending; the run resumed"},
            )
        run_token, run_claims = self.issuer.mint_run(
            claims.run_id, claims.connection_id, claims.generation, result.epoch,
            claims.checkpoint_id,
        )
        return Redemption(
            Minted(run_token, run_claims), result.epoch, claims.generation,
            claims.checkpoint_id, case.case_id, result.action,
        )


def _outcome(action: ActionRow | None) -> str:
    if action is None:
        return "none"
    return {"failed": "not_committed"}.get(action.state, action.state)
