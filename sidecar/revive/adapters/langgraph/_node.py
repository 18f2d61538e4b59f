"""A graph node whose side effect is protected: a dead grant interrupts the thread.

The run is the thread (``run_id`` = ``thread_id``), the checkpoint is the one the node runs
from, and the epoch lives in graph state under ``revive_epoch``, so the checkpointer keeps it
with everything else. A dead grant becomes ``interrupt(case)``; the application resumes the
thread with ``Command(resume={"revive_capability": ...})`` once the case is ready, and the
node, re-entered from its start as LangGraph always does, redeems it and carries on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypedDict, TypeVar

import aiohttp
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime
from langgraph.types import interrupt

from revive.client import (
    ActionContext,
    ActionResult,
    CapabilityInvalid,
    RecoveryRequired,
    protect_action,
)

__all__ = ["EPOCH_KEY", "RESUME_KEY", "ReviveState", "protect_node"]

EPOCH_KEY = "revive_epoch"
"""The graph-state key holding the run's epoch."""
RESUME_KEY = "revive_capability"
"""The key of the resume value carrying the recovery capability."""

S = TypeVar("S", bound=Mapping[str, Any])

Node = Callable[[S, RunnableConfig, Runtime[Any]], Awaitable[dict[str, Any]]]


class ReviveState(TypedDict, total=False):
    """Mix into the graph's state schema: the run's epoch (absent means 1)."""

    revive_epoch: int


def protect_node(
    action: Callable[[S, ActionContext], Awaitable[dict[str, Any] | None]],
    *,
    sidecar_url: str,
    connection_id: str,
    action_key: str,
    reconcile: Callable[[S, ActionContext], Awaitable[bool]] | None = None,
    committed: Callable[[S], dict[str, Any]] | None = None,
    workflow: str | None = None,
    http: aiohttp.ClientSession | None = None,
) -> Node[S]:
    """Wrap ``action`` into a node that runs it as one protected action of the thread.

    ::

        graph.add_node("send", protect_node(
            send_briefing, sidecar_url=SIDECAR, connection_id="conn_microsoft_ops",
            action_key="send-briefing",
        ))

    Args:
        action: ``async (state, ctx) -> update``: performs the side effect with
            ``ctx.session`` and returns the node's state update (or None).
        sidecar_url: the sidecar, e.g. ``http://127.0.0.1:8787``.
        connection_id: the connection the action uses.
        action_key: the action's stable name within the thread.
        reconcile: ``async (state, ctx) -> bool``: does the side effect already exist?
        committed: the update to return when the action turns out to be committed already
            and ``action`` is skipped (default: none besides the epoch).
        workflow: the graph's name, recorded for operators.
        http: an aiohttp session to reuse for the sidecar (not closed here).

    Returns:
        the node: ``async (state, config, runtime) -> update``; its update always sets
        ``revive_epoch`` to the run's epoch after the action.

    Raises:
        GraphInterrupt: (through ``interrupt``) the grant is dead; the interrupt's value is
            the case (``case_id``, ``provider_code``, ...).
        SidecarProblem: any other refusal of the sidecar, for the graph's retry policy.
    """

    async def node(state: S, config: RunnableConfig, runtime: Runtime[Any]) -> dict[str, Any]:
        run_id, checkpoint_id = _coordinates(config, runtime)
        epoch = int(state.get(EPOCH_KEY) or 1)

        async def execute(ctx: ActionContext) -> dict[str, Any] | None:
            return await action(state, ctx)

        async def settle(ctx: ActionContext) -> bool:
            assert reconcile is not None
            return await reconcile(state, ctx)

        capability: str | None = None
        case: dict[str, Any] | None = None
        # On resume LangGraph re-runs the node from the top: the first call meets the still
        # open case again (minting is refused, nothing executes) and ``interrupt`` then
        # returns the resume value instead of raising; later resumes line up the same way.
        while True:
            try:
                result: ActionResult[dict[str, Any] | None] = await protect_action(
                    sidecar_url=sidecar_url, run_id=run_id, checkpoint_id=checkpoint_id,
                    connection_id=connection_id, action_key=action_key, execute=execute,
                    reconcile=settle if reconcile is not None else None, epoch=epoch,
                    recovery_capability=capability, workflow=workflow, http=http,
                )
                break
            except RecoveryRequired as exc:
                case = exc.case.to_dict()
                capability = _capability(interrupt(case))
            except CapabilityInvalid:
                if capability is None or case is None:
                    raise
                # Expired or already redeemed: the case stays ready; ask for a fresh one.
                capability = _capability(interrupt({**case, "error": "capability-invalid"}))
        update = dict(result.value or {})
        if result.skipped and committed is not None:
            update.update(committed(state))
        update[EPOCH_KEY] = result.epoch
        return update

    return node


def _coordinates(config: RunnableConfig, runtime: Runtime[Any]) -> tuple[str, str]:
    configurable = config.get("configurable") or {}
    run_id = configurable.get("thread_id")
    info = runtime.execution_info
    checkpoint_id = info.checkpoint_id if info is not None else None
    if not isinstance(run_id, str) or not run_id:
        raise ValueError("a protected node needs a thread_id (the run id) and a checkpointer")
    if not checkpoint_id:
        raise ValueError("a protected node needs a checkpointer (no checkpoint id)")
    return run_id, checkpoint_id


def _capability(resume: Any) -> str:
    value = resume.get(RESUME_KEY) if isinstance(resume, Mapping) else None
    if not isinstance(value, str) or not value:
        raise ValueError(f"resume a protected node with Command(resume={{{RESUME_KEY!r}: ...}})")
    return value
