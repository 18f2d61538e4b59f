"""Issue 5: the recovery lab in a real browser (Playwright for Python + Debian's Chromium).

The sidecar is ``create_app(settings)`` with the lab sub-app mounted at ``/lab/``, started on
127.0.0.1:0 next to the fake provider. Skips when Chromium or Playwright is missing, unless
``REVIVE_REQUIRE_BROWSER=1`` (CI), where it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from revive.app import create_app, start_site
from revive.lab.settings import lab_settings, write_secret
from revive.lab.ui import create_lab_app, what_broke
from revive.testing.provider import RunningProvider, running_provider
from revive.testing.sidecar import RunningSidecar
from revive.testing.story import Story

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
WAIT_MS = 10_000


def _browser_missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    return None


def require_browser() -> None:
    reason = _browser_missing()
    if reason is None:
        return
    if os.environ.get("REVIVE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"REVIVE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@dataclass
class Lab:
    url: str  # the sidecar's base URL
    provider: RunningProvider
    admin_token: str
    sidecar: RunningSidecar
    data_dir: Path

    @property
    def page_url(self) -> str:
        return f"{self.url}/lab/"


async def _lab(tmp_path: Path, *, interactive: bool) -> AsyncIterator[Lab]:
    async with running_provider() as provider:
        grant = await provider.new_grant()
        data = tmp_path / "data"
        settings = await asyncio.to_thread(
            lab_settings, data, provider.url, refresh_token=grant["refresh_token"]
        )
        token = secrets.token_urlsafe(32)
        await asyncio.to_thread(write_secret, settings.admin_token_path, token)
        app = await asyncio.to_thread(create_app, settings)
        # Built off the loop, like create_app: add_static resolves its directory.
        lab_app = await asyncio.to_thread(
            lambda: create_lab_app(
                provider_url=provider.url, admin_token=token, interactive=interactive
            )
        )
        app.add_subapp("/lab/", lab_app)
        runner, url = await start_site(app, "127.0.0.1", 0)
        try:
            yield Lab(url, provider, token, RunningSidecar(url, app), data)
        finally:
            await runner.cleanup()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async for running in _lab(tmp_path, interactive=True):
        yield running


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Lab]:
    async for running in _lab(tmp_path, interactive=False):
        yield running


async def _launch(pw: Any) -> Any:
    return await pw.chromium.launch(
        executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
        headless=True, args=CHROMIUM_ARGS, timeout=WAIT_MS,
    )


async def _click(page: Any, name: str) -> None:
    """Click a lab control and wait until the lab says it is done."""
    from playwright.async_api import expect

    await page.get_by_role("button", name=name, exact=True).click(timeout=WAIT_MS)
    await expect(page.locator("#action-result")).to_have_text(f"{name}: done", timeout=WAIT_MS)


# -- without a browser ------------------------------------------------------------------------


async def test_lab_routes_answer_without_a_browser(lab: Lab) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(lab.page_url) as resp:
            assert resp.status == 200
            assert "Recovery incident record" in await resp.text()
            assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        for asset in ("static/lab.js", "static/lab.css"):
            async with http.get(lab.page_url + asset) as resp:
                assert resp.status == 200, asset
        async with http.get(lab.page_url + "api/state") as resp:
            state = await resp.json()
            assert state["interactive"] is True and state["cases"] == []
            assert state["demo"]["run_id"] == "run_7f2" and state["mails"] == []
        # Cross-site forms cannot drive the lab: POSTs need the lab's own header.
        async with http.post(lab.page_url + "api/run", json={}) as resp:
            assert resp.status == 403
        async with http.get(lab.page_url + "events") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            async with asyncio.timeout(5):
                first = await resp.content.readuntil(b"event: snapshot\n")
            assert b"retry:" in first


async def test_read_only_console_needs_the_admin_token(console: Lab) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(console.page_url) as resp:
            assert resp.status == 200  # the page holds no data
        async with http.get(console.page_url + "api/state") as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {console.admin_token}"}
        async with http.get(console.page_url + "api/state", headers=auth) as resp:
            state = await resp.json()
            assert state["interactive"] is False and "mails" not in state
        for path in ("api/run", "api/faults", "api/resume", "api/kill"):
            async with http.post(console.page_url + path, json={}, headers={
                **auth, "X-Revive-Lab": "1",
            }) as resp:
                assert resp.status in (404, 405), path


def test_what_broke_is_one_plain_sentence() -> None:
    sentence = what_broke({
        "provider_code": "AADSTS700082", "failure_class": "grant_dead", "generation": 1,
        "connection_id": "conn_microsoft_ops", "workflow": "Nightly executive briefing",
        "checkpoint_id": "chk-send", "action_key": "send-briefing",
    })
    assert sentence.count(".") == 0 or sentence.endswith(".")
    assert "AADSTS700082" in sentence and "Nightly executive briefing" in sentence


# -- in Chromium --------------------------------------------------------------------------------


async def test_dead_grant_story_in_the_browser(lab: Lab) -> None:
    require_browser()
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await _launch(pw)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(WAIT_MS)
            await page.goto(lab.page_url)
            await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
            # The lab starts run_7f2 up to its send: calendar read, briefing built.
            await expect(page.locator("#worker-log")).to_contain_text("waiting at chk-send")

            await _click(page, "Kill grant")
            await _click(page, "Run briefing")
            await expect(page.locator("#r-code")).to_have_text("AADSTS700082", timeout=WAIT_MS)
            await expect(page.locator("#cases")).to_contain_text("AADSTS700082")
            await expect(page.locator("#r-run")).to_have_text("run_7f2")
            await expect(page.locator("#r-workflow")).to_have_text("Nightly executive briefing")
            await expect(page.locator("#r-broke")).to_contain_text("AADSTS700082")
            await expect(page.locator("#r-message")).to_contain_text("AADSTS700082")

            async with page.expect_popup(timeout=WAIT_MS) as opened:
                await page.get_by_role("button", name="Reconnect", exact=True).click()
            consent = await opened.value
            await consent.get_by_role("button", name="Accept").click(timeout=WAIT_MS)
            await expect(consent.locator("body")).to_contain_text("Reconnected", timeout=WAIT_MS)
            await consent.close()
            await expect(page.locator("#r-state")).to_have_text("ready", timeout=WAIT_MS)

            await _click(page, "Resume")
            await expect(page.locator("#r-state")).to_have_text("closed", timeout=WAIT_MS)
            await expect(page.locator("#mail-count")).to_have_text("1", timeout=WAIT_MS)
            timeline = page.locator("#timeline tr")
            await expect(timeline.last).to_contain_text("closed")
            assert await timeline.count() >= 5  # open, reconnected, ready, resumed, closed
            await expect(page.locator("#ledger")).to_contain_text("committed")

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "lab-incident.png"), full_page=True)
        finally:
            await browser.close()
    assert len(await lab.provider.mails()) == 1


async def test_commit_then_drop_is_reconciled_and_replayed(lab: Lab) -> None:
    require_browser()
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await _launch(pw)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(WAIT_MS)
            await page.goto(lab.page_url)
            await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
            # The lab starts run_7f2 up to its send: calendar read, briefing built.
            await expect(page.locator("#worker-log")).to_contain_text("waiting at chk-send")

            await _click(page, "Commit then drop")
            await _click(page, "Run briefing")
            log = page.locator("#worker-log")
            await expect(log).to_contain_text("outcome unknown", timeout=WAIT_MS)
            send = page.locator("#runs ul.ledger li", has_text="send-briefing")
            await expect(send).to_contain_text("unknown", timeout=WAIT_MS)
            await expect(page.locator("#mail-count")).to_have_text("1")

            await _click(page, "Run briefing")  # the retry: the sidecar reconciles first
            await expect(log).to_contain_text("Revive-Replayed", timeout=WAIT_MS)
            await expect(log).to_contain_text("run complete", timeout=WAIT_MS)
            await expect(send).to_contain_text("replayed", timeout=WAIT_MS)
            await expect(send).to_contain_text("reconciled")
            await expect(page.locator("#mail-count")).to_have_text("1")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "lab-commit-then-drop.png"
            await page.screenshot(path=str(shot), full_page=True)
        finally:
            await browser.close()
    mails = await lab.provider.mails()
    assert len(mails) == 1


async def test_killed_worker_resumes_without_sending_twice(lab: Lab) -> None:
    require_browser()
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await _launch(pw)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(WAIT_MS)
            await page.goto(lab.page_url)
            log = page.locator("#worker-log")
            await expect(log).to_contain_text("waiting at chk-send", timeout=WAIT_MS)
            await _click(page, "Slow provider (3 s)")
            await _click(page, "Run briefing")
            await expect(log).to_contain_text("send-briefing at chk-send", timeout=WAIT_MS)
            await _click(page, "Kill the worker")
            await expect(log).to_contain_text("worker killed", timeout=WAIT_MS)
            # The sidecar finishes the request the dead worker started: one mail.
            await expect(page.locator("#mail-count")).to_have_text("1", timeout=WAIT_MS)
            await _click(page, "Run briefing")
            await expect(log).to_contain_text("run complete", timeout=WAIT_MS)
            await expect(page.locator("#mail-count")).to_have_text("1")
        finally:
            await browser.close()
    assert len(await lab.provider.mails()) == 1


async def test_read_only_console_in_the_browser(console: Lab) -> None:
    require_browser()
    from playwright.async_api import async_playwright, expect

    # A run whose grant dies, driven over HTTP as a worker would.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        story = Story(console.provider, console.sidecar, http, console.admin_token,
                      console.data_dir)
        capability = await story.mint()
        await console.provider.fault("kill_grant")
        parked = await story.send_briefing(capability)
        assert parked.status == 424, parked.text

    async with async_playwright() as pw:
        browser = await _launch(pw)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(WAIT_MS)
            await page.goto(console.page_url)
            await page.get_by_label("Paste the sidecar's admin token").fill(console.admin_token)
            await page.get_by_role("button", name="Open console").click()
            await expect(page.locator("#r-code")).to_have_text("AADSTS700082", timeout=WAIT_MS)
            await expect(page.locator("#mode")).to_contain_text("read-only")
            await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
            assert await page.get_by_role("button", name="Kill grant").count() == 0
            assert not await page.locator("#controls").is_visible()
            await expect(page.locator("#timeline tr")).to_have_count(1)
            # A transition made elsewhere arrives over the event stream.
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{console.url}/v1/cases/{parked.body['case_id']}/abandon",
                    json={"reason": "lab test"},
                    headers={"Authorization": f"Bearer {console.admin_token}"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
            await expect(page.locator("#r-state")).to_have_text("abandoned", timeout=WAIT_MS)
            await expect(page.locator("#timeline tr")).to_have_count(2)
        finally:
            await browser.close()
