"""The lab's demo worker: "Nightly executive briefing" (``run_7f2``) through ``protect_action``.

Three steps — read the calendar, build the briefing, send it — each provider call through the
sidecar with :func:`revive.client.protect_action`. On :class:`RecoveryRequired` the run parks
and records the case; :meth:`DemoWorker.resume` continues it with the case's recovery
capability (the new epoch comes from the result). State lives in memory, like a toy runtime.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from revive.client import (
    ActionContext,
    OutcomeUnknown,
    RecoveryRequired,
    ReviveClientError,
    protect_action,
)

__all__ = ["DEMO_RUN", "DEMO_WORKFLOW", "DemoWorker", "STEPS"]

DEMO_RUN = "run_7f2"
DEMO_WORKFLOW = "Nightly executive briefing"
DEMO_CONNECTION = "conn_microsoft_ops"
#: (action key, checkpoint) of each provider step, in order.
STEPS = (("read-calendar", "chk-calendar"), ("send-briefing", "chk-send"))
_LOG_LIMIT = 200


@dataclass
class DemoState:
    """What the toy runtime holds durably for its one run (here: in memory)."""

    run_id: str = DEMO_RUN
    workflow: str = DEMO_WORKFLOW
    epoch: int = 1
    step: int = 0  #: index into STEPS of the next provider step
    status: str = "idle"  #: idle, running, waiting, parked, unknown, killed, failed, done
    case_id: str | None = None
    events: list[str] = field(default_factory=list)
    briefing: str | None = None
    replayed: dict[str, bool] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        checkpoint = STEPS[self.step][1] if self.step < len(STEPS) else "chk-done"
        return {
            "run_id": self.run_id, "workflow": self.workflow, "epoch": self.epoch,
            "checkpoint": checkpoint, "status": self.status, "case_id": self.case_id,
            "events": list(self.events), "replayed": dict(self.replayed),
        }


def _briefing_mail(text: str) -> dict[str, Any]:
    return {
        "message": {
            "subject": DEMO_WORKFLOW,
            "body": {"contentType": "Text", "content": text},
            "toRecipients": [{"emailAddress": {"address": "ceo@example.com"}}],
        }
    }


class DemoWorker:
    """One demo run, driven by the lab page's buttons; at most one task at a time."""

    def __init__(self) -> None:
        self.state = DemoState()
        self._task: asyncio.Task[None] | None = None
        self._calendar: list[dict[str, Any]] = []

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _log(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.state.events.append(f"{stamp} {line}")
        del self.state.events[:-_LOG_LIMIT]

    def prepare(self, sidecar_url: str) -> bool:
        """Start the run up to the send: read the calendar, build the briefing, then wait
        at ``chk-send`` for :meth:`start` (the lab's "Run briefing", the nightly trigger)."""
        if self.running or self.state.status != "idle":
            return False
        return self._spawn(sidecar_url, None, hold_before_send=True)

    def start(self, sidecar_url: str, recovery_capability: str | None = None) -> bool:
        """Start (or continue) the run; False when a task is already running or it is done."""
        if self.running or self.state.status == "done":
            return False
        return self._spawn(sidecar_url, recovery_capability, hold_before_send=False)

    def _spawn(self, sidecar_url: str, capability: str | None, *, hold_before_send: bool) -> bool:
        self.state.status = "running"
        self._log("worker started" if capability is None
                  else "worker resumed with a recovery capability")
        self._task = asyncio.create_task(self._run(sidecar_url, capability, hold_before_send))
        return True

    def kill(self) -> bool:
        """Cancel the worker task, as if the process died; False when none runs."""
        if not self.running:
            return False
        assert self._task is not None
        self._task.cancel()
        return True

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self, sidecar_url: str, capability: str | None, hold: bool = False) -> None:
        state = self.state
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                while state.step < len(STEPS):
                    action_key, checkpoint = STEPS[state.step]
                    if hold and action_key == "send-briefing":
                        state.status = "waiting"
                        self._log(f"waiting at {checkpoint}: click Run briefing to send")
                        return
                    self._log(f"{action_key} at {checkpoint} (epoch {state.epoch})")
                    result = await protect_action(
                        sidecar_url=sidecar_url, run_id=state.run_id, checkpoint_id=checkpoint,
                        connection_id=DEMO_CONNECTION, action_key=action_key,
                        epoch=state.epoch, workflow=state.workflow, http=http,
                        execute=self._execute(action_key), recovery_capability=capability,
                    )
                    capability = None  # single use: only the parked step redeems it
                    state.epoch = result.epoch
                    state.replayed[action_key] = result.replayed
                    state.case_id = None
                    if result.replayed:
                        self._log(f"{action_key}: Revive-Replayed (already done, not repeated)")
                    else:
                        self._log(f"{action_key}: done")
                    state.step += 1
                    if action_key == "read-calendar":
                        self._build_briefing()
            state.status = "done"
            self._log("run complete")
        except asyncio.CancelledError:
            state.status = "killed"
            self._log("worker killed")
            raise
        except RecoveryRequired as parked:
            state.status = "parked"
            state.case_id = parked.case.case_id
            code = parked.case.provider_code or "no provider code"
            self._log(f"parked: recovery case {parked.case.case_id} ({code})")
        except OutcomeUnknown as unknown:
            state.status = "unknown"
            self._log(f"outcome unknown for {unknown.idempotency_key}: run again to reconcile")
        except (ReviveClientError, aiohttp.ClientError, ValueError) as exc:
            state.status = "failed"
            self._log(f"failed: {type(exc).__name__}: {exc}")

    def _build_briefing(self) -> None:
        titles = [str(e.get("subject", "untitled")) for e in self._calendar]
        self.state.briefing = (
            f"{len(titles)} meetings tomorrow: " + "; ".join(titles) if titles
            else "No meetings tomorrow."
        )
        self._log("briefing built")

    def _execute(self, action_key: str) -> Any:
        async def read_calendar(ctx: ActionContext) -> int:
            async with ctx.session.get("v1.0/me/events") as resp:
                body = await resp.json(content_type=None)
                if resp.status == 200 and isinstance(body, dict):
                    events = body.get("value", [])
                    self._calendar = [e for e in events if isinstance(e, dict)]
                return resp.status

        async def send(ctx: ActionContext) -> int:
            text = self.state.briefing or "No meetings tomorrow."
            async with ctx.session.post("v1.0/me/sendMail", json=_briefing_mail(text)) as resp:
                await resp.read()
                return resp.status

        return read_calendar if action_key == "read-calendar" else send
