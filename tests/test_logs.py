"""Issue #8: one JSON event per line, tied to its request, trace, run and case; no secret."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from revive.lab.settings import LAB_CONNECTION, lab_settings
from revive.testing.process import sidecar_process, write_config
from revive.testing.provider import running_provider
from revive.testing.story import briefing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.")


async def _json(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.request(method, url, allow_redirects=False, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_logs_of_a_whole_story_are_structured_and_clean(tmp_path: Path) -> None:
    log = tmp_path / "sidecar.log"
    async with running_provider() as provider, aiohttp.ClientSession() as http:
        grant = await provider.new_grant()
        settings = await asyncio.to_thread(
            lab_settings, tmp_path / "data", provider.url, refresh_token=grant["refresh_token"]
        )
        config = await asyncio.to_thread(write_config, settings, tmp_path / "revive.yaml")
        async with sidecar_process(config, stderr=log) as (_, url):
            admin_token = (await asyncio.to_thread(settings.admin_token_path.read_text)).strip()
            admin = {"Authorization": f"Bearer {admin_token}"}
            _, minted = await _json(
                http, "POST", f"{url}/v1/runs/run_7f2/capabilities",
                json={"connection_id": LAB_CONNECTION, "checkpoint_id": "c", "epoch": 1},
            )
            worker = {"Authorization": f"Bearer {minted['capability']}", "traceparent": TRACEPARENT,
                      "Revive-Action": "send-briefing"}
            await provider.fault("kill_grant")
            status, problem = await _json(
                http, "POST", f"{url}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail",
                json=briefing(), headers=worker,
            )
            assert status == 424
            async with http.get(f"{url}/v1/connections/{LAB_CONNECTION}/connect",
                                allow_redirects=False) as resp:
                callback = await provider.consent(resp.headers["Location"])
            async with http.get(callback) as resp:
                assert resp.status == 200
            _, issued = await _json(http, "POST", f"{url}/v1/cases/{problem['case_id']}/capability",
                                    json={}, headers=admin)
            _, redeemed = await _json(http, "POST", f"{url}/v1/capabilities/redeem",
                                      json={"capability": issued["capability"]})
            resumed = {**worker, "Authorization": f"Bearer {redeemed['capability']}"}
            async with http.post(f"{url}/proxy/{LAB_CONNECTION}/v1.0/me/sendMail",
                                 json=briefing(), headers=resumed) as resp:
                assert resp.status == 202
            await asyncio.sleep(0.3)  # the close is recorded beside the answer
        text = await asyncio.to_thread(log.read_text)

    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert events, "the sidecar logged nothing"
    opened = [e for e in events if "opened" in e["msg"]]
    assert opened and opened[0]["case_id"] == problem["case_id"]
    assert opened[0]["run_id"] == "run_7f2" and opened[0]["trace_id"] == TRACE
    assert opened[0]["request_id"].startswith("req-")
    moves = [e["msg"] for e in events if e.get("case_id") == problem["case_id"] and "->" in e["msg"]]
    assert any("resumed -> closed" in m for m in moves), moves
    for secret in ("lab_at_", "lab_rt_", "lab_code_", admin_token):
        assert secret not in text
    assert JWT.search(text) is None
