"""Group commit for SQLite, in a writer process: many callers' writes share one transaction
and one fsync (DESIGN §9).

Callers' operations queue up on the event loop; once per loop turn everything queued goes to
the writer process (:mod:`revive.store._sqlite_child`) as one frame, with no thread and no
lock shared with the loop. The child runs what it has received as one transaction, each
operation in its own savepoint, and answers after the ``COMMIT`` (with ``synchronous=FULL``:
after the fsync), so nobody hears "done" about a write a crash could lose. While one batch
commits, the next one gathers in the pipe.

If the writer process dies, the operations it held fail with ``StoreUnavailable`` (each one may
or may not have committed, like any write whose answer was lost) and the next write starts a
new writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import revive
from revive.store._sqlite_child import HEADER, job_frame
from revive.store._sqlite_writer import Op
from revive.store.models import StoreUnavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(revive.__file__).resolve().parent.parent)
"""Where this process imported revive from: the writer process imports the very same code."""

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


@dataclass
class WriterStats:
    """Counters a test or the bench reads to see group commit at work.

    Attributes:
        commits: transactions answered by the writer.
        operations: operations those transactions carried (kept or rolled back to their
            savepoint).
        largest_batch: the most operations one transaction carried.
        starts: writer processes started (more than one: a writer died and was replaced).
    """

    commits: int = 0
    operations: int = 0
    largest_batch: int = 0
    starts: int = 0


class WriterProcess:
    """The loop side of the writer process: submit operations, get their results."""

    def __init__(self, path: Path, stats: WriterStats) -> None:
        self._path = path
        self._stats = stats
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._outbox: list[tuple[int, Op[Any]]] = []
        self._flush_scheduled = False
        self._next_id = 0
        self._starting: asyncio.Lock | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The current writer process, if one runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start the writer process and wait until it has opened the database.

        Raises:
            StoreUnavailable: the process did not start, or could not open the database.
        """
        self._starting = asyncio.Lock()
        await self._spawn()

    async def submit(self, op: Op[T]) -> T:
        """Run ``op`` in the next batch; return its result once the batch is durable.

        A caller cancelled while waiting does not cancel the operation once it was sent: it
        may still commit.

        Raises:
            StoreUnavailable: the store is closed, or the writer failed or died.
            TypeError: ``op`` cannot be sent to the writer process (it must pickle).
            Whatever ``op`` raised (its own changes rolled back, the batch unaffected).
        """
        if self._closed:
            raise StoreUnavailable("store is closed")
        if self.pid is None:
            await self._restart()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._next_id += 1
        self._waiting[self._next_id] = future
        self._outbox.append((self._next_id, op))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return cast(T, await future)

    async def close(self) -> None:
        """Let the writer finish what it was sent, then stop it."""
        if self._closed:
            return
        self._closed = True
        if self._waiting:
            await asyncio.gather(*self._waiting.values(), return_exceptions=True)
        await self._stop()

    # -- the process ----------------------------------------------------------------------------

    async def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "revive.store._writerd", str(self._path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            )
        except OSError as exc:
            raise StoreUnavailable(f"cannot start the SQLite writer process: {exc}") from exc
        assert proc.stdout is not None
        try:
            hello = await asyncio.wait_for(_read_message(proc.stdout), START_TIMEOUT_SECONDS)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, pickle.UnpicklingError):
            hello = ("failed", "the writer process did not start")
        if hello[0] != "ready":
            await _reap(proc)
            raise StoreUnavailable(str(hello[1]))
        self._proc = proc
        self._stats.starts += 1
        self._reader = asyncio.create_task(self._read(proc), name="revive-store-writer")

    async def _restart(self) -> None:
        assert self._starting is not None, "start() first"
        async with self._starting:
            if self.pid is None and not self._closed:
                log.error("the SQLite writer process is gone; starting a new one")
                if self._reader is not None:
                    await self._reader
                await self._spawn()

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # end of input: the child answers what it holds, then exits
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            log.error("the SQLite writer process did not stop; killing it")
            await _reap(proc)
        if self._reader is not None:
            await self._reader

    # -- the pipe -------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send everything queued this loop turn as one frame."""
        self._flush_scheduled = False
        jobs = []
        for job_id, op in self._outbox:
            if self._waiting[job_id].done():  # its caller was cancelled before it left
                del self._waiting[job_id]
            else:
                jobs.append((job_id, op))
        self._outbox = []
        proc = self._proc
        if not jobs:
            return
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            self._fail([i for i, _ in jobs], StoreUnavailable("the SQLite writer process is gone"))
            return
        try:
            data = job_frame(jobs)
        except Exception:  # noqa: BLE001 - find the operations that cannot be sent
            jobs = self._picklable(jobs)
            data = job_frame(jobs) if jobs else b""
        if data:
            proc.stdin.write(data)

    def _picklable(self, jobs: list[tuple[int, Op[Any]]]) -> list[tuple[int, Op[Any]]]:
        kept = []
        for job_id, op in jobs:
            try:
                pickle.dumps(op)
            except Exception as exc:  # noqa: BLE001 - that caller's own error
                self._waiting.pop(job_id).set_exception(
                    TypeError(f"a store operation must pickle to reach the writer: {exc}")
                )
            else:
                kept.append((job_id, op))
        return kept

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        """Hand each answered batch to its callers until the writer's output ends."""
        assert proc.stdout is not None
        try:
            while True:
                answered = await _read_message(proc.stdout)
                self._stats.commits += 1
                self._stats.operations += len(answered)
                self._stats.largest_batch = max(self._stats.largest_batch, len(answered))
                for job_id, ok, value in answered:
                    future = self._waiting.pop(job_id, None)
                    if future is None or future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError, pickle.UnpicklingError):
            pass  # the writer ended (or broke its output); whatever it still held is lost
        status = await proc.wait()
        if self._proc is proc:
            self._proc = None
        if self._waiting:
            if not self._closed:
                log.error("the SQLite writer process exited (status %s) with writes pending", status)
            self._fail(list(self._waiting), StoreUnavailable(
                f"the SQLite writer process exited (status {status}); the write may or may not "
                "have committed"
            ))

    def _fail(self, job_ids: list[int], error: BaseException) -> None:
        for job_id in job_ids:
            future = self._waiting.pop(job_id, None)
            if future is not None and not future.done():
                future.set_exception(error)


async def _read_message(stream: asyncio.StreamReader) -> Any:
    header = await stream.readexactly(HEADER.size)
    (size,) = HEADER.unpack(header)
    return pickle.loads(await stream.readexactly(size))


async def _reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
