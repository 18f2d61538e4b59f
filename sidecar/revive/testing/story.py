"""Actors of a recovery story, each talking HTTP to a real sidecar like the real one would.

Used by the recovery acceptance tests; the lab's demo drives the same routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from revive.config import Settings
from revive.lab.settings import LAB_CONNECTION, lab_settings
from revive.testing.provider import RunningProvider
from revive.testing.sidecar import RunningSidecar, running_sidecar

RUN = "run_7f2"
WORKFLOW = "Nightly executive briefing"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    text: str


@dataclass
class Story:
    """The actors of a recovery story, each talking HTTP like the real one would."""

    provider: RunningProvider
    sidecar: RunningSidecar
    http: aiohttp.ClientSession
    admin_token: str
    data_dir: Path

    async def call(self, method: str, path: str, *, token: str | None = None,
                   admin: bool = False, **kw: Any) -> Answer:
        headers = dict(kw.pop("headers", {}))
        if admin:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.sidecar.url + path, headers=headers, allow_redirects=False, **kw
        ) as resp:
            text = await resp.text()
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            return Answer(resp.status, dict(resp.headers), body, text)

    async def mint(self, epoch: int = 1, checkpoint: str = "chk-start", run: str = RUN) -> str:
        answer = await self.call(
            "POST", f"/v1/runs/{run}/capabilities",
            json={"connection_id": LAB_CONNECTION, "checkpoint_id": checkpoint, "epoch": epoch,
                  "workflow": WORKFLOW},
        )
        assert answer.status == 200, answer.text
        token: str = answer.body["capability"]
        return token

    async def graph(self, method: str, tail: str, token: str, **kw: Any) -> Answer:
        return await self.call(method, f"/proxy/{LAB_CONNECTION}/{tail}", token=token, **kw)

    async def send_briefing(self, token: str, checkpoint: str = "chk-send") -> Answer:
        return await self.graph(
            "POST", "v1.0/me/sendMail", token, json=briefing(),
            headers={"Revive-Action": "send-briefing", "Revive-Checkpoint": checkpoint},
        )

    async def reconnect(self) -> Answer:
        """The human's side of the built-in oauth2 reconnect: connect, consent, callback."""
        start = await self.call("GET", f"/v1/connections/{LAB_CONNECTION}/connect")
        assert start.status == 302, start.text
        callback = await self.provider.consent(start.headers["Location"])
        async with self.http.get(callback, allow_redirects=False) as resp:
            return Answer(resp.status, dict(resp.headers), None, await resp.text())

    async def case_reaching(self, case_id: str, state: str, within: float = 5.0) -> dict[str, Any]:
        """The case once it reaches ``state`` (the close after a commit is recorded async)."""
        async with asyncio.timeout(within):
            while True:
                detail = await self.case(case_id)
                if detail["state"] == state:
                    return detail
                await asyncio.sleep(0.02)

    async def case(self, case_id: str) -> dict[str, Any]:
        answer = await self.call("GET", f"/v1/cases/{case_id}", admin=True)
        assert answer.status == 200, answer.text
        detail: dict[str, Any] = answer.body
        return detail


def briefing() -> dict[str, Any]:
    return {
        "message": {
            "subject": WORKFLOW,
            "body": {"contentType": "Text", "content": "Three meetings, one decision."},
            "toRecipients": [{"emailAddress": {"address": "ceo@example.com"}}],
        }
    }


async def granted_lab_settings(provider: RunningProvider, data_dir: Path) -> Settings:
    """The lab's settings for ``data_dir``, seeded with a fresh grant of ``provider``."""
    grant = await provider.new_grant()
    return await asyncio.to_thread(
        lab_settings, data_dir, provider.url, refresh_token=grant["refresh_token"]
    )


@asynccontextmanager
async def story_on(
    provider: RunningProvider, settings: Settings, data_dir: Path
) -> AsyncIterator[Story]:
    """A sidecar started from ``settings`` and the actors talking to it, until the block ends.

    Entered again with the same settings, it is the same sidecar after a restart.
    """
    async with running_sidecar(settings) as sidecar:
        token = await asyncio.to_thread(settings.admin_token_path.read_text)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            yield Story(provider, sidecar, http, token.strip(), data_dir)
