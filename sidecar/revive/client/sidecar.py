"""The worker routes of the sidecar's ``/v1`` API, over HTTP, for the worker library.

Only what a worker calls: mint, renew and redeem capabilities, settle an action. The answers
are modelled here (tolerant of fields added later) rather than imported from the sidecar, so
a worker needs neither the server nor its dependencies.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict

from revive.client.errors import PROBLEM_CONTENT_TYPE, SidecarProblem, problem_error

__all__ = ["ActionOutcome", "Redeemed", "RunCapability", "SidecarClient", "SettledAction"]

Outcome = Literal["committed", "not_committed", "failed", "unknown"]


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class RunCapability(_Answer):
    """A run capability as ``POST /v1/runs/{run_id}/capabilities`` and renew answer it.

    Attributes:
        capability: the compact JWT to send as ``Authorization: Bearer`` to the proxy.
        expires_at: its ``exp`` in unix seconds.
    """

    capability: str
    expires_at: int
    run_id: str
    connection_id: str
    epoch: int
    generation: int
    checkpoint_id: str


class ActionOutcome(_Answer):
    """Where the case's failed action stands at redemption."""

    action_key: str
    idempotency_key: str
    outcome: Outcome


class Redeemed(_Answer):
    """A redeemed recovery capability: the run's new capability, epoch and action outcome."""

    capability: str
    expires_at: int
    run_id: str
    epoch: int
    generation: int
    checkpoint_id: str
    case_id: str
    action: ActionOutcome | None = None


class SettledAction(_Answer):
    """The ledger row after ``POST /v1/actions/{key}/outcome`` (never the stored answer)."""

    idempotency_key: str
    state: str
    action_key: str
    run_id: str


_A = TypeVar("_A", bound=_Answer)


class SidecarClient:
    """The sidecar's worker routes over an aiohttp session the caller owns.

    Args:
        base_url: the sidecar, e.g. ``http://127.0.0.1:8787`` (no trailing path).
        http: the session to send with; it is not closed by this object.

    Every method raises :class:`revive.client.SidecarProblem` (or its typed subclass, such
    as :class:`revive.client.RecoveryRequired` or :class:`revive.client.Fenced`) when the
    sidecar answers an error, and ``aiohttp.ClientError`` when it cannot be reached.
    """

    def __init__(self, base_url: str, http: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http

    async def mint(
        self, run_id: str, *, connection_id: str, checkpoint_id: str, epoch: int,
        workflow: str | None = None,
    ) -> RunCapability:
        """``POST /v1/runs/{run_id}/capabilities``: a run capability for the held epoch.

        Args:
            run_id: the runtime's logical execution id.
            connection_id: the connection the capability is for.
            checkpoint_id: the checkpoint the run stands at.
            epoch: the epoch the runtime holds (1 creates the run).
            workflow: the runtime's workflow name, kept for operators.

        Returns:
            the run capability.

        Raises:
            RecoveryRequired: the run has an open case (424).
            Fenced: ``epoch`` is not the run's current epoch (409).
            SidecarProblem: any other refusal (e.g. 404 unknown connection).
        """
        body: dict[str, Any] = {
            "connection_id": connection_id, "checkpoint_id": checkpoint_id, "epoch": epoch,
        }
        if workflow is not None:
            body["workflow"] = workflow
        return await self._post(f"/v1/runs/{quote(run_id, safe='')}/capabilities", body,
                                RunCapability)

    async def renew(self, capability: str) -> RunCapability:
        """``POST /v1/capabilities/renew``: the same claims with a new expiry.

        Args:
            capability: a run capability that still verifies.

        Returns:
            the renewed capability.

        Raises:
            Fenced: the run or connection moved past it (409).
            CapabilityInvalid: expired, forged or not a run capability (401).
        """
        return await self._post("/v1/capabilities/renew", {"capability": capability},
                                RunCapability)

    async def redeem(self, recovery_capability: str) -> Redeemed:
        """``POST /v1/capabilities/redeem``: burn a recovery capability, bump the epoch.

        Args:
            recovery_capability: the single-use capability issued for a ``ready`` case.

        Returns:
            the new run capability, epoch, generation, checkpoint and the action's outcome.

        Raises:
            CapabilityInvalid: forged, expired, already redeemed or its case is not ready.
            Fenced: the run or connection moved past what the capability names.
        """
        return await self._post("/v1/capabilities/redeem", {"capability": recovery_capability},
                                Redeemed)

    async def settle(
        self, idempotency_key: str, outcome: Literal["committed", "not_committed"],
        evidence: dict[str, Any] | None = None,
    ) -> SettledAction:
        """``POST /v1/actions/{idempotency_key}/outcome``: settle an ``unknown`` action.

        Args:
            idempotency_key: the action's ledger key.
            outcome: what the worker's reconcile found.
            evidence: redacted proof, kept in the incident record.

        Returns:
            the settled ledger row.

        Raises:
            SidecarProblem: 400 when the action is no longer ``unknown``; 404 when unknown key.
        """
        return await self._post(
            f"/v1/actions/{quote(idempotency_key, safe='')}/outcome",
            {"outcome": outcome, "evidence": evidence or {}}, SettledAction,
        )

    async def _post(self, path: str, body: dict[str, Any], model: type[_A]) -> _A:
        async with self.http.post(self.base_url + path, json=body) as resp:
            if resp.status >= 400:
                raise await read_problem(resp)
            return model.model_validate(await resp.json())


async def read_problem(resp: aiohttp.ClientResponse) -> SidecarProblem:
    """The typed exception for an error answer (read and parsed; the body is consumed).

    Args:
        resp: an answer with a 4xx/5xx status.

    Returns:
        the exception to raise.
    """
    raw = await resp.read()
    body: Any
    try:
        body = await resp.json(content_type=None) if raw else {}
    except ValueError:
        body = {"detail": raw[:500].decode("utf-8", "replace")}
    return problem_error(resp.status, body)


def is_problem(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` is RFC 9457 ``application/problem+json``."""
    return (content_type or "").split(";", 1)[0].strip().lower() == PROBLEM_CONTENT_TYPE
