"""Adapter stories: the fake provider, a real sidecar whose notifier calls a webhook we host.

The webhook endpoint starts before the sidecar (the sidecar's settings name its URL); each
test then mounts its runtime's receiver on it (``relay.handler``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from revive.config import WebhookNotifierConfig
from revive.lab.settings import write_secret
from revive.testing.provider import running_provider
from revive.testing.sidecar import running_sidecar
from revive.testing.story import Story, granted_lab_settings

SECRET = b"adapter-webhook-secret"
TOKEN_MARKERS = ("lab_at_", "lab_rt_")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Relay:
    """The webhook URL the sidecar notifies; forwards to the receiver a test mounts."""

    handler: Handler | None = None
    answers: list[tuple[str, int]] = field(default_factory=list)
    url: str = ""

    async def hook(self, request: web.Request) -> web.StreamResponse:
        event = request.headers.get("Revive-Event", "?")
        if self.handler is None:
            self.answers.append((event, 503))
            return web.Response(status=503)
        answer = await self.handler(request)
        self.answers.append((event, answer.status))
        return answer

    async def delivered(self, event: str, within: float = 10.0) -> None:
        """Wait until the receiver answered ``event`` with a 2xx."""
        async with asyncio.timeout(within):
            while not any(e == event and 200 <= s < 300 for e, s in self.answers):
                await asyncio.sleep(0.02)


@dataclass
class AdapterStory:
    story: Story
    relay: Relay
    secret: bytes


@pytest.fixture
async def adapter_story(tmp_path: Path) -> AsyncIterator[AdapterStory]:
    relay = Relay()
    app = web.Application()
    app.router.add_post("/hook", relay.hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    relay.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        async with running_provider() as provider:
            settings = await granted_lab_settings(provider, tmp_path / "data")
            secret = await asyncio.to_thread(
                write_secret, tmp_path / "hook-secret", SECRET.decode()
            )
            settings = settings.model_copy(update={"notifier": WebhookNotifierConfig(
                kind="webhook", url=relay.url, secret_file=secret
            )})
            async with running_sidecar(settings) as sidecar:
                token = await asyncio.to_thread(settings.admin_token_path.read_text)
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                    story = Story(provider, sidecar, http, token.strip(), tmp_path / "data")
                    yield AdapterStory(story, relay, SECRET)
    finally:
        await runner.cleanup()
