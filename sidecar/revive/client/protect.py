"""``protect_action``: one side effect of a run, executed at most once across dead grants.

The Python form of the TypeScript contract ::

    protectAction({runId, checkpointId, connectionId, actionKey,
                   execute({credential, idempotencyKey}), reconcile({idempotencyKey})})

except that the worker holds no credential: ``execute`` talks to the provider through the
sidecar's proxy with clients bound to a run capability (:class:`ActionContext`).

    result = await protect_action(
        sidecar_url="http://127.0.0.1:8787", run_id=workflow_id, checkpoint_id="send",
        connection_id="conn_microsoft_ops", action_key="send-briefing", epoch=state.epoch,
        execute=lambda ctx: send_mail(ctx.session), reconcile=sent_items_has_it,
        recovery_capability=state.pop_recovery_capability(),
    )
    state.epoch = result.epoch        # keep it in the runtime's durable state
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp

from revive.client.errors import ReconcileRequired, ReviveClientError, SidecarProblem
from revive.client.session import ActionContext, CapabilityHolder
from revive.client.sidecar import ActionOutcome, SidecarClient

__all__ = ["ActionResult", "derive_idempotency_key", "protect_action"]

T = TypeVar("T")

_CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass(frozen=True, slots=True)
class ActionResult(Generic[T]):
    """What :func:`protect_action` did.

    Attributes:
        value: what ``execute`` returned; ``None`` when it was skipped.
        epoch: the run's epoch after the action. Store it in the runtime's durable state
            (workflow state, graph state) and pass it next time: after a redemption it is the
            new epoch, and the old one is fenced.
        skipped: ``execute`` was not called (or its retry was not needed), because the side
            effect already exists (committed in the ledger, or found by ``reconcile``).
        replayed: the side effect had happened before this call: the ledger said committed,
            ``reconcile`` found it, or the sidecar answered ``Revive-Replayed: true``.
        idempotency_key: the action's ledger key.
    """

    value: T | None
    epoch: int
    skipped: bool
    replayed: bool
    idempotency_key: str


def derive_idempotency_key(run_id: str, action_key: str) -> str:
    """The action's idempotency key: ``"ik_"`` + the first 40 hex digits of
    ``sha256(run_id + "\\0" + action_key)`` (UTF-8).

    It depends only on the run and the action, so every retry and every resume of the same
    action of the same run carries the same key; it is also exactly what the sidecar derives
    itself when a request carries no ``Idempotency-Key`` (DESIGN §6).

    Args:
        run_id: the runtime's logical execution id.
        action_key: the action's stable name within the run.

    Returns:
        the key, e.g. ``ik_3f9c...`` (43 characters).
    """
    digest = hashlib.sha256(f"{run_id}\x00{action_key}".encode()).hexdigest()
    return f"ik_{digest[:40]}"


async def protect_action(
    *,
    sidecar_url: str,
    run_id: str,
    checkpoint_id: str,
    connection_id: str,
    action_key: str,
    execute: Callable[[ActionContext], Awaitable[T]],
    reconcile: Callable[[ActionContext], Awaitable[bool]] | None = None,
    epoch: int = 1,
    recovery_capability: str | None = None,
    workflow: str | None = None,
    http: aiohttp.ClientSession | None = None,
    idempotency_key: str | None = None,
) -> ActionResult[T]:
    """Run one side effect of a run through the sidecar, at most once across dead grants.

    Without ``recovery_capability``: mints a run capability for ``epoch`` and calls
    ``execute(ctx)``. With it (the run resumes after a reconnect): redeems it, which bumps the
    run's epoch, then looks at the failed action's outcome as the sidecar recorded it —

    - ``committed``: ``execute`` is not called; the result is ``skipped`` and ``replayed``;
    - ``unknown``: ``reconcile(ctx)`` says whether the side effect exists; the answer is
      settled with the sidecar (``POST /v1/actions/{key}/outcome``) and ``execute`` runs
      only when it does not exist (without ``reconcile`` the sidecar's policy decides, or
      :class:`ReconcileRequired` is raised);
    - ``not_committed``, ``failed`` or no action: ``execute`` runs with the same idempotency
      key under the new epoch's capability (a ``failed`` action's answer is replayed).

    If a request inside ``execute`` meets 409 ``reconcile-required`` (an earlier attempt's
    outcome is unknown), ``reconcile`` is asked, the outcome settled, and ``execute`` is
    retried once unless the side effect exists.

    Args:
        sidecar_url: the sidecar, e.g. ``http://127.0.0.1:8787``.
        run_id: the runtime's logical execution id (Temporal workflow id, LangGraph thread id).
        checkpoint_id: the runtime's checkpoint this action runs at (the run resumes there).
        connection_id: the configured connection the action uses.
        action_key: the action's stable name within the run (e.g. ``"send-briefing"``).
        execute: ``async (ctx) -> value``: performs the side effect with ``ctx.session`` or
            ``ctx.httpx_client()``.
        reconcile: ``async (ctx) -> bool``: does the side effect (keyed by
            ``ctx.idempotency_key``) already exist at the provider?
        epoch: the run's epoch as the runtime holds it (1 for a new run).
        recovery_capability: the single-use capability issued for the run's ``ready`` case.
        workflow: the runtime's workflow name, recorded for operators.
        http: an aiohttp session to reuse for the sidecar (not closed here); one is created
            and closed otherwise.
        idempotency_key: an explicit key; by default :func:`derive_idempotency_key`. After a
            redemption the key the sidecar recorded for the action wins.

    Returns:
        the :class:`ActionResult`; keep ``result.epoch``.

    Raises:
        RecoveryRequired: the grant is dead — minting was refused because the run has an open
            case, or a request inside ``execute`` (or ``reconcile``) opened one. ``exc.case``
            names it; call again with its recovery capability once it is ``ready``.
        Fenced: ``epoch`` is stale (another worker resumed the run) or the sidecar fenced a
            request.
        ReconcileRequired: the outcome is unknown and no ``reconcile`` was given (or it stayed
            unknown after one retry).
        CapabilityInvalid: ``recovery_capability`` is forged, expired or already redeemed.
        SidecarProblem: any other refusal of the sidecar's worker routes.
        ReviveClientError: the recovery capability belongs to another run.
        Exception: whatever ``execute`` or ``reconcile`` raise, unchanged.
    """
    key = idempotency_key or derive_idempotency_key(run_id, action_key)
    own = http is None
    session = http if http is not None else aiohttp.ClientSession(timeout=_CONTROL_TIMEOUT)
    try:
        api = SidecarClient(sidecar_url, session)
        action: ActionOutcome | None = None
        if recovery_capability is not None:
            redeemed = await api.redeem(recovery_capability)
            if redeemed.run_id != run_id:
                raise ReviveClientError(
                    f"the recovery capability is for run {redeemed.run_id!r}, not {run_id!r}"
                )
            holder = CapabilityHolder.from_answer(
                api, redeemed, connection_id=connection_id, checkpoint_id=checkpoint_id,
                workflow=workflow,
            )
            action = redeemed.action
            if action is not None and (
                action.action_key == action_key or action.idempotency_key == key
            ):
                key = action.idempotency_key
            else:
                action = None  # the case was opened by another action of this run
        else:
            minted = await api.mint(run_id, connection_id=connection_id,
                                    checkpoint_id=checkpoint_id, epoch=epoch, workflow=workflow)
            holder = CapabilityHolder.from_answer(
                api, minted, connection_id=connection_id, checkpoint_id=checkpoint_id,
                workflow=workflow,
            )
        ctx = ActionContext.open(
            sidecar_url=sidecar_url, http=session, holder=holder, idempotency_key=key,
            action_key=action_key, checkpoint_id=checkpoint_id,
        )
        try:
            return await _protect(ctx, api, action, execute, reconcile)
        finally:
            await ctx.aclose()
    finally:
        if own:
            await session.close()


async def _protect(
    ctx: ActionContext,
    api: SidecarClient,
    action: ActionOutcome | None,
    execute: Callable[[ActionContext], Awaitable[T]],
    reconcile: Callable[[ActionContext], Awaitable[bool]] | None,
) -> ActionResult[T]:
    def skipped() -> ActionResult[T]:
        return ActionResult(None, ctx.epoch, True, True, ctx.idempotency_key)

    outcome = action.outcome if action is not None else None
    if outcome == "committed":
        return skipped()
    if outcome == "unknown" and reconcile is not None:
        if await _reconcile(ctx, api, reconcile):
            return skipped()
    try:
        value = await _guarded(ctx, execute)
    except ReconcileRequired:
        if reconcile is None:
            raise
        if await _reconcile(ctx, api, reconcile):
            return skipped()
        value = await _guarded(ctx, execute)  # once: the outcome is settled now
    return ActionResult(value, ctx.epoch, False, ctx.watch.replayed, ctx.idempotency_key)


async def _guarded(ctx: ActionContext, call: Callable[[ActionContext], Awaitable[Any]]) -> Any:
    """``call(ctx)``, raising the run-changing problem its requests met even if swallowed."""
    ctx.watch.reset()
    try:
        value = await call(ctx)
    except Exception as exc:
        seen = ctx.watch.first()
        if seen is not None and seen is not exc:
            raise seen from exc
        raise
    seen = ctx.watch.first()
    if seen is not None:
        raise seen
    return value


async def _reconcile(
    ctx: ActionContext, api: SidecarClient, reconcile: Callable[[ActionContext], Awaitable[bool]]
) -> bool:
    """Ask the worker's reconcile and settle the ledger; True when the side effect exists."""
    exists = bool(await _guarded(ctx, reconcile))
    try:
        await api.settle(
            ctx.idempotency_key, "committed" if exists else "not_committed",
            {"source": "worker reconcile", "action_key": ctx.action_key},
        )
    except SidecarProblem as exc:
        if exc.status != 400:
            raise
        # 400: no longer unknown (the sidecar's own reconcile settled it first). The ledger
        # stays the judge: a re-execution of a committed action is replayed, not re-sent.
    return exists
