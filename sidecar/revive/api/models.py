"""The ``/v1`` bodies as pydantic models: what a caller may send, what it is answered.

Requests forbid unknown fields (a typo is a 400 naming the field, not a silently ignored
option). Answers do not, in their schema: a client must tolerate fields added later. Answers
are built from store rows and capabilities by the ``from_*`` constructors here, so that what
leaves the sidecar is decided in one place: an action view never carries the stored
``response``, and a capability appears only where the route's purpose is to hand it out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from revive.api.service import AtRisk, Minted, Redemption, WebhookOutcome
from revive.recovery.machine import CaseState
from revive.store.models import ActionRow, CaseRow, RunRow, TransitionRow

__all__ = [
    "AbandonRequest",
    "ActionOutcome",
    "ActionView",
    "AtRiskList",
    "AtRiskView",
    "CapabilityRequest",
    "CaseDetail",
    "CaseList",
    "CaseQuery",
    "CaseSummary",
    "IssueCapabilityRequest",
    "MintRunCapabilityRequest",
    "NangoWebhookAnswer",
    "NangoWebhookBody",
    "NangoWebhookError",
    "ReconnectedAnswer",
    "ReconnectedRequest",
    "RecoveryCapability",
    "Redeemed",
    "RunCapability",
    "RunStatus",
    "SettleOutcomeRequest",
    "TransitionView",
]

_ID = Field(min_length=1, max_length=1024)
_TOKEN = Field(min_length=1, max_length=8192, description="A capability (compact JWT).")
_EXPIRES = Field(description="When the capability expires, in unix seconds (its `exp`).")
_INT64_MAX = 2**63 - 1  # the stores keep epochs in signed 64-bit columns


def _integral_float(value: object) -> object:
    # The document says "integer", and JSON Schema counts 1.0 as one; strict pydantic does
    # not. Take an integral float, and keep refusing "1" and true as strict mode does.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Integer = Annotated[int, BeforeValidator(_integral_float)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- requests ---------------------------------------------------------------------------------


class MintRunCapabilityRequest(_Request):
    """Ask for a run capability for the epoch the runtime holds (DESIGN §4)."""

    connection_id: str = _ID
    checkpoint_id: str = _ID
    epoch: _Integer = Field(
        ge=1, le=_INT64_MAX, strict=True, description="The run's epoch; 1 creates the run."
    )
    workflow: str | None = Field(default=None, max_length=1024)


class CapabilityRequest(_Request):
    """A capability to renew (a run capability) or redeem (a recovery capability)."""

    capability: str = _TOKEN


class SettleOutcomeRequest(_Request):
    """The worker's reconcile callback: what became of an ``unknown`` action."""

    outcome: Literal["committed", "not_committed"]
    evidence: dict[str, Any] = Field(default_factory=dict)


class ReconnectedRequest(_Request):
    """The identity layer holds a new grant for the connection."""

    actor: str = Field(default="operator", min_length=1, max_length=200)
    evidence: dict[str, Any] = Field(default_factory=dict)


class IssueCapabilityRequest(_Request):
    """Issue a recovery capability for a ``ready`` case."""

    actor: str = Field(default="operator", min_length=1, max_length=200)


class AbandonRequest(_Request):
    """Give up on a case."""

    reason: str = Field(min_length=1, max_length=2000)
    actor: str = Field(default="operator", min_length=1, max_length=200)


class NangoWebhookError(BaseModel):
    """``error`` of a failed ``auth`` webhook."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str | None = None
    description: str | None = None


class NangoWebhookBody(BaseModel):
    """A webhook as Nango sends it (https://nango.dev/docs/guides/platform/webhooks-from-nango).

    Documents the route only: the handler reads the raw bytes, because the signature covers
    them exactly, and verifies it before reading anything. Unknown fields are allowed (Nango
    adds them); only ``auth`` webhooks are acted on.
    """

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    type: str = Field(description="`auth` is handled; `sync`, `forward`... are acknowledged.")
    connection_id: str | None = Field(default=None, alias="connectionId")
    provider_config_key: str | None = Field(default=None, alias="providerConfigKey")
    operation: str | None = Field(default=None, description="creation, override or refresh")
    success: bool | None = None
    error: NangoWebhookError | None = None


class CaseQuery(_Request):
    """The query string of ``GET /v1/cases``; every filter is optional."""

    state: CaseState | None = None
    connection_id: str | None = Field(default=None, min_length=1, max_length=1024)
    run_id: str | None = Field(default=None, min_length=1, max_length=1024)


# -- answers ----------------------------------------------------------------------------------


class RunCapability(_Answer):
    """A run capability: pass it as ``Authorization: Bearer`` on every proxied request."""

    capability: str = _TOKEN
    expires_at: int = _EXPIRES
    run_id: str
    connection_id: str
    epoch: int
    generation: int
    checkpoint_id: str

    @classmethod
    def from_minted(cls, minted: Minted) -> RunCapability:
        c = minted.claims
        return cls(
            capability=minted.token, expires_at=c.exp, run_id=c.run_id,
            connection_id=c.connection_id, epoch=c.epoch, generation=c.generation,
            checkpoint_id=c.checkpoint_id,
        )


ActionOutcomeValue = Literal["committed", "not_committed", "failed", "unknown"]


class ActionOutcome(_Answer):
    """Where the failed action stands, told to the resumed run.

    ``unknown`` means the worker must settle it (``POST /v1/actions/{key}/outcome``) before
    anything re-executes it; ``committed`` and ``failed`` are replayed if re-sent.
    """

    action_key: str
    idempotency_key: str
    outcome: ActionOutcomeValue

    @classmethod
    def from_row(cls, row: ActionRow) -> ActionOutcome:
        # A row still ``in_flight`` at redemption has no known outcome for the worker.
        outcome: ActionOutcomeValue = "unknown" if row.state == "in_flight" else row.state
        return cls(action_key=row.action_key, idempotency_key=row.idempotency_key,
                   outcome=outcome)


class Redeemed(_Answer):
    """A redeemed recovery capability: the run's new run capability and where to resume."""

    capability: str = _TOKEN
    expires_at: int = _EXPIRES
    run_id: str
    epoch: int
    generation: int
    checkpoint_id: str
    case_id: str
    action: ActionOutcome | None

    @classmethod
    def from_redemption(cls, r: Redemption) -> Redeemed:
        return cls(
            capability=r.minted.token, expires_at=r.minted.claims.exp,
            run_id=r.minted.claims.run_id, epoch=r.epoch, generation=r.generation,
            checkpoint_id=r.checkpoint_id, case_id=r.case_id,
            action=ActionOutcome.from_row(r.action) if r.action is not None else None,
        )


class RecoveryCapability(_Answer):
    """A single-use recovery capability; the runtime redeems it to resume the run."""

    capability: str = _TOKEN
    expires_at: int = _EXPIRES
    case_id: str
    run_id: str
    epoch: int = Field(description="The epoch redemption will install.")
    generation: int
    checkpoint_id: str

    @classmethod
    def from_minted(cls, minted: Minted, case_id: str) -> RecoveryCapability:
        c = minted.claims
        return cls(
            capability=minted.token, expires_at=c.exp, case_id=c.case_id or case_id,
            run_id=c.run_id, epoch=c.epoch, generation=c.generation,
            checkpoint_id=c.checkpoint_id,
        )


class ActionView(_Answer):
    """One ledger row as operators and workers see it: never the stored ``response``."""

    idempotency_key: str
    run_id: str
    action_key: str
    checkpoint_id: str
    connection_id: str
    state: Literal["in_flight", "committed", "failed", "not_committed", "unknown"]
    attempts: int
    status: int | None
    case_id: str | None
    owner: str
    evidence: dict[str, Any] | None
    updated_at: float

    @classmethod
    def from_row(cls, row: ActionRow) -> ActionView:
        return cls(
            idempotency_key=row.idempotency_key, run_id=row.run_id, action_key=row.action_key,
            checkpoint_id=row.checkpoint_id, connection_id=row.connection_id, state=row.state,
            attempts=row.attempts, status=row.status, case_id=row.case_id, owner=row.owner,
            evidence=dict(row.evidence) if row.evidence is not None else None,
            updated_at=row.updated_at,
        )


class CaseSummary(_Answer):
    """A recovery case in a list: identity, state and where the run stood."""

    case_id: str
    run_id: str
    connection_id: str
    state: str
    version: int
    generation: int
    epoch: int
    checkpoint_id: str
    action_key: str
    idempotency_key: str | None
    failure_class: str
    provider_code: str | None
    outcome: str | None
    workflow: str | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: CaseRow) -> CaseSummary:
        return cls(**_summary_fields(row))


def _summary_fields(row: CaseRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in CaseSummary.model_fields}


class TransitionView(_Answer):
    """One line of the incident record."""

    seq: int
    from_state: str | None
    to_state: str
    at: float
    actor: str
    evidence: dict[str, Any]

    @classmethod
    def from_row(cls, row: TransitionRow) -> TransitionView:
        return cls(seq=row.seq, from_state=row.from_state, to_state=row.to_state, at=row.at,
                   actor=row.actor, evidence=dict(row.evidence))


class CaseDetail(CaseSummary):
    """A case with its redacted provider answer, its incident record and its run's actions."""

    provider_message: str | None
    evidence: dict[str, Any]
    transitions: list[TransitionView]
    actions: list[ActionView]

    @classmethod
    def from_rows(
        cls, case: CaseRow, transitions: list[TransitionRow], actions: list[ActionRow]
    ) -> CaseDetail:
        return cls(
            **_summary_fields(case),
            provider_message=case.provider_message,
            evidence=dict(case.evidence),
            transitions=[TransitionView.from_row(t) for t in transitions],
            actions=[ActionView.from_row(a) for a in actions],
        )


class RunStatus(_Answer):
    """A run's current epoch and the cases that still block it."""

    run_id: str
    epoch: int
    workflow: str | None
    open_cases: list[CaseSummary]

    @classmethod
    def from_rows(cls, run: RunRow, cases: list[CaseRow]) -> RunStatus:
        return cls(run_id=run.run_id, epoch=run.epoch, workflow=run.workflow,
                   open_cases=[CaseSummary.from_row(c) for c in cases])


class CaseList(_Answer):
    """The cases matching ``GET /v1/cases``'s filters."""

    cases: list[CaseSummary]


class NangoWebhookAnswer(_Answer):
    """What a webhook did; Nango only looks at the status (2xx: delivered, do not retry)."""

    handled: bool
    type: str | None = Field(description="Nango's webhook type, as received (bounded).")
    action: Literal["ignored", "reconnected", "cleared", "at_risk"]
    connections: list[str] = Field(description="The Revive connections it applied to.")
    advanced: list[CaseSummary]
    note: str

    @classmethod
    def from_outcome(cls, outcome: WebhookOutcome) -> NangoWebhookAnswer:
        return cls(
            handled=outcome.handled, type=outcome.webhook_type, action=outcome.action,
            connections=list(outcome.connections),
            advanced=[CaseSummary.from_row(c) for c in outcome.advanced], note=outcome.note,
        )


class AtRiskView(_Answer):
    """A connection whose grant works today but is expected to die: reconnect it first."""

    connection_id: str
    reason: str = Field(description="identity-layer-auth-failed, idle-grant-expiring, ...")
    detail: str
    expires_at: float | None = Field(description="When the grant is expected to die, if known.")
    since: float | None = Field(description="When the durable mark was made (store only).")
    origin: Literal["store", "source"]

    @classmethod
    def from_risk(cls, risk: AtRisk) -> AtRiskView:
        return cls(
            connection_id=risk.connection_id, reason=risk.reason, detail=risk.detail,
            expires_at=risk.expires_at, since=risk.since, origin=risk.origin,
        )


class AtRiskList(_Answer):
    """Every connection at risk, one entry per (connection, reason)."""

    connections: list[AtRiskView]


class ReconnectedAnswer(_Answer):
    """The cases one reconnect advanced."""

    connection_id: str
    advanced: list[CaseSummary]
