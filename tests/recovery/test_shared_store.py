"""Issue #6 acceptance: several sidecar processes, one PostgreSQL store, one truth."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp

from revive.lab.settings import LAB_CONNECTION, lab_settings
from revive.testing.process import sidecar_process, write_config
from revive.testing.provider import RunningProvider, running_provider
from revive.testing.story import RUN, briefing

SEND = {"Revive-Action": "send-briefing", "Revive-Checkpoint": "chk-send"}


async def _json(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.request(method, url, allow_redirects=False, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


async def _config(tmp_path: Path, provider: RunningProvider, store: str) -> Path:
    grant = await provider.new_grant()
    settings = await asyncio.to_thread(
        lab_settings, tmp_path / "data", provider.url, refresh_token=grant["refresh_token"]
    )
    # Both sidecars share the signing keys and the admin token (a Kubernetes Secret would
    # mount the same files into every pod) and the PostgreSQL store.
    settings = settings.model_copy(update={"store": store})
    return await asyncio.to_thread(write_config, settings, tmp_path / "revive.yaml")


async def _admin_token(tmp_path: Path) -> str:
    return (await asyncio.to_thread((tmp_path / "data" / "admin-token").read_text)).strip()


async def _reconnect(http: aiohttp.ClientSession, url: str, provider: RunningProvider) -> None:
    async with http.get(f"{url}/v1/connections/{LAB_CONNECTION}/connect",
                        allow_redirects=False) as resp:
        assert resp.status == 302
        authorize = resp.headers["Location"]
    callback = await provider.consent(authorize)
    async with http.get(callback) as resp:
        assert resp.status == 200, await resp.text()


async def test_run_7f2_survives_its_sidecar(tmp_path: Path, postgres_url: str) -> None:
    async with running_provider() as provider, aiohttp.ClientSession() as http:
        config = await _config(tmp_path, provider, postgres_url)
        async with sidecar_process(config) as (proc_a, a), sidecar_process(config) as (_, b):
            admin = {"Authorization": f"Bearer {await _admin_token(tmp_path)}"}
            status, minted = await _json(
                http, "POST", f"{a}/v1/runs/{RUN}/capabilities",
                json={"connection_id": LAB_CONNECTION, "checkpoint_id": "chk-cal", "epoch": 1},
            )
            assert status == 200
            old = {"Authorization": f"Bearer {minted['capability']}"}
            status, _ = await _json(http, "GET", f"{a}/proxy/{LAB_CONNECTION}/v1.0/me/events",
                                    headers=old)
            assert status == 200
            await provider.fault("kill_grant")
            status, problem = await _json(
                http, "POST", f"{a}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail",
                json=briefing(), headers={**old, **SEND},
            )
            assert status == 424
            proc_a.send_signal(signal.SIGKILL)  # the worker's pod dies with its sidecar
            await proc_a.wait()

            await _reconnect(http, b, provider)
            status, case = await _json(http, "GET", f"{b}/v1/cases/{problem['case_id']}",
                                       headers=admin)
            assert status == 200 and case["state"] == "ready"
            status, issued = await _json(
                http, "POST", f"{b}/v1/cases/{problem['case_id']}/capability",
                json={}, headers=admin,
            )
            assert status == 200
            status, redeemed = await _json(http, "POST", f"{b}/v1/capabilities/redeem",
                                           json={"capability": issued["capability"]})
            assert status == 200 and redeemed["epoch"] == 2
            new = {"Authorization": f"Bearer {redeemed['capability']}"}
            async with http.post(f"{b}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail",
                                 json=briefing(), headers={**new, **SEND}) as resp:
                assert resp.status == 202

            # A's replacement comes up; a stale worker still holding epoch 1 talks to it.
            async with sidecar_process(config) as (_, a2):
                for method, tail, extra in (
                    ("GET", "v1.0/me", {}),
                    ("POST", "v1.0/me/sendMail", {"json": briefing(), "headers": {**old, **SEND}}),
                ):
                    kw = extra or {"headers": old}
                    status, body = await _json(http, method, f"{a2}/proxy/{LAB_CONNECTION}/{tail}",
                                               **kw)
                    assert status == 409 and body["type"] == "urn:revive:fenced", body
        assert len(await provider.mails()) == 1


async def test_fifty_redemptions_over_two_sidecars_one_wins(
    tmp_path: Path, postgres_url: str
) -> None:
    async with running_provider() as provider, aiohttp.ClientSession() as http:
        config = await _config(tmp_path, provider, postgres_url)
        async with sidecar_process(config) as (_, a), sidecar_process(config) as (_, b):
            admin = {"Authorization": f"Bearer {await _admin_token(tmp_path)}"}
            status, minted = await _json(
                http, "POST", f"{a}/v1/runs/run_fifty/capabilities",
                json={"connection_id": LAB_CONNECTION, "checkpoint_id": "c", "epoch": 1},
            )
            await provider.fault("kill_grant")
            status, problem = await _json(
                http, "POST", f"{a}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail", json=briefing(),
                headers={"Authorization": f"Bearer {minted['capability']}", **SEND},
            )
            assert status == 424
            await _reconnect(http, b, provider)
            status, issued = await _json(
                http, "POST", f"{a}/v1/cases/{problem['case_id']}/capability",
                json={}, headers=admin,
            )
            body = {"capability": issued["capability"]}
            answers = await asyncio.gather(*(
                _json(http, "POST", f"{(a, b)[n % 2]}/v1/capabilities/redeem", json=body)
                for n in range(50)
            ))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] + [401] * 49


async def test_a_running_sidecar_sees_another_ones_redemption_within_a_second(
    tmp_path: Path, postgres_url: str
) -> None:
    """Reads are fenced from a per-sidecar cache (1 s TTL); it must not outlive a recovery."""
    async with running_provider() as provider, aiohttp.ClientSession() as http:
        config = await _config(tmp_path, provider, postgres_url)
        async with sidecar_process(config) as (_, a), sidecar_process(config) as (_, b):
            admin = {"Authorization": f"Bearer {await _admin_token(tmp_path)}"}
            status, minted = await _json(
                http, "POST", f"{a}/v1/runs/run_cache/capabilities",
                json={"connection_id": LAB_CONNECTION, "checkpoint_id": "c", "epoch": 1},
            )
            old = {"Authorization": f"Bearer {minted['capability']}"}
            status, _ = await _json(http, "GET", f"{a}/proxy/{LAB_CONNECTION}/v1.0/me", headers=old)
            assert status == 200  # A now holds epoch 1 in its fence cache
            await provider.fault("kill_grant")
            status, problem = await _json(
                http, "POST", f"{a}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail", json=briefing(),
                headers={**old, **SEND},
            )
            await _reconnect(http, b, provider)
            status, issued = await _json(
                http, "POST", f"{b}/v1/cases/{problem['case_id']}/capability",
                json={}, headers=admin,
            )
            status, redeemed = await _json(http, "POST", f"{b}/v1/capabilities/redeem",
                                           json={"capability": issued["capability"]})
            assert status == 200
            await asyncio.sleep(1.1)
            status, body = await _json(http, "GET", f"{a}/proxy/{LAB_CONNECTION}/v1.0/me",
                                       headers=old)
            assert status == 409 and body["type"] == "urn:revive:fenced"
