"""Test helper: run the fake Microsoft provider on an ephemeral port and drive its control API.

The helpers go through ``/_lab/...`` over HTTP rather than poking ``ProviderState``, so a
test exercises the same routes the lab UI uses; ``state`` stays available for assertions
that the API does not expose.

    async with running_provider() as provider:
        grant = await provider.new_grant()
        await provider.fault("kill_grant")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from revive.lab.provider import PROVIDER_STATE, ProviderConfig, ProviderState, start_provider

__all__ = ["RunningProvider", "running_provider"]

_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass
class RunningProvider:
    """A started provider: its base URL, its state and control-API shortcuts."""

    url: str
    state: ProviderState
    session: aiohttp.ClientSession

    @property
    def config(self) -> ProviderConfig:
        """The provider's configuration."""
        return self.state.config

    @property
    def token_url(self) -> str:
        """``{url}/{tenant}/oauth2/v2.0/token``."""
        return f"{self.url}/{self.config.tenant}/oauth2/v2.0/token"

    @property
    def authorize_url(self) -> str:
        """``{url}/{tenant}/oauth2/v2.0/authorize``."""
        return f"{self.url}/{self.config.tenant}/oauth2/v2.0/authorize"

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        async with self.session.request(method, self.url + path, **kw) as resp:
            body = await resp.json()
            if resp.status >= 400:
                raise AssertionError(f"{method} {path} -> {resp.status}: {body}")
            return body

    async def fault(self, kind: str, **kw: Any) -> dict[str, Any]:
        """Arm a fault, e.g. ``fault("unavailable", count=2, retry_after=1)``."""
        result: dict[str, Any] = await self._json(
            "POST", "/_lab/faults", json={"fault": kind, **kw}
        )
        return result

    async def clear_faults(self) -> None:
        """``DELETE /_lab/faults``."""
        await self._json("DELETE", "/_lab/faults")

    async def mails(self) -> list[dict[str, Any]]:
        """Every mail that actually went out."""
        result: list[dict[str, Any]] = await self._json("GET", "/_lab/mails")
        return result

    async def calls(self, path_prefix: str | None = None) -> list[dict[str, Any]]:
        """The request log, optionally only paths starting with ``path_prefix``."""
        params = {"path_prefix": path_prefix} if path_prefix else None
        result: list[dict[str, Any]] = await self._json("GET", "/_lab/calls", params=params)
        return result

    async def token_calls(self) -> list[dict[str, Any]]:
        """Only the token-endpoint calls."""
        return await self.calls(f"/{self.config.tenant}/oauth2/v2.0/token")

    async def new_grant(self, scope: str | None = None) -> dict[str, Any]:
        """Mint a live grant: ``{"refresh_token", "access_token", "expires_in"}``."""
        body = {"scope": scope} if scope else {}
        result: dict[str, Any] = await self._json("POST", "/_lab/grants", json=body)
        return result

    async def consent(self, authorize_url: str, decision: str = "accept") -> str:
        """Play the human on the consent page; return where the provider redirects back to."""
        async with self.session.get(authorize_url, allow_redirects=False) as page:
            if page.status != 200:
                raise AssertionError(f"consent page -> {page.status}: {await page.text()}")
        url = URL(authorize_url)
        form = {**url.query, "consent": decision}
        async with self.session.post(url.with_query(None), data=form, allow_redirects=False) as resp:
            if resp.status != 302:
                raise AssertionError(f"consent -> {resp.status}: {await resp.text()}")
            return resp.headers["Location"]

    async def reset(self) -> None:
        """Forget everything."""
        await self._json("POST", "/_lab/reset")


@asynccontextmanager
async def running_provider(config: ProviderConfig | None = None) -> AsyncIterator[RunningProvider]:
    """Start the provider on 127.0.0.1 port 0; stop it and close the session on exit."""
    runner, url = await start_provider("127.0.0.1", 0, config)
    try:
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
            yield RunningProvider(url=url, state=runner.app[PROVIDER_STATE], session=session)
    finally:
        await runner.cleanup()
