"""The soak's runtime: a worker that drives one run's workflow through ``protect_action``.

It plays the part Temporal or LangGraph play in production, with their one duty that matters
here: durable state. A small JSON checkpoint per run holds the epoch, the actions done and a
recovery capability not yet known to be redeemed; it is written after every completed action
and before a recovery capability is used. A worker killed anywhere is replaced by one that
reads the checkpoint and calls ``protect_action`` again with the same action key, so the
sidecar's ledger, not the worker's memory, decides whether a side effect happens again.

Everything a run meets is retried here, bounded: fenced (a reconnect moved the generation),
in-flight (a killed worker's request is still running), unknown outcomes, transient provider
answers, and a sidecar that is gone (killed; it comes back on the same port).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from revive.client import (
    ActionContext,
    CapabilityInvalid,
    Fenced,
    RecoveryRequired,
    SidecarProblem,
    protect_action,
)
from revive.testing.soak.plan import ActionSpec

__all__ = [
    "MAX_ATTEMPTS",
    "Checkpoint",
    "Endpoints",
    "Hooks",
    "Recovery",
    "RunFailed",
    "Runtime",
    "UnexpectedAnswer",
    "mail_subject",
]

MAX_ATTEMPTS = 60
"""Attempts of one action (sidecar restarts are counted apart); past it the run fails."""
MAX_UNREACHABLE = 150
"""Times one action may find its sidecar gone (each waits for it to come back)."""
WORKFLOW = "soak"
STAMP_ID = "String {00020329-0000-0000-C000-000000000046} Name x-revive-idempotency-key"
"""The extended property the microsoft policy stamps on every sendMail (policies/microsoft.yaml)."""

_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class RunFailed(Exception):
    """A run gave up: an action exhausted its attempts. The text names the last error only."""


class UnexpectedAnswer(Exception):
    """The provider (through the sidecar) answered something the workflow cannot use.

    Carries the status and the problem type only: never a body, which could quote a token.
    """

    def __init__(self, status: int, problem_type: str | None) -> None:
        self.status = status
        self.problem_type = problem_type
        super().__init__(f"HTTP {status} {problem_type or ''}".strip())

    @property
    def retryable(self) -> bool:
        return self.status in _RETRYABLE_STATUS


class Recovery(BaseModel):
    """A recovery capability the runtime holds for a case until it knows it was redeemed."""

    model_config = ConfigDict(frozen=True)

    case_id: str
    epoch: int
    capability: str = Field(repr=False)


class Checkpoint(BaseModel):
    """The run's durable state (what a workflow's own state would hold)."""

    run_id: str
    epoch: int = 1
    done: list[str] = Field(default_factory=list)
    recovery: Recovery | None = None
    resume_case: str | None = None
    """A case whose resumed action has not completed yet (for the reconnect→resume timing)."""

    def adopt(self, case_id: str, recovery: Recovery | None) -> None:
        """What the operator answered for ``case_id``: a capability to redeem, or None when
        the case is already past redemption — then the one held for it was redeemed, and
        the epoch it named is the run's."""
        if recovery is not None:
            self.recovery, self.resume_case = recovery, recovery.case_id
        elif self.recovery is not None and self.recovery.case_id == case_id:
            self.epoch, self.recovery = self.recovery.epoch, None

    @classmethod
    async def load(cls, path: Path, run_id: str) -> Checkpoint:
        def read() -> Checkpoint:
            if not path.exists():
                return cls(run_id=run_id)
            return cls.model_validate_json(path.read_text(encoding="utf-8"))

        return await asyncio.to_thread(read)

    async def save(self, path: Path) -> None:
        """Write atomically (temp file, fsync, rename): a kill never leaves half a file."""
        data = self.model_dump_json()

        def write() -> None:
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)

        await asyncio.to_thread(write)


class Endpoints(Protocol):
    """Which sidecar a worker talks to, and what to do when it is gone."""

    def current(self) -> str:
        """The sidecar URL to use for the next attempt."""
        ...

    async def unreachable(self, url: str) -> None:
        """``url`` refused or dropped a connection: wait for it (or another) to be back."""
        ...


class Hooks(Protocol):
    """Where the runtime meets the soak's driver."""

    async def acting(self, index: int) -> None:
        """Action ``index`` is about to start (the driver injects its faults now)."""
        ...

    async def done(self, index: int) -> None:
        """Action ``index`` completed and the checkpoint says so."""
        ...

    async def parked(self, case_id: str) -> Recovery | None:
        """The run waits on ``case_id``: a recovery capability once the case is ready, or
        None when the case is already past redemption (resumed or closed)."""
        ...

    def resumed(self, case_id: str, at: float) -> None:
        """The action blocked by ``case_id`` completed at unix time ``at``."""
        ...

    def retried(self, reason: str) -> None:
        """An attempt failed for ``reason`` and the action is tried again."""
        ...


def mail_subject(run_id: str, action_key: str) -> str:
    """Unique per run and action, so the provider's log can be read back per action."""
    return f"soak {run_id} {action_key}"


async def _answer(resp: aiohttp.ClientResponse, expect: int) -> Any:
    body = await resp.read()
    if resp.status != expect:
        problem_type = None
        if (resp.content_type or "").endswith("json"):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("type"), str):
                problem_type = parsed["type"]
        raise UnexpectedAnswer(resp.status, problem_type)
    return json.loads(body) if body else None


def _execute(run_id: str, action: ActionSpec) -> Callable[[ActionContext], Awaitable[Any]]:
    async def read_events(ctx: ActionContext) -> int:
        async with ctx.session.get("v1.0/me/events", timeout=_REQUEST_TIMEOUT) as resp:
            return len((await _answer(resp, 200))["value"])

    async def read_profile(ctx: ActionContext) -> str:
        async with ctx.session.get("v1.0/me", timeout=_REQUEST_TIMEOUT) as resp:
            return str((await _answer(resp, 200))["id"])

    async def send_mail(ctx: ActionContext) -> int:
        message = {
            "subject": mail_subject(run_id, action.key),
            "body": {"contentType": "Text", "content": "Chaos soak: exactly once, please."},
            "toRecipients": [{"emailAddress": {"address": "ops@example.com"}}],
        }
        async with ctx.session.post(
            "v1.0/me/sendMail", json={"message": message}, timeout=_REQUEST_TIMEOUT
        ) as resp:
            await _answer(resp, 202)
            return resp.status

    match action.kind:
        case "read_events":
            return read_events
        case "read_profile":
            return read_profile
        case "send_mail":
            return send_mail


async def sent_items_has(ctx: ActionContext) -> bool:
    """The worker's reconcile: is a mail stamped with this action's key in Sent Items?"""
    flt = (
        f"singleValueExtendedProperties/Any(ep: ep/id eq '{STAMP_ID}' "
        f"and ep/value eq '{ctx.idempotency_key}')"
    )
    async with ctx.session.get(
        "v1.0/me/mailFolders/SentItems/messages", params={"$filter": flt}, timeout=_REQUEST_TIMEOUT
    ) as resp:
        return bool((await _answer(resp, 200))["value"])


class Runtime:
    """Runs one workflow from its checkpoint to the end (or until a hook stops it).

    Args:
        run_id: the run.
        connection_id: the connection every action uses.
        actions: its workflow.
        checkpoint: the checkpoint file (created on first save).
        http: a session for the sidecar (shared; not closed here).
        endpoints: which sidecar to talk to.
        hooks: the driver's side.
    """

    def __init__(
        self, run_id: str, connection_id: str, actions: tuple[ActionSpec, ...], checkpoint: Path,
        http: aiohttp.ClientSession, endpoints: Endpoints, hooks: Hooks,
    ) -> None:
        self.run_id = run_id
        self.connection_id = connection_id
        self.actions = actions
        self.path = checkpoint
        self.http = http
        self.endpoints = endpoints
        self.hooks = hooks
        self._rng = random.Random(run_id)  # jitter only; timing is not part of the plan

    async def run(self) -> None:
        """Every action not yet done, in order.

        Raises:
            RunFailed: an action exhausted its attempts.
            Exception: whatever a hook raises to stop the run (e.g. a subprocess parks).
        """
        state = await Checkpoint.load(self.path, self.run_id)
        for index, action in enumerate(self.actions):
            if action.key in state.done:
                continue
            await self.hooks.acting(index)
            await self._act(state, index, action)
            await self.hooks.done(index)

    async def _act(self, state: Checkpoint, index: int, action: ActionSpec) -> None:
        attempts = unreachable = 0
        last = "none"
        while attempts < MAX_ATTEMPTS and unreachable < MAX_UNREACHABLE:
            url = self.endpoints.current()
            try:
                result = await protect_action(
                    sidecar_url=url, run_id=self.run_id, checkpoint_id=f"chk-{index}",
                    connection_id=self.connection_id, action_key=action.key,
                    execute=_execute(self.run_id, action),
                    reconcile=sent_items_has if action.mutating else None,
                    epoch=state.epoch,
                    recovery_capability=state.recovery.capability if state.recovery else None,
                    workflow=WORKFLOW, http=self.http,
                )
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                # A killed sidecar: refused, reset, disconnected, or a body cut off mid-way.
                unreachable += 1
                last = type(exc).__name__
                self.hooks.retried("sidecar_unreachable")
                await self.endpoints.unreachable(url)
                continue
            except Exception as exc:  # noqa: BLE001 - sorted below; anything else re-raises
                attempts += 1
                last = _describe(exc)
                await self._handle(state, exc)
                continue
            state.epoch, state.recovery = result.epoch, None
            state.done.append(action.key)
            if state.resume_case is not None:
                self.hooks.resumed(state.resume_case, time.time())
                state.resume_case = None
            await state.save(self.path)
            return
        raise RunFailed(f"{self.run_id} {action.key}: gave up after {attempts} attempts "
                        f"and {unreachable} unreachable sidecars; last: {last}")

    async def _handle(self, state: Checkpoint, exc: Exception) -> None:
        """Decide what one failed attempt means for the run's durable state, or re-raise."""
        match exc:
            case RecoveryRequired():
                self.hooks.retried("recovery_required")
                await self._recover(state, exc.case.case_id)
            case CapabilityInvalid() if state.recovery is not None:
                # Burned: an earlier attempt (or a killed worker) redeemed it. The redemption
                # installed the epoch the capability named.
                self.hooks.retried("recovery_already_redeemed")
                state.epoch, state.recovery = state.recovery.epoch, None
                await state.save(self.path)
            case Fenced() if state.recovery is not None:
                # Redeem refused: the grant moved after the capability was issued (another
                # reconnect), or the redemption happened and a later request was fenced.
                self.hooks.retried("fenced_with_recovery")
                await self._recover(state, state.recovery.case_id)
            case Fenced():
                # A reconnect bumped the generation under the run's capability; mint anew.
                self.hooks.retried("fenced")
                await self._backoff()
            case UnexpectedAnswer() if exc.retryable:
                self.hooks.retried(f"answer_{exc.status}")
                await self._backoff()
            case UnexpectedAnswer():
                self.hooks.retried(f"unexpected_{exc.status}")
                await self._backoff()
            case SidecarProblem():
                self.hooks.retried(exc.type.removeprefix("urn:revive:"))
                await self._backoff()
            case _:
                raise exc

    async def _recover(self, state: Checkpoint, case_id: str) -> None:
        state.adopt(case_id, await self.hooks.parked(case_id))
        await state.save(self.path)

    async def _backoff(self) -> None:
        await asyncio.sleep(0.05 + self._rng.random() * 0.25)


def _describe(exc: Exception) -> str:
    """A short label for the report: the class and, for problems, the type (never a body)."""
    if isinstance(exc, SidecarProblem):
        return f"{type(exc).__name__} {exc.status} {exc.type}"
    return f"{type(exc).__name__}: {exc}"[:200]
