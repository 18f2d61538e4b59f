"""The notifier: signed webhooks when a case opens and when it is ready to resume."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from revive.config import WebhookNotifierConfig
from revive.lab.settings import write_secret
from revive.recovery.notify import SIGNATURE_HEADER, CaseNotice, WebhookNotifier, sign, verify
from revive.testing.provider import running_provider
from revive.testing.story import granted_lab_settings, story_on

SECRET = b"webhook-secret-for-tests"


def test_signature_round_trip_and_refusals() -> None:
    body = b'{"type":"case.opened"}'
    header = sign(SECRET, body, 1_700_000_000)
    assert verify(SECRET, body, header, now=1_700_000_010)
    assert not verify(SECRET, body + b" ", header, now=1_700_000_010)  # tampered body
    assert not verify(b"other", body, header, now=1_700_000_010)  # wrong secret
    assert not verify(SECRET, body, header, now=1_700_000_000 + 3600)  # replayed late
    assert not verify(SECRET, body, "garbage", now=1_700_000_000)


class Receiver:
    """A webhook endpoint that fails the first ``failures`` deliveries."""

    def __init__(self, failures: int = 0, status: int = 503) -> None:
        self.failures, self.status = failures, status
        self.events: list[dict[str, Any]] = []
        self.attempts = 0
        self.verified: list[bool] = []
        self.app = web.Application()
        self.app.router.add_post("/hook", self.hook)
        self.url = ""

    async def hook(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        self.verified.append(
            verify(SECRET, body, request.headers.get(SIGNATURE_HEADER, ""), now=time.time())
        )
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=self.status)
        self.events.append(json.loads(body))
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    runner = web.AppRunner(rec.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield rec
    await runner.cleanup()


def _notice() -> CaseNotice:
    return CaseNotice("case.opened", "case_1", "run_7f2", "conn", "chk", "send", "AADSTS700082")


async def test_webhook_retries_then_delivers(receiver: Receiver) -> None:
    receiver.failures = 2
    delays: list[float] = []

    async def no_sleep(delay: float) -> None:
        delays.append(delay)

    async with aiohttp.ClientSession() as http:
        notifier = WebhookNotifier(receiver.url, SECRET, http, sleep=no_sleep)
        assert await notifier.notify(_notice())
    assert receiver.attempts == 3 and len(receiver.events) == 1
    assert all(receiver.verified)
    assert len(delays) == 2 and delays[1] > delays[0] * 0.5  # backing off


async def test_webhook_gives_up_on_a_refusal(receiver: Receiver) -> None:
    receiver.failures, receiver.status = 10, 400

    async def no_sleep(delay: float) -> None:
        return None

    async with aiohttp.ClientSession() as http:
        notifier = WebhookNotifier(receiver.url, SECRET, http, sleep=no_sleep)
        assert not await notifier.notify(_notice())
    assert receiver.attempts == 1  # a 4xx is an answer: asking again changes nothing


async def test_the_runtime_resumes_from_the_notifier_alone(
    tmp_path: Path, receiver: Receiver
) -> None:
    async with running_provider() as provider:
        settings = await granted_lab_settings(provider, tmp_path / "data")
        secret = await asyncio.to_thread(write_secret, tmp_path / "hook-secret", SECRET.decode())
        settings = settings.model_copy(update={"notifier": WebhookNotifierConfig(
            kind="webhook", url=receiver.url, secret_file=secret
        )})
        async with story_on(provider, settings, tmp_path / "data") as story:
            run_token = await story.mint()
            await provider.fault("kill_grant")
            failed = await story.send_briefing(run_token)
            assert failed.status == 424
            case_id = failed.body["case_id"]
            async with asyncio.timeout(10):
                while not receiver.events:
                    await asyncio.sleep(0.02)
            opened = receiver.events[0]
            assert opened["type"] == "case.opened" and opened["case_id"] == case_id
            assert opened["reconnect_url"].endswith(
                "/v1/connections/conn_microsoft_ops/connect"
            )
            assert opened["recovery_capability"] is None
            assert (await story.case_reaching(case_id, "awaiting_reconnect"))["state"]

            assert (await story.reconnect()).status == 200
            async with asyncio.timeout(10):
                while len(receiver.events) < 2:
                    await asyncio.sleep(0.02)
            ready = receiver.events[1]
            assert ready["type"] == "case.ready" and ready["recovery_capability"]
            # The runtime needs nothing but the notification to resume the same run.
            redeemed = await story.call(
                "POST", "/v1/capabilities/redeem",
                json={"capability": ready["recovery_capability"]},
            )
            assert redeemed.status == 200 and redeemed.body["epoch"] == 2
            sent = await story.send_briefing(redeemed.body["capability"])
            assert sent.status == 202
            await story.case_reaching(case_id, "closed")
        assert len(await provider.mails()) == 1
        assert all(receiver.verified)
        for event in receiver.events:
            assert "lab_at_" not in json.dumps(event) and "lab_rt_" not in json.dumps(event)
