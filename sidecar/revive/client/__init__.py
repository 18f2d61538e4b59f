"""The worker library: protect a run's side effects with the Revive sidecar (DESIGN §10).

Talks to the sidecar over HTTP only and imports nothing of the server, so a worker installs
it with aiohttp and pydantic alone (httpx optional, for :meth:`ActionContext.httpx_client`).

    from revive.client import ActionContext, RecoveryRequired, protect_action

    async def send(ctx: ActionContext) -> int:
        async with ctx.session.post("v1.0/me/sendMail", json=mail) as resp:
            return resp.status

    try:
        result = await protect_action(
            sidecar_url="http://127.0.0.1:8787", run_id="run_7f2", checkpoint_id="chk-send",
            connection_id="conn_microsoft_ops", action_key="send-briefing", epoch=epoch,
            execute=send, recovery_capability=capability,
        )
        epoch = result.epoch                     # keep it in the runtime's durable state
    except RecoveryRequired as parked:
        wait_for_ready(parked.case.case_id)      # then call again with its capability
"""

from revive.client.errors import (
    CapabilityInvalid,
    Fenced,
    InFlight,
    OutcomeUnknown,
    ReconcileRequired,
    RecoveryCase,
    RecoveryRequired,
    ReviveClientError,
    SidecarProblem,
)
from revive.client.protect import ActionResult, derive_idempotency_key, protect_action
from revive.client.session import RENEW_MARGIN_S, ActionContext
from revive.client.sidecar import ActionOutcome, Redeemed, RunCapability, SidecarClient

__all__ = [
    "RENEW_MARGIN_S",
    "ActionContext",
    "ActionOutcome",
    "ActionResult",
    "CapabilityInvalid",
    "Fenced",
    "InFlight",
    "OutcomeUnknown",
    "ReconcileRequired",
    "RecoveryCase",
    "RecoveryRequired",
    "Redeemed",
    "ReviveClientError",
    "RunCapability",
    "SidecarClient",
    "SidecarProblem",
    "derive_idempotency_key",
    "protect_action",
]
