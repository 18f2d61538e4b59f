"""Activity side: run one side effect through ``protect_action`` and speak Temporal errors.

A dead grant becomes a non-retryable ``ApplicationError`` of type ``ReviveRecoveryRequired``
carrying the case: retrying cannot help until a human reconnects, and the workflow helper
knows how to wait for that. Other problems keep Temporal's retry policy (an unknown outcome,
an action in flight elsewhere), except the terminal ones (stale epoch, refused capability).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from temporalio import activity
from temporalio.exceptions import ApplicationError

from revive.adapters.temporal._types import (
    CAPABILITY_INVALID,
    FENCED,
    RECOVERY_REQUIRED,
    ProtectedResult,
    ReviveRun,
)
from revive.client import (
    ActionContext,
    ActionResult,
    CapabilityInvalid,
    Fenced,
    RecoveryRequired,
    protect_action,
)

__all__ = ["protect_activity"]


async def protect_activity(
    run: ReviveRun,
    *,
    sidecar_url: str,
    connection_id: str,
    action_key: str,
    execute: Callable[[ActionContext], Awaitable[Any]],
    reconcile: Callable[[ActionContext], Awaitable[bool]] | None = None,
    http: aiohttp.ClientSession | None = None,
    idempotency_key: str | None = None,
) -> ProtectedResult:
    """Run ``execute`` as the protected action of a Temporal activity.

    Call it from an ``@activity.defn`` whose input dataclass carries ``run`` (built by
    :meth:`ReviveWorkflow.execute_activity`), and return its result::

        @activity.defn
        async def send_briefing(input: SendBriefingInput) -> ProtectedResult:
            return await protect_activity(
                input.revive, sidecar_url=SIDECAR, connection_id="conn_microsoft_ops",
                action_key="send-briefing", execute=lambda ctx: send(ctx.session, input.text),
            )

    Args:
        run: the run's coordinates, epoch and (on a re-run) recovery capability.
        sidecar_url: the sidecar, e.g. ``http://127.0.0.1:8787``.
        connection_id: the connection the action uses.
        action_key: the action's stable name within the run.
        execute: ``async (ctx) -> value``; the value must be JSON-able (it enters history).
        reconcile: ``async (ctx) -> bool``: does the side effect already exist?
        http: an aiohttp session to reuse for the sidecar (not closed here).
        idempotency_key: an explicit ledger key (default: derived from run and action).

    Returns:
        the value and the run's epoch after the action.

    Raises:
        ApplicationError: non-retryable, ``type`` ``ReviveRecoveryRequired`` (``details[0]``
            is the case), ``ReviveFenced`` or ``ReviveCapabilityInvalid``.
        Exception: anything else ``protect_action`` raises, for Temporal's retry policy.
    """
    workflow = activity.info().workflow_type if activity.in_activity() else None

    async def attempt(epoch: int, capability: str | None) -> ActionResult[Any]:
        return await protect_action(
            sidecar_url=sidecar_url, run_id=run.run_id, checkpoint_id=run.checkpoint_id,
            connection_id=connection_id, action_key=action_key, execute=execute,
            reconcile=reconcile, epoch=epoch, recovery_capability=capability,
            workflow=workflow, http=http, idempotency_key=idempotency_key,
        )

    try:
        try:
            result = await attempt(run.epoch, run.recovery_capability)
        except CapabilityInvalid as refused:
            if run.recovery_capability is None or not _is_retry():
                raise
            # An earlier attempt of this very activity redeemed the capability (it is single
            # use) and then failed; the run now stands at the next epoch, which this attempt
            # inherits. If that is not so, the sidecar refuses the mint and we report the
            # original refusal.
            try:
                result = await attempt(run.epoch + 1, None)
            except (Fenced, CapabilityInvalid):
                raise refused from None
    except RecoveryRequired as exc:
        raise ApplicationError(
            str(exc), exc.case.to_dict(), type=RECOVERY_REQUIRED, non_retryable=True
        ) from exc
    except Fenced as exc:
        raise ApplicationError(str(exc), type=FENCED, non_retryable=True) from exc
    except CapabilityInvalid as exc:
        raise ApplicationError(str(exc), type=CAPABILITY_INVALID, non_retryable=True) from exc
    return ProtectedResult(
        value=result.value, epoch=result.epoch, skipped=result.skipped,
        replayed=result.replayed, idempotency_key=result.idempotency_key,
    )


def _is_retry() -> bool:
    return activity.in_activity() and activity.info().attempt > 1
