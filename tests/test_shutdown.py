"""Issue #8 acceptance: SIGTERM during a 32-connection load settles every request."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp

from revive.lab.settings import LAB_CONNECTION, lab_settings
from revive.testing.process import sidecar_process, write_config
from revive.testing.provider import running_provider
from revive.testing.story import briefing


def _states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM actions GROUP BY state").fetchall())


async def test_sigterm_under_load_leaves_nothing_in_flight(tmp_path: Path) -> None:
    async with running_provider() as provider:
        grant = await provider.new_grant()
        settings = await asyncio.to_thread(
            lab_settings, tmp_path / "data", provider.url, refresh_token=grant["refresh_token"]
        )
        config = await asyncio.to_thread(write_config, settings, tmp_path / "revive.yaml")
        # Every provider answer takes 150 ms, so requests are in flight when the signal lands.
        await provider.fault("latency", ms=150)
        outcomes: dict[str, int] = {"completed": 0, "clean_error": 0}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with sidecar_process(config) as (proc, url):
                async with http.post(
                    f"{url}/v1/runs/run_load/capabilities",
                    json={"connection_id": LAB_CONNECTION, "checkpoint_id": "c", "epoch": 1},
                ) as resp:
                    token = (await resp.json())["capability"]

                async def worker(n: int) -> None:
                    for i in range(1000):
                        headers = {"Authorization": f"Bearer {token}",
                                   "Revive-Action": f"send-{n}-{i}"}
                        try:
                            async with http.post(
                                f"{url}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail",
                                json=briefing(), headers=headers,
                            ) as resp:
                                await resp.read()
                                assert resp.status in (202, 503), resp.status
                                outcomes["completed"] += 1
                        except aiohttp.ClientConnectionError:
                            outcomes["clean_error"] += 1
                            return  # the sidecar is gone; this worker is done

                load = [asyncio.create_task(worker(n)) for n in range(32)]
                await asyncio.sleep(1.0)
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    code = await proc.wait()
                stopped_in = time.monotonic() - started
                async with asyncio.timeout(30):
                    await asyncio.gather(*load)
        assert code == 0
        assert stopped_in < 15  # inside a pod's grace period
        assert outcomes["completed"] > 32
        states = await asyncio.to_thread(_states, tmp_path / "data" / "revive.db")
        assert "in_flight" not in states, states
        # Every mail the provider sent is on record as committed (nothing lost, nothing twice).
        assert states.get("committed", 0) == len(await provider.mails())
