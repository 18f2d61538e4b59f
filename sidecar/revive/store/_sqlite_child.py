"""The SQLite writer process: owns the write connection and runs group-commit batches.

Started by :class:`revive.store._sqlite_process.WriterProcess` as
``python -m revive.store._writerd DATABASE``. Why a process and not a thread: the ``sqlite3``
module holds the GIL for everything but the SQLite call itself, so a writer thread and the event
loop take turns on one lock, and on a loaded two-core machine the proxy lost a third of its POST
throughput to those handoffs. In its own process the writer's Python runs beside the loop.

The protocol, on stdin and stdout, is frames: a 4-byte big-endian length, then a pickle.

- parent → child: ``([job_id, ...], pickled [op, ...])``: each ``op`` is a picklable callable of
  one ``sqlite3.Connection`` (a ``functools.partial`` of a function in ``_sqlite_ops``). The
  operations travel as a pickle inside the pickle so that a frame whose operations the writer
  cannot load (an operation from a module only the sidecar has) fails that frame's jobs, by
  id, none of them run, instead of killing the writer;
- child → parent: first ``("ready", sqlite_version)`` or ``("failed", reason)``, then, per
  committed (or failed) transaction, ``[(job_id, ok, result_or_exception), ...]``.

Whatever the parent sent while a transaction was committing forms the next batch (up to
``MAX_BATCH`` operations per transaction). End of input (the parent closed the pipe, or died)
ends the process once the batch in hand is answered. SIGINT is ignored: a Ctrl-C reaches the
whole process group, and the parent drains the writer before it lets it go.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sqlite3
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from revive.store._sqlite_writer import MAX_BATCH, Outcome, connect, run_batch
from revive.store.models import StoreUnavailable

HEADER = struct.Struct("!I")
READ_SIZE = 1 << 20

log = logging.getLogger("revive.store.writer")


def frame(message: Any) -> bytes:
    """One message as it goes over the pipe."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def messages(buffer: bytearray) -> Iterator[Any]:
    """Take every complete frame off the front of ``buffer`` (a partial one stays)."""
    while len(buffer) >= HEADER.size:
        (size,) = HEADER.unpack_from(buffer)
        end = HEADER.size + size
        if len(buffer) < end:
            return
        payload = bytes(buffer[HEADER.size : end])
        del buffer[:end]
        yield pickle.loads(payload)


def job_frame(jobs: list[tuple[int, Any]]) -> bytes:
    """The frame that sends ``jobs`` to the writer (raises when an operation does not pickle)."""
    ops = pickle.dumps([op for _, op in jobs], protocol=pickle.HIGHEST_PROTOCOL)
    return frame(([job_id for job_id, _ in jobs], ops))


def load_jobs(message: tuple[list[int], bytes]) -> tuple[list[tuple[int, Any]], list[Any]]:
    """The jobs of one frame, or, when its operations cannot be loaded here, their refusals."""
    job_ids, blob = message
    try:
        ops = pickle.loads(blob)
    except Exception as exc:  # noqa: BLE001 - an unknown module, a class that moved: theirs
        error = StoreUnavailable(
            f"the writer cannot load the operations sent with this one ({type(exc).__name__});"
            " none of them ran"
        )
        return [], [(job_id, False, error) for job_id in job_ids]
    return list(zip(job_ids, ops, strict=True)), []


def answer(jobs: list[tuple[int, Any]], outcomes: list[Outcome]) -> list[tuple[int, bool, Any]]:
    """Pair results with their jobs; an exception that cannot cross the pipe becomes a plain one."""
    out = []
    for (job_id, _), (ok, value) in zip(jobs, outcomes, strict=True):
        if not ok:
            try:
                pickle.loads(pickle.dumps(value))
            except Exception:  # noqa: BLE001 - any failure to round-trip means "send it plainer"
                value = StoreUnavailable(f"{type(value).__name__}: {value}")
        out.append((job_id, ok, value))
    return out


def run_jobs(conn: sqlite3.Connection, jobs: list[tuple[int, Any]]) -> list[tuple[int, bool, Any]]:
    """One transaction for ``jobs``; a transaction that fails fails every one of them."""
    try:
        outcomes = run_batch(conn, [op for _, op in jobs])
    except sqlite3.Error as exc:
        return [(job_id, False, StoreUnavailable(f"sqlite: {exc}")) for job_id, _ in jobs]
    except Exception as exc:  # a bug: the parent hears it, the writer lives on
        log.exception("a store write batch failed")
        error = StoreUnavailable(f"store write failed: {type(exc).__name__}")
        return [(job_id, False, error) for job_id, _ in jobs]
    return answer(jobs, outcomes)


def serve(conn: sqlite3.Connection, read_fd: int, write_fd: int) -> None:
    """Answer batches until end of input."""
    buffer = bytearray()
    while True:
        chunk = os.read(read_fd, READ_SIZE)
        if not chunk:
            return
        buffer += chunk
        jobs: list[tuple[int, Any]] = []
        refused: list[Any] = []
        for message in messages(buffer):
            loaded, unloadable = load_jobs(message)
            jobs.extend(loaded)
            refused.extend(unloadable)
        if refused and not jobs:
            _write_all(write_fd, frame(refused))
        for start in range(0, len(jobs), MAX_BATCH):
            answered = run_jobs(conn, jobs[start : start + MAX_BATCH])
            _write_all(write_fd, frame(refused + answered if start == 0 else answered))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m revive.store._writerd DATABASE", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    # The protocol owns the real stdout; anything printed by accident goes to stderr.
    write_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        conn = connect(Path(args[0]))
    except sqlite3.Error as exc:
        _write_all(write_fd, frame(("failed", f"sqlite: {exc}")))
        return 1
    try:
        _write_all(write_fd, frame(("ready", sqlite3.sqlite_version)))
        serve(conn, 0, write_fd)
    except BrokenPipeError:
        pass  # the parent is gone; what it sent has been committed or rolled back
    finally:
        conn.close()
    return 0
