"""Issue #4 acceptance, LangGraph: the run_7f2 briefing interrupts on a dead grant and resumes.

A real compiled graph with the SQLite checkpointer, a real sidecar and the fake provider.
The thread id is the run id; the checkpoint file must never hold a provider token.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, RetryPolicy

from revive.adapters import CaseEvent, case_webhook
from revive.adapters.langgraph import (
    EPOCH_KEY,
    RESUME_KEY,
    ReviveState,
    ThreadResumer,
    protect_node,
)
from revive.client import ActionContext, OutcomeUnknown
from revive.lab.settings import LAB_CONNECTION
from revive.testing.story import RUN, WORKFLOW, briefing

if TYPE_CHECKING:
    from .conftest import AdapterStory

TOKEN_MARKERS = ("lab_at_", "lab_rt_")
CONFIG: RunnableConfig = {"configurable": {"thread_id": RUN}}


async def _nothing(n: int) -> None:
    return None


class Briefing(ReviveState, total=False):
    subjects: list[str]
    text: str
    sent: int
    already_sent: bool


class BriefingGraph:
    """read calendar → build briefing → send mail; ``before_send(n)`` runs before send n."""

    def __init__(self, sidecar_url: str, before_send: Callable[[int], Awaitable[None]]) -> None:
        self.sidecar_url = sidecar_url
        self.before_send = before_send
        self.calls: Counter[str] = Counter()

    async def read_calendar(self, state: Briefing, ctx: ActionContext) -> dict[str, Any]:
        self.calls["read_calendar"] += 1
        async with ctx.session.get("v1.0/me/events") as resp:
            assert resp.status == 200, await resp.text()
            return {"subjects": [event["subject"] for event in (await resp.json())["value"]]}

    async def build_briefing(self, state: Briefing) -> dict[str, Any]:
        self.calls["build_briefing"] += 1
        return {"text": "Tonight: " + "; ".join(state["subjects"])}

    async def send(self, state: Briefing, ctx: ActionContext) -> dict[str, Any]:
        self.calls["send"] += 1
        await self.before_send(self.calls["send"])
        mail = briefing()
        mail["message"]["body"]["content"] = state["text"]
        async with ctx.session.post("v1.0/me/sendMail", json=mail) as resp:
            return {"sent": resp.status}

    def compile(self, saver: AsyncSqliteSaver) -> Any:
        builder = StateGraph(Briefing)
        common: dict[str, Any] = {
            "sidecar_url": self.sidecar_url, "connection_id": LAB_CONNECTION,
            "workflow": WORKFLOW,
        }
        builder.add_node(
            "read_calendar",
            protect_node(self.read_calendar, action_key="read-calendar", **common),
        )
        builder.add_node("build_briefing", self.build_briefing)
        builder.add_node(
            "send_briefing",
            protect_node(
                self.send, action_key="send-briefing",
                committed=lambda state: {"already_sent": True}, **common,
            ),
            # an unknown outcome is retried; the ledger reconciles before anything re-sends
            retry_policy=RetryPolicy(
                retry_on=OutcomeUnknown, initial_interval=0.05, jitter=False, max_attempts=3
            ),
        )
        builder.add_edge(START, "read_calendar")
        builder.add_edge("read_calendar", "build_briefing")
        builder.add_edge("build_briefing", "send_briefing")
        builder.add_edge("send_briefing", END)
        return builder.compile(checkpointer=saver)


async def _parked(graph: Any, story: AdapterStory) -> dict[str, Any]:
    """Run the thread until it parks; the parked snapshot's interrupt is the case."""
    async with asyncio.timeout(20):
        await graph.ainvoke({}, CONFIG)
    snapshot = await graph.aget_state(CONFIG)
    assert snapshot.next == ("send_briefing",)
    assert len(snapshot.interrupts) == 1
    case: dict[str, Any] = dict(snapshot.interrupts[0].value)
    assert case["run_id"] == RUN and case["provider_code"] == "AADSTS700082"
    assert case["action_key"] == "send-briefing"
    assert case["checkpoint_id"] == snapshot.config["configurable"]["checkpoint_id"]
    assert snapshot.values.get(EPOCH_KEY, 1) == 1
    detail = await story.story.case(case["case_id"])
    assert detail["state"] in ("open", "awaiting_reconnect")
    return case


async def _assert_no_token_in_checkpoints(db: Path, case_id: str) -> None:
    files = sorted(db.parent.glob(db.name + "*"))
    raw = b"".join([await asyncio.to_thread(path.read_bytes) for path in files])
    assert case_id.encode() in raw and EPOCH_KEY.encode() in raw  # the search sees the data
    for marker in TOKEN_MARKERS:
        assert marker.encode() not in raw


async def test_run_7f2_thread_interrupts_and_the_notifier_resumes_it(
    adapter_story: AdapterStory, tmp_path: Path
) -> None:
    story = adapter_story.story

    async def kill_before_first_send(n: int) -> None:
        if n == 1:
            await story.provider.fault("kill_grant")

    flow = BriefingGraph(story.sidecar.url, kill_before_first_send)
    db = tmp_path / "checkpoints.sqlite"
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        graph = flow.compile(saver)
        resumer = ThreadResumer(graph)
        adapter_story.relay.handler = case_webhook(adapter_story.secret, resumer)
        try:
            case = await _parked(graph, adapter_story)
            assert await story.provider.mails() == []

            assert (await story.reconnect()).status == 200
            await adapter_story.relay.delivered("case.ready")
            async with asyncio.timeout(20):
                final = await resumer.result(case["case_id"])
        finally:
            await resumer.aclose()
        assert final["sent"] == 202 and final[EPOCH_KEY] == 2
        assert "already_sent" not in final
        assert (await graph.aget_state(CONFIG)).next == ()
    assert flow.calls == Counter(read_calendar=1, build_briefing=1, send=2)
    assert len(await story.provider.mails()) == 1
    await story.case_reaching(case["case_id"], "closed")
    await _assert_no_token_in_checkpoints(db, case["case_id"])


async def test_run_7f2_commit_then_drop_resumes_without_a_second_mail(
    adapter_story: AdapterStory, tmp_path: Path
) -> None:
    story = adapter_story.story

    async def drop_then_kill(n: int) -> None:
        if n == 1:  # the mail goes out, its answer is lost: the outcome is unknown
            await story.provider.fault("commit_then_drop")
        elif n == 2:  # the node is retried; reconciling needs the grant, which is now dead
            await story.provider.fault("kill_grant")

    flow = BriefingGraph(story.sidecar.url, drop_then_kill)
    ready: list[CaseEvent] = []

    async def collect(event: CaseEvent) -> None:  # the application resumes by hand
        ready.append(event)

    adapter_story.relay.handler = case_webhook(adapter_story.secret, collect)
    db = tmp_path / "checkpoints.sqlite"
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        case = await _parked(flow.compile(saver), adapter_story)
    assert len(await story.provider.mails()) == 1

    assert (await story.reconnect()).status == 200
    await adapter_story.relay.delivered("case.ready")
    assert [e.case_id for e in ready] == [case["case_id"]]
    assert ready[0].outcome == "committed"
    capability = ready[0].recovery_capability
    assert capability
    # A fresh process's view: a new graph over the same checkpoint file resumes the thread.
    later = BriefingGraph(story.sidecar.url, _nothing)
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        async with asyncio.timeout(20):
            final = await later.compile(saver).ainvoke(
                Command(resume={RESUME_KEY: capability}), CONFIG
            )
    assert final["already_sent"] is True and final[EPOCH_KEY] == 2
    assert "sent" not in final
    assert flow.calls == Counter(read_calendar=1, build_briefing=1, send=2)
    assert later.calls == Counter()  # committed: nothing re-ran, not even the send
    assert len(await story.provider.mails()) == 1
    detail = await story.case_reaching(case["case_id"], "closed")
    assert detail["outcome"] == "committed"
    await _assert_no_token_in_checkpoints(db, case["case_id"])
