"""Revive for LangGraph: protected nodes that interrupt their thread on a dead grant.

    class Briefing(ReviveState):
        text: str

    async def send(state: Briefing, ctx: ActionContext) -> dict[str, Any]:
        async with ctx.session.post("v1.0/me/sendMail", json=mail(state["text"])) as resp:
            return {"sent": resp.status}

    builder.add_node("send", protect_node(
        send, sidecar_url=SIDECAR, connection_id="conn_microsoft_ops", action_key="send-briefing",
    ))
    graph = builder.compile(checkpointer=saver)

    # the webhook receiver the sidecar's notifier points at: resumes the thread when ready
    app.router.add_post("/revive/cases", case_webhook(secret, ThreadResumer(graph)))

The thread id is the run id; the epoch lives in graph state (``revive_epoch``). A dead grant
surfaces as an interrupt whose value is the case; resuming with
``Command(resume={"revive_capability": ...})`` (:func:`resume_command`) continues the thread
from the same checkpoint without re-running earlier nodes.
"""

from revive.adapters.langgraph._node import EPOCH_KEY, RESUME_KEY, ReviveState, protect_node
from revive.adapters.langgraph._notifier import ThreadResumer, resume_command

__all__ = [
    "EPOCH_KEY",
    "RESUME_KEY",
    "ReviveState",
    "ThreadResumer",
    "protect_node",
    "resume_command",
]
