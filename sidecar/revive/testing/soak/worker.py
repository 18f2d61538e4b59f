"""A worker in its own process, so the soak can SIGKILL one mid-action.

``python -m revive.testing.soak worker SPEC.json`` runs one run's workflow from its checkpoint.
It talks to the driver over its standard streams, one JSON object per line: it announces
each action (``acting``) and waits for ``go`` on stdin — the driver injects that action's
faults in between — then reports ``done``, ``resumed``, ``retry``, and finally ``completed``,
``parked`` (a recovery case blocks the run: the driver takes over) or ``failed``, after which
it waits for stdin to close before exiting.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Literal

import aiohttp
from pydantic import BaseModel, ConfigDict

from revive.client import RecoveryRequired
from revive.testing.soak.plan import ActionSpec
from revive.testing.soak.runtime import Recovery, RunFailed, Runtime

__all__ = ["WorkerEvent", "WorkerSpec", "worker_main"]

_GO_TIMEOUT_S = 120.0


class WorkerSpec(BaseModel):
    """What a worker process runs (written by the driver to a file it names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    connection_id: str
    actions: tuple[ActionSpec, ...]
    checkpoint: Path
    sidecars: tuple[str, ...]


class WorkerEvent(BaseModel):
    """One line a worker process writes on stdout."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: Literal["acting", "done", "resumed", "retry", "completed", "parked", "failed"]
    index: int | None = None
    case_id: str | None = None
    at: float | None = None
    error: str | None = None


class _Parked(Exception):
    pass


def _emit(event: WorkerEvent) -> None:
    sys.stdout.write(event.model_dump_json(exclude_none=True) + "\n")
    sys.stdout.flush()


class _Rotating:
    """Try the sidecars in turn; a killed one comes back on the same port."""

    def __init__(self, urls: tuple[str, ...]) -> None:
        self.urls = urls
        self.at = 0

    def current(self) -> str:
        return self.urls[self.at]

    async def unreachable(self, url: str) -> None:
        self.at = (self.at + 1) % len(self.urls)
        await asyncio.sleep(0.1)


class _StreamHooks:
    async def acting(self, index: int) -> None:
        _emit(WorkerEvent(event="acting", index=index))
        async with asyncio.timeout(_GO_TIMEOUT_S):
            line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit(f"expected 'go' from the driver, got {line!r}")

    async def done(self, index: int) -> None:
        _emit(WorkerEvent(event="done", index=index))

    async def parked(self, case_id: str) -> Recovery | None:
        _emit(WorkerEvent(event="parked", case_id=case_id))
        raise _Parked(case_id)

    def resumed(self, case_id: str, at: float) -> None:
        _emit(WorkerEvent(event="resumed", case_id=case_id, at=at))

    def retried(self, reason: str) -> None:
        _emit(WorkerEvent(event="retry", error=reason))


async def _work(spec: WorkerSpec) -> int:
    code = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        runtime = Runtime(spec.run_id, spec.connection_id, spec.actions, spec.checkpoint, http,
                          _Rotating(spec.sidecars), _StreamHooks())
        try:
            await runtime.run()
        except _Parked:
            pass  # announced by the hook
        except (RunFailed, RecoveryRequired) as exc:
            _emit(WorkerEvent(event="failed", error=f"{type(exc).__name__}: {exc}"[:300]))
            code = 1
        else:
            _emit(WorkerEvent(event="completed"))
    # Linger until the driver closes stdin, so a kill it has scheduled always finds this
    # process alive (the number of kills then follows from the seed, not from timing).
    async with asyncio.timeout(_GO_TIMEOUT_S):
        await asyncio.to_thread(sys.stdin.readline)
    return code


def worker_main(argv: list[str]) -> int:
    """Entry point of ``python -m revive.testing.soak worker SPEC.json``."""
    if len(argv) != 1:
        print("usage: python -m revive.testing.soak worker SPEC.json", file=sys.stderr)
        return 2
    spec = WorkerSpec.model_validate_json(Path(argv[0]).read_text(encoding="utf-8"))
    return asyncio.run(_work(spec))
