"""The adapters' webhook receiver: it trusts only what the sidecar's notifier signed."""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from revive.adapters import SIGNATURE_HEADER, CaseEvent, ResumeGone, case_webhook, verify_signature
from revive.recovery.notify import CaseNotice, sign

SECRET = b"receiver-secret"
NOW = 1_700_000_000


def test_verifies_what_the_sidecar_signs() -> None:
    body = b'{"type":"case.ready"}'
    header = sign(SECRET, body, NOW)  # the server's own signer
    assert verify_signature(SECRET, body, header, now=NOW + 5)
    assert not verify_signature(SECRET, body + b" ", header, now=NOW + 5)
    assert not verify_signature(b"other", body, header, now=NOW + 5)
    assert not verify_signature(SECRET, body, header, now=NOW + 301)
    assert not verify_signature(SECRET, body, "t=x,v1=00", now=NOW)
    assert not verify_signature(SECRET, body, "", now=NOW)


def test_event_parses_the_notice_and_hides_the_capability() -> None:
    notice = CaseNotice(
        "case.ready", "case_1", "run_7f2", "conn", "chk-send", "send-briefing", "AADSTS700082",
        recovery_capability="eyJ.secret.cap", outcome="not_committed",
    )
    event = CaseEvent.from_json(notice.to_json())
    assert event.kind == "case.ready" and event.run_id == "run_7f2"
    assert event.recovery_capability == "eyJ.secret.cap" and event.outcome == "not_committed"
    assert "eyJ" not in repr(event)
    with pytest.raises(ValueError):
        CaseEvent.from_json({"type": "case.ready", "case_id": "case_1"})
    with pytest.raises(ValueError):
        CaseEvent.from_json(["not", "an", "object"])


class Target:
    def __init__(self) -> None:
        self.seen: list[CaseEvent] = []
        self.fail: Exception | None = None

    async def __call__(self, event: CaseEvent) -> None:
        if self.fail is not None:
            raise self.fail
        self.seen.append(event)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, Target, aiohttp.ClientSession]]:
    target = Target()
    app = web.Application()
    app.router.add_post("/hook", case_webhook(SECRET, target))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield url, target, http
    await runner.cleanup()


async def _post(
    http: aiohttp.ClientSession, url: str, event: dict[str, Any], secret: bytes = SECRET
) -> int:
    body = json.dumps(event).encode()
    headers = {SIGNATURE_HEADER: sign(secret, body, int(time.time()))}
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status


def _ready(capability: str = "eyJ.cap.1") -> dict[str, Any]:
    return {"type": "case.ready", "case_id": "case_1", "run_id": "run_7f2",
            "recovery_capability": capability}


async def test_receiver_answers(receiver: tuple[str, Target, aiohttp.ClientSession]) -> None:
    url, target, http = receiver
    assert await _post(http, url, _ready(), secret=b"forged") == 401
    async with http.post(url, data=b"{}") as unsigned:
        assert unsigned.status == 401
    assert await _post(http, url, {"type": "case.ready"}) == 400
    assert await _post(http, url, {**_ready(), "type": "case.opened"}) == 204
    assert target.seen == []

    target.fail = RuntimeError("temporal unreachable")
    assert await _post(http, url, _ready()) == 503  # the sidecar retries
    target.fail = ResumeGone("finished")
    assert await _post(http, url, _ready()) == 410  # the sidecar gives up
    target.fail = None
    assert await _post(http, url, _ready()) == 204
    assert await _post(http, url, _ready()) == 204  # a retried delivery...
    assert len(target.seen) == 1  # ...is handed over once
    assert await _post(http, url, _ready("eyJ.cap.2")) == 204  # a re-issued capability is new
    assert [e.recovery_capability for e in target.seen] == ["eyJ.cap.1", "eyJ.cap.2"]


@pytest.mark.parametrize(
    "name", ["revive.adapters", "revive.adapters.temporal", "revive.adapters.langgraph"]
)
def test_all_names_resolve(name: str) -> None:
    module = importlib.import_module(name)
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr}"


def test_adapters_import_no_server_module() -> None:
    import ast
    from pathlib import Path

    import revive.adapters

    root = Path(revive.adapters.__file__).parent
    allowed = ("revive.adapters", "revive.client")
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [node.module or ""] if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            )
            for name in names:
                if name == "revive" or name.startswith("revive."):
                    assert name.startswith(allowed), f"{path.name} imports {name}"
