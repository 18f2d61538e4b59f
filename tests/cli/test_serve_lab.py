"""The console script as an operator runs it: real processes, real signals."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]
URL = re.compile(r"(http://127\.0\.0\.1:\d+)")


@asynccontextmanager
async def revive(*args: str, cwd: Path = REPO) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "revive.cli", *args,
        cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _line_matching(proc: asyncio.subprocess.Process, needle: str) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, f"process ended before printing {needle!r}"
            if needle in line:
                return line


async def test_lab_starts_provider_and_sidecar_and_stops_on_ctrl_c() -> None:
    async with revive("lab", "--port", "0") as proc:
        provider = URL.search(await _line_matching(proc, "fake provider"))
        sidecar = URL.search(await _line_matching(proc, "revive sidecar on"))
        assert provider and sidecar
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{sidecar.group(1)}/v1/runs/run_7f2/capabilities",
                json={"connection_id": "conn_microsoft_ops", "checkpoint_id": "c1", "epoch": 1},
            ) as resp:
                assert resp.status == 200
                capability = (await resp.json())["capability"]
            async with http.get(
                f"{sidecar.group(1)}/proxy/conn_microsoft_ops/v1.0/me",
                headers={"Authorization": f"Bearer {capability}"},
            ) as resp:
                assert resp.status == 200
                assert "lab_at_" not in await resp.text()
            async with http.get(f"{provider.group(1)}/_lab/calls") as resp:
                assert any(c["path"] == "/v1.0/me" and c["token_valid"] for c in await resp.json())
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


async def test_serve_runs_until_sigterm(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"access_token": "t"}')
    config = tmp_path / "revive.yaml"
    config.write_text(
        f"listen: 127.0.0.1:0\ndata_dir: {tmp_path}/data\npolicy_dir: {REPO}/policies\n"
        "connections:\n  - id: c1\n    provider: oauth2\n    base_url: http://127.0.0.1:9\n"
        f"    source: {{kind: static, tokens_file: {tokens}}}\n"
    )
    async with revive("serve", "--config", str(config)) as proc:
        url = URL.search(await _line_matching(proc, "listening on"))
        assert url
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url.group(1)}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"{url.group(1)}/nope") as resp:
                assert resp.status == 404
                assert (await resp.json())["type"] == "urn:revive:not-found"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


async def test_serve_with_a_bad_field_names_file_field_and_reason(tmp_path: Path) -> None:
    config = tmp_path / "revive.yaml"
    config.write_text("listen: 127.0.0.1:0\nconnections:\n  - id: c1\n    provider: oauth2\n"
                      "    base_url: gopher://x\n    source: {kind: static, tokens_file: t}\n")
    async with revive("serve", "--config", str(config)) as proc:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    text = err.decode()
    assert str(config) in text and "connections[0].base_url" in text and "http" in text
