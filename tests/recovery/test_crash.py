"""Issue #3 acceptance: a sidecar SIGKILLed between the provider's commit and the ledger's.

The provider records the mail and holds its answer; the sidecar dies with the claim still
``in_flight``. The restarted sidecar sweeps its own stale claim to ``unknown``; the worker's
retry makes the sidecar ask the provider (reconcile), which finds the mail: the retry is
answered from the ledger and the mail is not sent twice.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import aiohttp

from revive.lab.settings import LAB_CONNECTION, lab_settings
from revive.testing.provider import running_provider
from revive.testing.process import sidecar_process, write_config
from revive.testing.story import briefing

SEND = {"Revive-Action": "send-briefing", "Revive-Checkpoint": "chk-send"}


def _action_states(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT state FROM actions")]


async def test_sigkill_between_provider_commit_and_ledger(tmp_path: Path) -> None:
    async with running_provider() as provider:
        grant = await provider.new_grant()
        settings = await asyncio.to_thread(
            lab_settings, tmp_path / "data", provider.url, refresh_token=grant["refresh_token"]
        )
        config = await asyncio.to_thread(write_config, settings, tmp_path / "revive.yaml")
        db = tmp_path / "data" / "revive.db"

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with sidecar_process(config) as (proc, url):
                async with http.post(
                    f"{url}/v1/runs/run_7f2/capabilities",
                    json={"connection_id": LAB_CONNECTION, "checkpoint_id": "c", "epoch": 1},
                ) as resp:
                    token = (await resp.json())["capability"]
                auth = {"Authorization": f"Bearer {token}", **SEND}
                await provider.fault("commit_then_stall", ms=5000)
                send = asyncio.create_task(
                    http.post(f"{url}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail",
                              json=briefing(), headers=auth)
                )
                async with asyncio.timeout(10):
                    while not await provider.mails():
                        await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                try:
                    (await send).close()
                except aiohttp.ClientError:
                    pass  # the sidecar died mid-request, as intended
            assert await asyncio.to_thread(_action_states, db) == ["in_flight"]

            async with sidecar_process(config) as (proc, url):
                assert await asyncio.to_thread(_action_states, db) == ["unknown"]
                async with http.post(
                    f"{url}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail", json=briefing(), headers=auth
                ) as resp:
                    assert resp.status == 202, await resp.text()
                    assert resp.headers["Revive-Replayed"] == "true"
                assert await asyncio.to_thread(_action_states, db) == ["committed"]
                proc.send_signal(signal.SIGTERM)
        assert len(await provider.mails()) == 1
