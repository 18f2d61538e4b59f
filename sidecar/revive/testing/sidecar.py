"""A real sidecar on an ephemeral loopback port, for tests and the lab."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from revive.app import SERVICE, create_app, start_site
from revive.config import Settings


@dataclass(frozen=True, slots=True)
class RunningSidecar:
    url: str
    app: web.Application

    def proxy(self, connection_id: str, tail: str) -> str:
        return f"{self.url}/proxy/{connection_id}/{tail.lstrip('/')}"

    async def capability(
        self, connection_id: str, run_id: str = "run_test", checkpoint_id: str = "chk-1",
        epoch: int = 1,
    ) -> str:
        """Mint a run capability in-process, as ``POST /v1/runs/{run}/capabilities`` would."""
        minted = await self.app[SERVICE].mint_run_capability(
            run_id, connection_id, checkpoint_id, epoch
        )
        return minted.token


@asynccontextmanager
async def running_sidecar(settings: Settings) -> AsyncIterator[RunningSidecar]:
    """Start ``create_app(settings)`` on 127.0.0.1:0 and stop it afterwards, whatever happens."""
    # Policy files are read at build time; off the loop, as in production start-up.
    app = await asyncio.to_thread(create_app, settings)
    runner, url = await start_site(app, "127.0.0.1", 0)
    try:
        yield RunningSidecar(url, app)
    finally:
        await runner.cleanup()
