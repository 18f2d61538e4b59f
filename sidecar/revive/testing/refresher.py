"""Refreshers in processes of their own, for cross-process tests of one shared grant.

Two sidecars on one host share ``data_dir`` and so one encrypted grant file; what keeps them
from redeeming one rotating refresh token twice is a ``flock``, which only separate processes
exercise the way production does. This module is both sides:

* ``python -m revive.testing.refresher refresh SPEC_JSON`` builds an ``OAuth2Source`` on the
  spec's ``data_dir``, prints ``ready``, waits for ``go`` on stdin (so that every process
  starts at once), forces ``rounds`` refreshes back to back and prints a
  :class:`RefresherReport` as one JSON line.
* ``python -m revive.testing.refresher hold LOCK_FILE`` takes an exclusive ``flock`` on the
  file, prints ``held`` and keeps it until killed: a stuck peer.

    reports = await run_refreshers(spec, processes=3)
    async with lock_holder(store.refresh_lock_path(conn)) as holder: ...
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
from pydantic import BaseModel, ConfigDict

from revive.classify import load_policies
from revive.config import OAuth2SourceConfig
from revive.errors import CredentialError
from revive.sources import GrantStore, Lease, OAuth2Source

__all__ = ["RefresherReport", "RefresherSpec", "lock_holder", "main", "run_refreshers"]

_START_S = 60.0  # a child imports the whole package before it is ready


class RefresherSpec(BaseModel):
    """What one refresher process does (passed to it as JSON).

    Attributes:
        connection_id: the grant's connection.
        data_dir: the ``data_dir`` every process shares (grant file, key, locks).
        source: the oauth2 source settings (token URL, client, secret file).
        policy_dir: where the policies live; ``policy`` names the classifier.
        rounds: refreshes to force, one after the other.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    connection_id: str
    data_dir: Path
    source: OAuth2SourceConfig
    policy_dir: Path
    policy: str = "microsoft"
    rounds: int


class RefresherReport(BaseModel):
    """What one refresher process saw.

    Attributes:
        ok: refreshes that handed out a new lease.
        failures: the others, counted by ``"<error class>:<provider_code>"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ok: int
    failures: dict[str, int]


async def run_refreshers(
    spec: RefresherSpec, processes: int, timeout: float = 300.0
) -> list[RefresherReport]:
    """Start ``processes`` refreshers, release them together, and collect their reports.

    Raises:
        RuntimeError: a child did not get ready or did not report (its stderr attached).
        TimeoutError: the whole run took longer than ``timeout`` seconds.
    """
    async with AsyncExitStack() as stack, asyncio.timeout(timeout):
        children = [
            await stack.enter_async_context(_child("refresh", spec.model_dump_json()))
            for _ in range(processes)
        ]
        for child in children:
            await _expect(child, "ready")
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        reports = []
        for child in children:
            assert child.stdout is not None
            line = await child.stdout.readline()
            if not line:
                raise RuntimeError(f"a refresher died: {await _stderr(child)}")
            reports.append(RefresherReport.model_validate_json(line))
        return reports


@asynccontextmanager
async def lock_holder(path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process holding an exclusive ``flock`` on ``path`` until the block ends (or it is
    killed earlier through the yielded process)."""
    async with _child("hold", str(path)) as child:
        async with asyncio.timeout(_START_S):
            await _expect(child, "held")
        yield child


@asynccontextmanager
async def _child(mode: str, arg: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "revive.testing.refresher", mode, arg,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _expect(child: asyncio.subprocess.Process, word: str) -> None:
    assert child.stdout is not None
    line = (await child.stdout.readline()).decode().strip()
    if line != word:
        raise RuntimeError(f"expected {word!r} from a child, got {line!r}: {await _stderr(child)}")


async def _stderr(child: asyncio.subprocess.Process) -> str:
    assert child.stderr is not None
    if child.returncode is None:
        child.kill()
    return (await child.stderr.read()).decode(errors="replace")[-4000:]


# -- the child side --------------------------------------------------------------------------


async def _refresh(spec: RefresherSpec) -> RefresherReport:
    policy = (await asyncio.to_thread(load_policies, spec.policy_dir))[spec.policy]
    failures: Counter[str] = Counter()
    ok = 0
    async with aiohttp.ClientSession() as http:
        source = OAuth2Source(
            spec.connection_id, spec.source, GrantStore(spec.data_dir), policy, http
        )
        try:
            print("ready", flush=True)
            if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
                raise SystemExit("no go")
            lease: Lease | None = None
            for _ in range(spec.rounds):
                try:
                    # Passing the current lease as stale forces a token call every round.
                    lease = await source.refresh(lease)
                    ok += 1
                except CredentialError as exc:
                    failures[f"{type(exc).__name__}:{exc.provider_code}"] += 1
        finally:
            await source.close()
    return RefresherReport(ok=ok, failures=dict(failures))


def _hold(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()  # until the parent closes stdin or kills us


def main(argv: list[str]) -> int:
    """Entry point of a child: ``refresh SPEC_JSON`` or ``hold LOCK_FILE``."""
    match argv:
        case ["refresh", spec]:
            report = asyncio.run(_refresh(RefresherSpec.model_validate_json(spec)))
            print(report.model_dump_json(), flush=True)
        case ["hold", path]:
            _hold(Path(path))
        case _:
            print("usage: refresher (refresh SPEC_JSON | hold LOCK_FILE)", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
