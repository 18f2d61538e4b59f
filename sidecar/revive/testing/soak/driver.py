"""The chaos soak's driver: N runs through ``protect_action`` while faults rain down.

    make_plans(seed)                      what each run does and which faults it meets
    running_provider()                    the fake Microsoft provider, in this process
    Cluster.start(...)                    1 sidecar on SQLite, or 2 sharing PostgreSQL
    _Soak.drive(plan)  × concurrency      a run: a killable worker process first when its plan
                                          kills one, then in-process workers from the checkpoint
    build_report(...)                     the invariants, against the provider's mail log

Faults land when a run first reaches the action they are planned at: provider faults through
``POST /_lab/faults`` (they are global, so they may bite a neighbouring run: that is chaos
too), sidecar kills as a SIGKILL a few hundred ms into the action (often with
``commit_then_stall`` armed, so the kill falls between the provider's commit and the
ledger's), worker kills likewise into the worker process's action.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp

from revive.lab.settings import LAB_CONNECTION, lab_settings
from revive.store import open_store
from revive.testing.postgres import POSTGRES_URL, drop_schema, new_schema, with_schema
from revive.testing.provider import RunningProvider, running_provider
from revive.testing.soak.cluster import Cluster
from revive.testing.soak.plan import PROVIDER_FAULTS, Fault, RunPlan, make_plans
from revive.testing.soak.report import RunRecord, SoakReport, build_report
from revive.testing.soak.runtime import Checkpoint, Recovery, Runtime
from revive.testing.soak.worker import WorkerEvent, WorkerSpec

__all__ = ["SoakConfig", "run_soak"]

_STALL_MS = 1500
_PROCESS_LEGS = 8
_SETTLE_S = 20.0


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """One soak.

    Attributes:
        runs, seed: how many runs, and the seed their plans derive from.
        concurrency: runs in progress at once.
        store: ``sqlite`` (one sidecar) or ``postgres`` (two sidecars sharing the store).
        postgres_url: the server for ``postgres``; a fresh schema is made and dropped.
        workdir: where data, configs, checkpoints and logs go (a temp dir when None).
        run_timeout_s: a run that takes longer fails.
        deadline_s: runs still going this long after the start fail (the soak is bounded
            whatever happens; the report still comes).
    """

    runs: int = 200
    seed: int = 1
    concurrency: int = 8
    store: Literal["sqlite", "postgres"] = "sqlite"
    postgres_url: str = POSTGRES_URL
    workdir: Path | None = None
    run_timeout_s: float = 240.0
    deadline_s: float = 900.0


async def run_soak(config: SoakConfig) -> SoakReport:
    """Run the soak and check it; never raises for an invariant (the report says ``ok``)."""
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        if config.workdir is None:
            workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="soak-"))
            stack.push_async_callback(asyncio.to_thread, shutil.rmtree, workdir, True)
        else:
            workdir = config.workdir
            await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread((workdir / "runs").mkdir, exist_ok=True)
        store: str | None = None
        if config.store == "postgres":
            schema = new_schema()
            store = with_schema(config.postgres_url, schema)
            stack.push_async_callback(drop_schema, config.postgres_url, schema)
        provider = await stack.enter_async_context(running_provider())
        grant = await provider.new_grant()
        settings = await asyncio.to_thread(
            lab_settings, workdir / "data", provider.url, refresh_token=grant["refresh_token"]
        )
        if store is not None:
            settings = settings.model_copy(update={"store": store})
        sidecars = 2 if config.store == "postgres" else 1
        cluster = await stack.enter_async_context(
            Cluster.start(provider, settings, workdir, sidecars)
        )
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        )
        log = stack.enter_context(await asyncio.to_thread(open, workdir / "workers.log", "ab"))
        soak = _Soak(config, cluster, provider, http, workdir, log, started + config.deadline_s)
        plans = make_plans(config.seed, config.runs)
        records = await asyncio.gather(*(soak.drive(plan) for plan in plans))
        await soak.drain()
        return await soak.report(list(records), sidecars, started)
    raise AssertionError("unreachable")  # pragma: no cover - the stack swallows nothing


class _Soak:
    def __init__(self, config: SoakConfig, cluster: Cluster, provider: RunningProvider,
                 http: aiohttp.ClientSession, workdir: Path, log: IO[bytes],
                 deadline: float) -> None:
        self.config = config
        self.cluster = cluster
        self.provider = provider
        self.http = http
        self.workdir = workdir
        self.log = log
        self.deadline = deadline
        self.faults: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self._sem = asyncio.Semaphore(config.concurrency)
        self._background: set[asyncio.Task[None]] = set()

    def _checkpoint(self, plan: RunPlan) -> Path:
        return self.workdir / "runs" / f"{plan.run_id}.json"

    async def drive(self, plan: RunPlan) -> RunRecord:
        record = RunRecord(plan)
        async with self._sem:
            try:
                budget = min(self.config.run_timeout_s, self.deadline - time.monotonic())
                async with asyncio.timeout(max(budget, 0.0)):
                    if plan.worker_kill is not None:
                        await self._process_legs(plan, record)
                    if not record.completed:
                        await self._runtime(plan, record).run()
                        record.completed = True
            except TimeoutError:
                record.error = "timed out (the run's timeout or the soak's deadline)"
                record.note(f"failed: {record.error}")
            except Exception as exc:  # noqa: BLE001 - a failed run is a finding, not a crash
                record.error = f"{type(exc).__name__}: {exc}"[:300]
                record.note(f"failed: {record.error}")
        return record

    def _runtime(self, plan: RunPlan, record: RunRecord) -> Runtime:
        return Runtime(plan.run_id, LAB_CONNECTION, plan.actions, self._checkpoint(plan), self.http,
                       _Home(self.cluster, plan.index), _Hooks(self, plan, record))

    # -- faults ---------------------------------------------------------------------------------

    async def inject(self, plan: RunPlan, index: int, record: RunRecord) -> None:
        """The faults planned at action ``index`` (once each; worker kills are the leg's)."""
        for n, fault in enumerate(plan.faults):
            if fault.at != index or n in record.injected or fault.kind == "worker_kill":
                continue
            record.injected.add(n)
            record.note(f"inject {fault.kind} at {index}")
            if fault.kind in PROVIDER_FAULTS:
                params = {k: v for k, v in (("count", fault.count), ("ms", fault.ms),
                                            ("retry_after", fault.retry_after)) if v is not None}
                await self.provider.fault(fault.kind, **params)
                self.faults[fault.kind] += 1
            else:
                if fault.stall:
                    await self.provider.fault("commit_then_stall", ms=_STALL_MS)
                self._spawn(self._kill_sidecar(fault))

    async def _kill_sidecar(self, fault: Fault) -> None:
        if await self.cluster.kill(fault.slot, fault.delay_ms / 1000):
            self.faults["sidecar_kill"] += 1

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        async with asyncio.timeout(120):
            while self._background:
                await asyncio.gather(*list(self._background))

    # -- a worker process that can be killed -----------------------------------------------------

    async def _process_legs(self, plan: RunPlan, record: RunRecord) -> None:
        """Worker processes until one is killed (or the run ends); the driver recovers a
        parked run between them, writing the capability into the checkpoint."""
        for _ in range(_PROCESS_LEGS):
            parked = await self._process_leg(plan, record)
            if record.completed or record.worker_killed_mid_action is not None or parked is None:
                return
            recovery = await self.cluster.recover(parked)
            record.note(f"recovered {parked}: {'capability issued' if recovery else 'redeemed'}")
            state = await Checkpoint.load(self._checkpoint(plan), plan.run_id)
            state.adopt(parked, recovery)
            await state.save(self._checkpoint(plan))

    async def _process_leg(self, plan: RunPlan, record: RunRecord) -> str | None:
        """One worker process; returns the case it parked on, if it did."""
        kill = plan.worker_kill
        assert kill is not None
        urls = [s.url for s in self.cluster.slots]
        home = plan.index % len(urls)
        spec = WorkerSpec(
            run_id=plan.run_id, connection_id=LAB_CONNECTION, actions=plan.actions,
            checkpoint=self._checkpoint(plan), sidecars=tuple(urls[home:] + urls[:home]),
        )
        path = self.workdir / "runs" / f"{plan.run_id}.worker.json"
        await asyncio.to_thread(path.write_text, spec.model_dump_json(), "utf-8")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "revive.testing.soak", "worker", str(path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.log,
        )
        record.note(f"worker process {proc.pid} started")
        killer: asyncio.Task[None] | None = None
        parked: str | None = None
        try:
            assert proc.stdout is not None and proc.stdin is not None
            while line := await proc.stdout.readline():
                event = WorkerEvent.model_validate_json(line)
                record.note(f"worker {event.model_dump_json(exclude_none=True)}")
                match event.event:
                    case "acting":
                        assert event.index is not None
                        await self.inject(plan, event.index, record)
                        if event.index == kill.at and killer is None:
                            if kill.stall:
                                await self.provider.fault("commit_then_stall", ms=_STALL_MS)
                            killer = asyncio.create_task(
                                self._kill_worker(proc, kill, event.index, record)
                            )
                        try:
                            proc.stdin.write(b"go\n")
                            await proc.stdin.drain()
                        except (BrokenPipeError, ConnectionResetError):
                            pass  # killed already
                    case "done":
                        assert event.index is not None
                        record.done_seen.add(event.index)
                    case "resumed":
                        assert event.case_id is not None and event.at is not None
                        record.resumed.append((event.case_id, event.at))
                    case "retry":
                        self.retries[event.error or "?"] += 1
                    case "completed":
                        record.completed = True
                    case "parked":
                        parked = event.case_id
                    case "failed":
                        record.error = event.error
                if event.event in ("completed", "parked", "failed") and killer is None:
                    proc.stdin.close()  # nothing to kill in this leg: let it exit
        except BaseException:
            _sigkill(proc)  # the run timed out or the soak is being torn down
            if killer is not None:
                killer.cancel()
            raise
        finally:
            if killer is not None:
                await asyncio.gather(killer, return_exceptions=True)
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                _sigkill(proc)
            record.note(f"worker process exited {await proc.wait()}")
        return parked

    async def _kill_worker(self, proc: asyncio.subprocess.Process, kill: Fault, index: int,
                           record: RunRecord) -> None:
        await asyncio.sleep(kill.delay_ms / 1000)
        if _sigkill(proc):
            self.faults["worker_kill"] += 1
            record.worker_killed_mid_action = index not in record.done_seen
            when = "mid-action" if record.worker_killed_mid_action else "between actions"
            record.note(f"worker killed {when}")

    # -- the verdict ----------------------------------------------------------------------------

    async def report(self, records: list[RunRecord], sidecars: int, started: float) -> SoakReport:
        lines = "".join(json.dumps({"run_id": r.plan.run_id, "trace": r.trace}) + "\n"
                        for r in records)
        await asyncio.to_thread((self.workdir / "trace.jsonl").write_text, lines, "utf-8")
        cases = await self._settled_cases()
        in_flight, unknown = await self._ledger()
        reconnected_at: dict[str, float] = {}
        for case_id in {c for r in records for c, _ in r.resumed}:
            detail = await self.cluster.case(case_id)
            at = [t["at"] for t in detail["transitions"] if t["to_state"] == "reconnected"]
            if at:
                reconnected_at[case_id] = at[-1]
        return build_report(
            seed=self.config.seed, store=self.config.store, sidecars=sidecars,
            concurrency=self.config.concurrency, records=records,
            mails=await self.provider.mails(), cases=cases, reconnected_at=reconnected_at,
            in_flight=in_flight, unknown=unknown, faults=self.faults, retries=self.retries,
            reconnects=len(self.cluster.reconnects),
            reconnect_failures=self.cluster.reconnect_failures,
            wall_s=time.monotonic() - started,
        )

    async def _settled_cases(self) -> list[dict[str, Any]]:
        """The cases once none is between ``resumed`` and ``closed`` (the close after a
        commit is recorded asynchronously), or as they stand after a while."""
        deadline = time.monotonic() + _SETTLE_S
        while True:
            cases = await self.cluster.cases()
            if time.monotonic() > deadline or all(c["state"] == "closed" for c in cases):
                return cases
            await asyncio.sleep(0.2)

    async def _ledger(self) -> tuple[int, int]:
        """``in_flight`` and ``unknown`` rows, read from the store the sidecars share."""
        deadline = time.monotonic() + _SETTLE_S
        async with open_store(self.cluster.store_url) as store:
            while True:
                in_flight = await store.count_actions("in_flight")
                if not in_flight or time.monotonic() > deadline:
                    return in_flight, await store.count_actions("unknown")
                await asyncio.sleep(0.2)


class _Home:
    """A run's sidecar: its home slot, or any running one while home restarts."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.home = index % len(cluster.slots)

    def current(self) -> str:
        slots = self.cluster.slots
        for n in range(len(slots)):
            slot = slots[(self.home + n) % len(slots)]
            if slot.up.is_set():
                return slot.url
        return slots[self.home].url

    async def unreachable(self, url: str) -> None:
        slot = next(s for s in self.cluster.slots if s.url == url)
        if slot.up.is_set():
            await asyncio.sleep(0.05)  # dropped mid-request by a kill already restarted
        await self.cluster.any_up(self.home)


class _Hooks:
    def __init__(self, soak: _Soak, plan: RunPlan, record: RunRecord) -> None:
        self.soak = soak
        self.plan = plan
        self.record = record

    async def acting(self, index: int) -> None:
        await self.soak.inject(self.plan, index, self.record)

    async def done(self, index: int) -> None:
        self.record.done_seen.add(index)

    async def parked(self, case_id: str) -> Recovery | None:
        self.record.note(f"parked on {case_id}")
        recovery = await self.soak.cluster.recover(case_id)
        self.record.note(f"recovered {case_id}: {'capability issued' if recovery else 'redeemed'}")
        return recovery

    def resumed(self, case_id: str, at: float) -> None:
        self.record.resumed.append((case_id, at))
        self.record.note(f"resumed after {case_id}")

    def retried(self, reason: str) -> None:
        self.soak.retries[reason] += 1
        self.record.note(f"retry {reason}")


def _sigkill(proc: asyncio.subprocess.Process) -> bool:
    """SIGKILL by pid. ``proc.kill()`` would first poll the child, which can reap one that
    just exited under asyncio's child watcher (it then warns and reports 255)."""
    if proc.returncode is not None:
        return False
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
