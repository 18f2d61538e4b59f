"""The data plane end to end: a real sidecar in front of the real fake provider.

Every test talks HTTP to servers on ephemeral loopback ports. The fake provider's tokens
start with ``lab_at_`` / ``lab_rt_``, so "no token reaches the worker" is a substring check.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from revive.config import ConnectionConfig, LimitsConfig, StaticSourceConfig
from revive.lab.settings import LAB_CONNECTION, lab_settings
from revive.testing.provider import RunningProvider
from revive.testing.sidecar import RunningSidecar, running_sidecar

CANARY = "canary-static-token-7f2e91"
TOKEN_MARKERS = ("lab_at_", "lab_rt_", CANARY)
PROBLEM = "application/problem+json"
SEND = {"Revive-Action": "send-briefing"}
UPLOAD = {"Revive-Action": "upload"}


class Echo:
    """A plain upstream that records what reached it (and never echoes a credential)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.flaky = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
        tail = request.match_info["tail"].removeprefix("api/")
        if tail == "go-away":
            raise web.HTTPFound(request.query.get("to", "https://evil.example/steal"))
        if tail == "same-host-redirect":
            raise web.HTTPFound("/api/moved?x=1")
        if tail == "flaky" and self.flaky > 0:
            self.flaky -= 1
            return web.json_response({"Title": "Service Unavailable"}, status=503)
        if tail == "big":
            resp = web.StreamResponse()
            resp.content_length = 4 * 1024 * 1024
            await resp.prepare(request)
            for _ in range(64):
                await resp.write(b"z" * 65536)
            return resp
        return web.json_response({"ok": True, "len": len(body)})


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    runner = web.AppRunner(server.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


SidecarFactory = Callable[..., AbstractAsyncContextManager[RunningSidecar]]


@pytest.fixture
def capabilities() -> dict[str, str]:
    """connection id -> run capability, filled by the sidecar factory, used by ``http``."""
    return {}


@pytest.fixture
def sidecar_factory(
    tmp_path: Path, provider: RunningProvider, capabilities: dict[str, str]
) -> SidecarFactory:
    """Build a sidecar for the provider's Microsoft account, plus an optional echo connection."""

    @asynccontextmanager
    async def make(
        echo: Echo | None = None,
        limits: LimitsConfig | None = None,
        echo_provider: str = "oauth2",
        echo_token: str = CANARY,
    ) -> AsyncIterator[RunningSidecar]:
        grant = await provider.new_grant()
        settings = await asyncio.to_thread(
            lab_settings,
            tmp_path / "data",
            provider.url,
            refresh_token=grant["refresh_token"],
            limits=limits,
        )
        if echo is not None:
            tokens = tmp_path / "echo-tokens.json"
            tokens.write_text(json.dumps({"access_token": echo_token}))
            extra = ConnectionConfig(
                id="conn_echo",
                provider=echo_provider,
                base_url=f"{echo.url}/api",
                allowed_hosts=["127.0.0.1"],
                source=StaticSourceConfig(kind="static", tokens_file=tokens),
            )
            settings = settings.model_copy(update={"connections": [*settings.connections, extra]})
        async with running_sidecar(settings) as sidecar:
            for conn in settings.connections:
                capabilities[conn.id] = await sidecar.capability(conn.id)
            yield sidecar

    return make


@pytest.fixture
async def http(capabilities: dict[str, str]) -> AsyncIterator[aiohttp.ClientSession]:
    """A worker's session: proxied requests carry the run capability for their connection."""

    async def present_capability(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        parts = req.url.path.split("/")
        if len(parts) > 2 and parts[1] == "proxy" and "Authorization" not in req.headers:
            cap = capabilities.get(parts[2])
            if cap:
                req.headers["Authorization"] = f"Bearer {cap}"
        return await handler(req)

    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30), middlewares=(present_capability,)
    ) as session:
        yield session


def graph(sidecar: RunningSidecar, tail: str) -> str:
    return sidecar.proxy(LAB_CONNECTION, tail)


async def _text(resp: aiohttp.ClientResponse) -> str:
    return "\n".join(f"{k}: {v}" for k, v in resp.headers.items()) + "\n" + await resp.text()


def assert_no_token(text: str) -> None:
    for marker in TOKEN_MARKERS:
        assert marker not in text


async def test_injected_token_reaches_provider_and_worker_credential_does_not(
    sidecar_factory: SidecarFactory,
    provider: RunningProvider,
    echo: Echo,
    http: aiohttp.ClientSession,
    capabilities: dict[str, str],
) -> None:
    async with sidecar_factory(echo) as sidecar:
        async with http.get(graph(sidecar, "v1.0/me")) as resp:
            assert resp.status == 200
            assert (await resp.json())["displayName"]
            assert_no_token(await _text(resp))
        graph_calls = [c for c in await provider.calls() if c["path"] == "/v1.0/me"]
        assert [c["token_valid"] for c in graph_calls] == [True]

        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with http.post(
            sidecar.proxy("conn_echo", "items?a=1"),
            data=b'{"x": 1}',
            headers={
                "Revive-Action": "create-item",
                "Content-Type": "application/json",
                "traceparent": trace,
                "X-Forwarded-For": "10.1.2.3",
            },
        ) as resp:
            assert resp.status == 200
            assert_no_token(await _text(resp))
    (seen,) = echo.seen
    assert seen["path"] == "/api/items?a=1"
    assert seen["headers"]["Authorization"] == f"Bearer {CANARY}"
    assert seen["headers"]["traceparent"] == trace
    assert seen["body"] == b'{"x": 1}'
    for gone in ("Revive-Action", "X-Forwarded-For"):
        assert gone not in seen["headers"]
    for capability in capabilities.values():  # the worker's credential stops at the sidecar
        assert capability not in json.dumps(seen["headers"])


async def test_a_credential_that_would_inject_a_header_is_never_sent(
    sidecar_factory: SidecarFactory, echo: Echo, http: aiohttp.ClientSession
) -> None:
    """A token with a line break in it would add headers of its own: refused before sending."""
    async with sidecar_factory(echo, echo_token=f"{CANARY}\r\nX-Injected: 1") as sidecar:
        async with http.get(sidecar.proxy("conn_echo", "items")) as resp:
            text = await _text(resp)
            assert resp.status == 500
            assert resp.content_type == PROBLEM
            assert json.loads(text.rsplit("\n", 1)[1])["type"] == "urn:revive:internal"
    assert echo.seen == []
    assert_no_token(text)


async def test_expired_token_refreshes_once_for_a_hundred_concurrent_requests(
    sidecar_factory: SidecarFactory, provider: RunningProvider, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        async with http.get(graph(sidecar, "v1.0/me")) as resp:
            assert resp.status == 200
        before = len(await provider.token_calls())
        await provider.fault("expire_token")

        async def one() -> int:
            async with http.get(graph(sidecar, "v1.0/me/events")) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(100)))
    assert statuses == [200] * 100
    refreshes = (await provider.token_calls())[before:]
    assert [c["grant_type"] for c in refreshes] == ["refresh_token"]


async def test_transient_503s_are_retried_honouring_retry_after(
    sidecar_factory: SidecarFactory, provider: RunningProvider, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        await provider.fault("unavailable", count=2, retry_after=1)
        async with http.get(graph(sidecar, "v1.0/me/events")) as resp:
            assert resp.status == 200
    attempts = [c for c in await provider.calls() if c["path"] == "/v1.0/me/events"]
    assert [c["status"] for c in attempts] == [503, 503, 200]
    times = [datetime.fromisoformat(c["at"].replace("Z", "+00:00")) for c in attempts]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert all(gap >= 0.95 for gap in gaps), gaps


async def test_transient_budget_spent_gives_upstream_unavailable(
    sidecar_factory: SidecarFactory, provider: RunningProvider, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        await provider.fault("unavailable", count=20)
        async with http.get(graph(sidecar, "v1.0/me")) as resp:
            assert resp.status == 503
            assert resp.content_type == PROBLEM
            problem = await resp.json()
    assert problem["type"] == "urn:revive:upstream-unavailable"
    assert problem["upstream_status"] == 503
    attempts = [c for c in await provider.calls() if c["path"] == "/v1.0/me"]
    assert 1 < len(attempts) < 20  # bounded, not forever


async def test_long_retry_after_is_not_waited_out(
    sidecar_factory: SidecarFactory, provider: RunningProvider, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        await provider.fault("rate_limit", count=5, retry_after=3600)
        async with http.get(graph(sidecar, "v1.0/me")) as resp:
            problem = await resp.json()
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "3600"
    assert problem["type"] == "urn:revive:upstream-unavailable"
    assert problem["retry_after"] == 3600


async def test_mutating_request_is_not_retried_on_429(
    sidecar_factory: SidecarFactory, provider: RunningProvider, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        await provider.fault("rate_limit", count=1, retry_after=1)
        async with http.post(
            graph(sidecar, "v1.0/me/sendMail"), json=_mail("k-429"), headers=SEND
        ) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
    assert len([c for c in await provider.calls() if c["path"] == "/v1.0/me/sendMail"]) == 1
    assert await provider.mails() == []


async def test_mutating_request_with_provider_idempotency_is_retried(
    sidecar_factory: SidecarFactory, echo: Echo, http: aiohttp.ClientSession
) -> None:
    # Xero honours Idempotency-Key, so a POST that met a 503 may safely go again; the
    # sidecar sends the worker's key, or derives a stable one from run and action.
    echo.flaky = 1
    async with sidecar_factory(echo, echo_provider="xero") as sidecar:
        async with http.post(
            sidecar.proxy("conn_echo", "flaky"),
            json={"x": 1},
            headers={"Idempotency-Key": "inv-1", "Revive-Action": "create-invoice"},
        ) as resp:
            assert resp.status == 200
        echo.flaky = 1
        async with http.post(
            sidecar.proxy("conn_echo", "flaky"), json={"x": 2}, headers={"Revive-Action": "pay"}
        ) as resp:
            assert resp.status == 200
    keys = [s["headers"].get("Idempotency-Key") for s in echo.seen]
    assert keys[:2] == ["inv-1", "inv-1"]
    assert keys[2] == keys[3] and keys[2].startswith("ik_")


async def test_oauth2_defaults_never_repeat_a_mutating_request(
    sidecar_factory: SidecarFactory, echo: Echo, http: aiohttp.ClientSession
) -> None:
    echo.flaky = 1
    async with sidecar_factory(echo) as sidecar:
        async with http.post(
            sidecar.proxy("conn_echo", "flaky"), json={"x": 1}, headers={"Revive-Action": "a1"}
        ) as resp:
            assert resp.status == 503  # the provider cannot deduplicate: relayed, not repeated
    assert len(echo.seen) == 1


async def test_commit_then_drop_sends_exactly_one_mail_and_says_outcome_unknown(
    sidecar_factory: SidecarFactory, provider: RunningProvider, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        await provider.fault("commit_then_drop")
        async with http.post(
            graph(sidecar, "v1.0/me/sendMail"), json=_mail("k-drop"), headers=SEND
        ) as resp:
            assert resp.status == 502
            assert resp.content_type == PROBLEM
            problem = await resp.json()
            assert_no_token(await _text(resp))
    assert problem["type"] == "urn:revive:outcome-unknown"
    assert "not repeated" in problem["detail"]
    mails = await provider.mails()
    assert len(mails) == 1


async def test_dead_grant_on_refresh_answers_424_with_provider_code(
    sidecar_factory: SidecarFactory, provider: RunningProvider, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        async with http.get(graph(sidecar, "v1.0/me")) as resp:
            assert resp.status == 200
        await provider.fault("kill_grant")
        async with http.post(
            graph(sidecar, "v1.0/me/sendMail"), json=_mail("k-dead"), headers=SEND
        ) as resp:
            assert resp.status == 424
            assert resp.content_type == PROBLEM
            problem = await resp.json()
            assert_no_token(await _text(resp))
        # A dead grant is not retried: the next request fails fast the same way.
        async with http.get(graph(sidecar, "v1.0/me")) as resp:
            assert resp.status == 424
    assert problem["type"] == "urn:revive:recovery-required"
    assert problem["provider_code"] == "AADSTS700082"
    assert problem["connection_id"] == LAB_CONNECTION
    assert await provider.mails() == []


async def test_claims_challenge_refreshes_with_claims(
    sidecar_factory: SidecarFactory, provider: RunningProvider, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        async with http.get(graph(sidecar, "v1.0/me")) as resp:
            assert resp.status == 200
        await provider.fault("claims_challenge")
        async with http.get(graph(sidecar, "v1.0/me")) as resp:
            assert resp.status == 200
    refresh = (await provider.token_calls())[-1]
    assert refresh["grant_type"] == "refresh_token" and refresh["claims"] is True


@pytest.mark.parametrize(
    "tail",
    ["..%2fadmin", "v1.0/%2e%2e/%2e%2e/admin", "http:%2f%2fevil.example%2fx", "user@evil.example/x",
     "%252e%252e%252fadmin"],
)
async def test_hostile_paths_are_refused_before_anything_is_sent(
    sidecar_factory: SidecarFactory, echo: Echo, http: aiohttp.ClientSession, tail: str
) -> None:
    async with sidecar_factory(echo) as sidecar:
        url = f"{sidecar.url}/proxy/conn_echo/{tail}"
        async with http.get(aiohttp.client.URL(url, encoded=True)) as resp:
            assert resp.status == 400
            assert resp.content_type == PROBLEM
            assert (await resp.json())["type"] == "urn:revive:bad-target"
    assert echo.seen == []


async def test_unknown_connection_is_a_404_problem(
    sidecar_factory: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory() as sidecar:
        async with http.get(sidecar.proxy("conn_nope", "v1.0/me")) as resp:
            assert resp.status == 404
            assert (await resp.json())["type"] == "urn:revive:unknown-connection"


async def test_redirect_to_another_host_is_refused(
    sidecar_factory: SidecarFactory, echo: Echo, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory(echo) as sidecar:
        for target in ("https://evil.example/steal", "http://169.254.169.254/latest/meta-data/",
                       "file:///etc/passwd"):
            async with http.get(
                sidecar.proxy("conn_echo", "go-away"), params={"to": target}, allow_redirects=False
            ) as resp:
                assert resp.status == 403
                assert (await resp.json())["type"] == "urn:revive:host-not-allowed"
                assert "Location" not in resp.headers
        async with http.get(sidecar.proxy("conn_echo", "same-host-redirect"), allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/proxy/conn_echo/moved?x=1"


async def test_oversized_bodies_get_413(
    sidecar_factory: SidecarFactory, echo: Echo, http: aiohttp.ClientSession
) -> None:
    limits = LimitsConfig(max_request_bytes=4096, replay_buffer_bytes=1024)
    async with sidecar_factory(echo, limits=limits) as sidecar:
        async with http.post(sidecar.proxy("conn_echo", "upload"), data=b"x" * 8192, headers=UPLOAD) as resp:
            assert resp.status == 413
            assert (await resp.json())["type"] == "urn:revive:payload-too-large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"y" * 1024

        async with http.post(sidecar.proxy("conn_echo", "upload"), data=chunks(), headers=UPLOAD) as resp:
            assert resp.status == 413
        # Within the limit but above the replay buffer: streamed through untouched.
        async with http.post(sidecar.proxy("conn_echo", "upload"), data=b"s" * 3000, headers=UPLOAD) as resp:
            assert resp.status == 200
            assert (await resp.json())["len"] == 3000
    assert [len(s["body"]) for s in echo.seen] == [3000]


async def test_large_answers_stream_through(
    sidecar_factory: SidecarFactory, echo: Echo, http: aiohttp.ClientSession
) -> None:
    async with sidecar_factory(echo) as sidecar:
        async with http.get(sidecar.proxy("conn_echo", "big")) as resp:
            assert resp.status == 200
            body = await resp.read()
    assert len(body) == 4 * 1024 * 1024


async def test_no_token_in_logs_across_a_whole_story(
    sidecar_factory: SidecarFactory,
    provider: RunningProvider,
    echo: Echo,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    async with sidecar_factory(echo) as sidecar:
        for fault in ("expire_token", "claims_challenge", "kill_grant"):
            await provider.fault(fault)
            async with http.get(graph(sidecar, "v1.0/me")) as resp:
                seen.append(await _text(resp))
        async with http.get(sidecar.proxy("conn_echo", "x")) as resp:
            seen.append(await _text(resp))
    for text in [*seen, caplog.text]:
        assert_no_token(text)


def _mail(key: str) -> dict[str, Any]:
    return {
        "message": {
            "subject": "Nightly executive briefing",
            "body": {"contentType": "Text", "content": "Good morning."},
            "toRecipients": [{"emailAddress": {"address": "ceo@example.com"}}],
            "singleValueExtendedProperties": [
                {
                    "id": "String {00020329-0000-0000-C000-000000000046} Name x-revive-idempotency-key",
                    "value": key,
                }
            ],
        }
    }


async def test_ledger_writes_are_drained_before_shutdown(
    sidecar_factory: SidecarFactory, echo: Echo, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with sidecar_factory(echo) as sidecar:

        async def post(n: int) -> int:
            async with http.post(
                sidecar.proxy("conn_echo", f"items/{n}"), json={"n": n},
                headers={"Revive-Action": f"create-{n}"},
            ) as resp:
                return resp.status

        assert await asyncio.gather(*(post(n) for n in range(40))) == [200] * 40
    # The sidecar has stopped: every answer the workers got is on record, none in flight.
    def states() -> list[str]:
        with sqlite3.connect(tmp_path / "data" / "revive.db") as conn:
            return [row[0] for row in conn.execute("SELECT state FROM actions")]

    assert await asyncio.to_thread(states) == ["committed"] * 40
