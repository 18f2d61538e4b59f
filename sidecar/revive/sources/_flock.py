"""An exclusive ``flock`` held across awaits, taken without ever blocking the event loop.

Why not a blocking ``flock(LOCK_EX)`` in a worker thread: it cannot be abandoned. Behind a
stuck holder (a SIGSTOPped or wedged peer) the thread stays blocked for as long as the peer
is stuck, occupying a slot of the default executor that every ``asyncio.to_thread`` of the
process shares; a few such waits and the grant store, the client-secret read and the key
file all queue behind them. So each attempt is a non-blocking ``LOCK_NB`` try in a worker
thread, with growing pauses on the loop between attempts, the whole wait under one
``asyncio.timeout``. A peer that dies (SIGKILL included) releases the lock with its last
descriptor, so only a live but stuck peer makes a waiter time out.

``flock`` locks belong to the open file description, not to the process: two descriptors
opened separately exclude each other even inside one process, which is what lets two
sources (or two stores) of one process share the lock with other processes.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from revive.errors import CredentialMisconfigured, CredentialUnavailable

__all__ = ["exclusive_flock"]

_FIRST_PAUSE = 0.002  # seconds; a refresh held by a peer usually takes a few milliseconds
_MAX_PAUSE = 0.05


@asynccontextmanager
async def exclusive_flock(path: Path, wait: float, what: str) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600 if missing) for the block.

    Args:
        path: the lock file; its directory must exist.
        wait: seconds to keep trying while another descriptor holds the lock.
        what: names the lock in error text (a connection id, never a secret).

    Raises:
        CredentialUnavailable: still held by someone else after ``wait`` seconds
            (``provider_code="grant_lock_timeout"``).
        CredentialMisconfigured: the lock file cannot be opened or locked at all.
    """
    fd = await _acquire(path, wait, what)
    try:
        yield
    finally:
        # On the loop on purpose: unlocking and closing a lock file do no I/O, and a release
        # that awaited a thread could be cancelled a second time and leak the lock for good.
        _release(fd)


async def _acquire(path: Path, wait: float, what: str) -> int:
    pause = _FIRST_PAUSE
    try:
        async with asyncio.timeout(wait):
            while (fd := await _attempt(path)) is None:
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
            return fd
    except TimeoutError:
        raise CredentialUnavailable(
            f"the refresh lock of {what} was held elsewhere for over {wait:g} s",
            provider_code="grant_lock_timeout",
        ) from None


async def _attempt(path: Path) -> int | None:
    """One ``LOCK_NB`` try in a worker thread; a lock won after our caller gave up is freed."""
    task = asyncio.ensure_future(asyncio.to_thread(_try_lock, path))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_release_won)
        raise


def _release_won(task: asyncio.Future[int | None]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    if (fd := task.result()) is not None:
        _release(fd)


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CredentialMisconfigured(
            f"cannot open lock {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise CredentialMisconfigured(
            f"cannot lock {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    return fd


def _release(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
