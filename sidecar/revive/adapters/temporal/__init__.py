"""Revive for Temporal: protected activities that park their workflow on a dead grant.

    # activities.py
    @activity.defn
    async def send_briefing(input: SendBriefingInput) -> ProtectedResult:
        return await protect_activity(
            input.revive, sidecar_url=SIDECAR, connection_id="conn_microsoft_ops",
            action_key="send-briefing", execute=lambda ctx: send(ctx.session, input.text),
        )

    # workflows.py
    with workflow.unsafe.imports_passed_through():
        from revive.adapters.temporal import ReviveWorkflow

    @workflow.defn(name="Nightly executive briefing")
    class Briefing:
        def __init__(self) -> None:
            self.revive = ReviveWorkflow()

        @workflow.run
        async def run(self, text: str) -> None:
            await self.revive.execute_activity(
                send_briefing, lambda run: SendBriefingInput(run, text),
                start_to_close_timeout=timedelta(minutes=1),
            )

    # the webhook receiver the sidecar's notifier points at
    app.router.add_post("/revive/cases", temporal_case_webhook(client, secret))

The workflow id is the run id. Import this package through the sandbox
(``workflow.unsafe.imports_passed_through()``): it is deterministic, but its activity side
loads aiohttp, which a workflow must not re-import.
"""

from revive.adapters.temporal._activities import protect_activity
from revive.adapters.temporal._notifier import signal_on_ready, temporal_case_webhook
from revive.adapters.temporal._types import (
    CAPABILITY_INVALID,
    FENCED,
    RECOVERED_SIGNAL,
    RECOVERY_REQUIRED,
    RECOVERY_TIMEOUT,
    STATUS_QUERY,
    ProtectedResult,
    ReviveRun,
)
from revive.adapters.temporal._workflows import ReviveWorkflow

__all__ = [
    "CAPABILITY_INVALID",
    "FENCED",
    "RECOVERED_SIGNAL",
    "RECOVERY_REQUIRED",
    "RECOVERY_TIMEOUT",
    "STATUS_QUERY",
    "ProtectedResult",
    "ReviveRun",
    "ReviveWorkflow",
    "protect_activity",
    "signal_on_ready",
    "temporal_case_webhook",
]
