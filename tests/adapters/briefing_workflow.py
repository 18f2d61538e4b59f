"""The run_7f2 briefing as a Temporal workflow and its activities, shared by the tests and
``briefing_worker.py`` (a worker in its own process).

Imported as the top-level module ``briefing_workflow`` with this directory on ``sys.path``
(the tests run with ``--import-mode=importlib``): Temporal's workflow sandbox re-imports the
workflow's module by that name, in the test process and in a worker process alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from revive.adapters.temporal import (
        ProtectedResult,
        ReviveRun,
        ReviveWorkflow,
        protect_activity,
    )
    from revive.client import ActionContext
    from revive.lab.settings import LAB_CONNECTION
    from revive.testing.story import WORKFLOW, briefing

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

    @property
    def activities(self) -> list[Callable[..., Awaitable[Any]]]:
        """Every activity, for ``Worker(activities=...)``."""
        return [self.read_calendar, self.build_briefing, self.send_briefing]

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
        text = await workflow.execute_activity_method(
            BriefingActivities.build_briefing, BuildBriefingInput(subjects),
            start_to_close_timeout=STEP, retry_policy=FAST_RETRY,
        )
        sent = await self.revive.execute_activity(
            BriefingActivities.send_briefing, lambda run: SendBriefingInput(run, text),
            checkpoint_id="chk-send", start_to_close_timeout=STEP, retry_policy=FAST_RETRY,
        )
        return {"epoch": self.revive.epoch, "sent": sent, "text": text}
