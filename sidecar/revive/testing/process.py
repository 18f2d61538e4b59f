"""A sidecar in its own process (``revive serve``), for crash and multi-sidecar tests."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import yaml

from revive.config import Settings

_URL = re.compile(r"(http://127\.0\.0\.1:\d+)")


def write_config(settings: Settings, path: Path) -> Path:
    """Settings as the YAML file an operator would write (blocking: call it off the loop)."""
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return path


@asynccontextmanager
async def sidecar_process(
    config: Path, stderr: Path | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Start ``revive serve --config`` and yield the process and its URL; kill it on exit.

    Args:
        stderr: a file to collect the sidecar's log (JSON lines) in; discarded when None.
    """
    log = open(stderr, "ab") if stderr is not None else None  # noqa: SIM115 - closed below
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "revive.cli", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=log if log is not None else asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        found = _URL.search(line)
        if found is None:
            raise RuntimeError(f"the sidecar did not start: {line!r}")
        yield proc, found.group(1)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if log is not None:
            log.close()
