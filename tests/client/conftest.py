"""Worker-library stories: the fake provider, a real sidecar on SQLite, and the actors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from revive.lab.settings import lab_settings
from revive.testing.provider import running_provider
from revive.testing.sidecar import running_sidecar
from revive.testing.story import Story


async def _story(tmp_path: Path, policy: str) -> AsyncIterator[Story]:
    async with running_provider() as provider:
        grant = await provider.new_grant()
        settings = await asyncio.to_thread(
            lab_settings, tmp_path / "data", provider.url, refresh_token=grant["refresh_token"]
        )
        if policy != "microsoft":
            conn = settings.connections[0].model_copy(update={"provider": policy})
            settings = settings.model_copy(update={"connections": [conn]})
        async with running_sidecar(settings) as sidecar:
            token = await asyncio.to_thread(settings.admin_token_path.read_text)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                yield Story(provider, sidecar, http, token.strip(), tmp_path / "data")


@pytest.fixture
async def story(tmp_path: Path) -> AsyncIterator[Story]:
    async for running in _story(tmp_path, "microsoft"):
        yield running


@pytest.fixture
async def generic_story(tmp_path: Path) -> AsyncIterator[Story]:
    """The same provider behind the generic oauth2 policy: no reconcile rule knows sendMail."""
    async for running in _story(tmp_path, "oauth2"):
        yield running
