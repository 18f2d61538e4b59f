"""The ``revive`` console script run as an operator runs it: a real process, bounded in time."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

__all__ = ["CliResult", "run_cli"]


@dataclass(frozen=True)
class CliResult:
    """Exit code and output of one ``revive`` command."""

    code: int
    stdout: str
    stderr: str


async def run_cli(*args: str, within: float = 60.0) -> CliResult:
    """Run ``python -m revive.cli ARGS`` to completion; killed if it outlasts ``within`` s."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "revive.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())
