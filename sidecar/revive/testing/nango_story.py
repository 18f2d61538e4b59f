"""The run_7f2 story with the grant held by Nango: the fake provider behind the fake Nango.

The sidecar's one connection (``conn_microsoft_ops``) uses the ``nango`` source; the fake Nango
holds a real grant of the fake Microsoft provider, refreshes it at the provider's token
endpoint and sends its signed webhooks to the sidecar's ``/v1/webhooks/nango``. The actors
are those of :class:`revive.testing.story.Story`; the human's reconnect happens in Nango's
connect UI instead of the sidecar's own oauth2 flow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from revive.config import ConnectionConfig, NangoSourceConfig, Settings
from revive.lab.settings import LAB_CONNECTION, default_policy_dir, write_secret
from revive.testing.fake_nango import FakeNango, UpstreamOAuth, running_fake_nango
from revive.testing.provider import RunningProvider, running_provider
from revive.testing.sidecar import running_sidecar
from revive.testing.story import Answer, Story

__all__ = [
    "NANGO_CONNECTION",
    "NANGO_INTEGRATION",
    "NangoStory",
    "nango_settings",
    "running_nango_story",
]

NANGO_CONNECTION = "ops-mailbox"
"""Nango's id of the connection (Revive calls it ``conn_microsoft_ops``)."""

NANGO_INTEGRATION = "microsoft"
"""Nango's integration (``providerConfigKey``)."""

SIGNING_KEY = "nango-webhook-signing-key-story-7f2"
SECRET_KEY = "nango-secret-key-story-7f2"


@dataclass
class NangoStory:
    """The story's actors plus the fake Nango and the key it signs webhooks with."""

    story: Story
    nango: FakeNango
    signing_key: str

    @property
    def webhook_url(self) -> str:
        return f"{self.story.sidecar.url}/v1/webhooks/nango"

    async def reconnect_in_nango(self) -> Answer:
        """The human in Nango's connect UI: Nango → provider consent → Nango's callback.

        Nango then exchanges the code and POSTs the signed ``override`` webhook by itself;
        ``nango.webhooks[-1]`` holds the sidecar's answer to it.
        """
        http = self.story.http
        start = self.nango.connect_url(NANGO_INTEGRATION, NANGO_CONNECTION)
        async with http.get(start, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            authorize = resp.headers["Location"]
        callback = await self.story.provider.consent(authorize)
        async with http.get(callback, allow_redirects=False) as resp:
            return Answer(resp.status, dict(resp.headers), None, await resp.text())


def nango_settings(data_dir: Path, provider_url: str, nango_url: str) -> Settings:
    """A sidecar whose ``conn_microsoft_ops`` leases from Nango (blocking: writes key files)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return Settings(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        policy_dir=default_policy_dir(),
        connections=[
            ConnectionConfig(
                id=LAB_CONNECTION,
                provider="microsoft",
                base_url=provider_url,
                allowed_hosts=["127.0.0.1"],
                source=NangoSourceConfig(
                    kind="nango",
                    base_url=nango_url,
                    secret_key_file=write_secret(data_dir / "nango-secret-key", SECRET_KEY),
                    webhook_secret_file=write_secret(data_dir / "nango-signing-key", SIGNING_KEY),
                    connection_id=NANGO_CONNECTION,
                    provider_config_key=NANGO_INTEGRATION,
                ),
            )
        ],
    )


async def _upstream(nango: FakeNango, provider: RunningProvider) -> None:
    config = provider.config
    nango.upstreams[NANGO_INTEGRATION] = UpstreamOAuth(
        token_url=provider.token_url,
        authorize_url=provider.authorize_url,
        client_id=config.client_id,
        client_secret=config.client_secret,
        scopes=("offline_access", "Mail.Send", "Calendars.Read"),
    )
    grant = await provider.new_grant()
    nango.add_upstream_connection(
        NANGO_CONNECTION, NANGO_INTEGRATION, refresh_token=grant["refresh_token"],
        access_token=grant["access_token"], expires_in=float(grant["expires_in"]),
    )


@asynccontextmanager
async def running_nango_story(tmp_path: Path) -> AsyncIterator[NangoStory]:
    """Provider, fake Nango (upstream mode) and a sidecar on SQLite; all stopped on exit."""
    async with running_provider() as provider, running_fake_nango(SECRET_KEY) as nango:
        await _upstream(nango, provider)
        nango.webhook_signing_key = SIGNING_KEY
        data_dir = tmp_path / "data"
        settings = await asyncio.to_thread(nango_settings, data_dir, provider.url, nango.url)
        async with running_sidecar(settings) as sidecar:
            nango.webhook_url = f"{sidecar.url}/v1/webhooks/nango"
            token = await asyncio.to_thread(settings.admin_token_path.read_text)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                story = Story(provider, sidecar, http, token.strip(), data_dir)
                yield NangoStory(story, nango, SIGNING_KEY)
