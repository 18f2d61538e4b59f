"""The notifier hook: resume a graph's thread when its recovery case becomes ready."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.pregel import Pregel
from langgraph.types import Command

from revive.adapters._webhook import CaseEvent, ResumeGone
from revive.adapters.langgraph._node import RESUME_KEY

__all__ = ["ThreadResumer", "resume_command"]

log = logging.getLogger("revive.adapters")


def resume_command(capability: str) -> Command[Any]:
    """``Command(resume={"revive_capability": capability})``: what a parked node resumes on."""
    return Command(resume={RESUME_KEY: capability})


class ThreadResumer:
    """An ``on_ready`` callback that resumes the case's thread in the background.

    Pass it to :func:`revive.adapters.case_webhook`::

        resumer = ThreadResumer(graph)
        app.router.add_post("/revive/cases", case_webhook(secret, resumer))

    On ``case.ready`` it checks that the thread (``thread_id`` = the case's ``run_id``) is
    parked on that case, then starts ``graph.ainvoke(resume_command(capability), config)`` as
    a task and returns at once, so the webhook is answered before the graph runs on.

    Args:
        graph: the compiled graph, with the checkpointer the thread was run with.
        config: the run config for an event (default ``{"configurable": {"thread_id":
            event.run_id}}``); add callbacks, recursion limits or context here.
    """

    def __init__(
        self,
        graph: Pregel[Any, Any, Any, Any],
        *,
        config: Callable[[CaseEvent], RunnableConfig] | None = None,
    ) -> None:
        self.graph = graph
        self._config = config or _thread_config
        self.tasks: dict[str, asyncio.Task[Any]] = {}

    async def __call__(self, event: CaseEvent) -> None:
        """Resume ``event``'s thread with its capability.

        Raises:
            ResumeGone: the thread is not parked on this case (finished, unknown, or already
                resumed by someone else).
        """
        if event.recovery_capability is None:
            return
        config = self._config(event)
        snapshot = await self.graph.aget_state(config)
        if not any(_names(interrupt.value, event.case_id) for interrupt in snapshot.interrupts):
            raise ResumeGone(f"thread {event.run_id} is not waiting on case {event.case_id}")
        task = asyncio.create_task(
            self.graph.ainvoke(resume_command(event.recovery_capability), config),
            name=f"revive-resume-{event.case_id}",
        )
        task.add_done_callback(lambda done: _report(event, done))
        self.tasks[event.case_id] = task

    async def result(self, case_id: str) -> Any:
        """The resumed invocation's output for ``case_id`` (waits for it; raises its error)."""
        return await self.tasks[case_id]

    async def aclose(self) -> None:
        """Cancel resumptions still running (the checkpointer keeps their progress)."""
        running = [t for t in self.tasks.values() if not t.done()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _thread_config(event: CaseEvent) -> RunnableConfig:
    return {"configurable": {"thread_id": event.run_id}}


def _names(value: Any, case_id: str) -> bool:
    return isinstance(value, Mapping) and value.get("case_id") == case_id


def _report(event: CaseEvent, task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning(
            "resuming thread %s for case %s failed: %s",
            event.run_id, event.case_id, type(exc).__name__,
        )
