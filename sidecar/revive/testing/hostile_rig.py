"""Test helper: a sidecar in front of the fake provider and a hostile upstream, recorded.

The hostile-input suites (``tests/proxy/test_hostile*.py``) run against this rig: a real
sidecar on an ephemeral loopback port with two connections, ``conn_microsoft_ops`` (the fake
provider, ``lab_at_``/``lab_rt_`` tokens) and ``conn_hostile`` (``revive.testing.hostile``,
whose static credential is ``CANARY``). Every byte a client receives through the rig is kept
in ``Rig.received`` so a suite can assert, after the fact, that no secret ever left.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from revive.config import ConnectionConfig, LimitsConfig, StaticSourceConfig
from revive.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPES
from revive.lab.settings import lab_settings
from revive.testing.hostile import HostileUpstream, PeakRss, running_hostile_upstream
from revive.testing.provider import RunningProvider, running_provider
from revive.testing.rawhttp import RawAnswer, exchange, request_bytes
from revive.testing.sidecar import RunningSidecar, running_sidecar

__all__ = [
    "CANARY", "HOSTILE", "PROVIDER_SECRETS", "RIG_LIMITS", "Reply", "Rig", "assert_problem", "assert_refused",
    "peak_growth_kb", "raw_get", "running_rig",
]

HOSTILE = "conn_hostile"
CANARY = "canary-provider-token-3b9d0c"
PROVIDER_SECRETS = (CANARY, "lab_at_", "lab_rt_")
"""Provider tokens the rig's sources hold (the fake provider's by prefix)."""
RIG_LIMITS = LimitsConfig(
    request_body_timeout_seconds=1.0,  # a slowloris is cut off within the test's patience
    replay_buffer_bytes=1024,  # so a few kB already take the streaming path
    upstream_timeout_seconds=10.0,
    connect_timeout_seconds=2.0,
)


@dataclass
class Reply:
    """An answer read whole through aiohttp's client (undecoded: the rig never inflates)."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Rig:
    """The sidecar, its two upstreams, and a transcript of every byte a client received."""

    sidecar: RunningSidecar
    provider: RunningProvider
    upstream: HostileUpstream
    http: aiohttp.ClientSession
    admin_token: str
    capability: str
    """A valid run capability for ``conn_hostile``."""
    received: list[bytes] = field(default_factory=list)
    """Every byte any client got back: headers and body, or the raw answer."""
    capabilities: list[str] = field(default_factory=list)
    """Capabilities the suite used; none of them may ever be logged."""

    @property
    def port(self) -> int:
        return int(self.sidecar.url.rsplit(":", 1)[1])

    async def call(
        self, method: str, path: str, *, token: str | None = None, **kw: Any
    ) -> Reply:
        """A request through aiohttp's client, recorded.

        ``token`` is sent as ``Authorization: Bearer``: None sends the ``conn_hostile``
        capability, "" sends no Authorization at all (unless ``headers`` carry one).
        """
        headers = CIMultiDict(kw.pop("headers", {}))
        if "Authorization" not in headers and token != "":
            headers["Authorization"] = f"Bearer {token or self.capability}"
        async with self.http.request(
            method, self.sidecar.url + path, headers=headers, allow_redirects=False, **kw
        ) as resp:
            body = await resp.read()
        reply = Reply(resp.status, CIMultiDict(resp.headers), body)
        self.received.append(_dump(reply.headers) + body)
        return reply

    async def raw(self, data: bytes, **kw: Any) -> RawAnswer:
        answer = await exchange("127.0.0.1", self.port, data, **kw)
        self.received.append(answer.raw)
        return answer

    async def healthy(self) -> None:
        """The sidecar still proxies an ordinary request after whatever came before."""
        reply = await self.call("GET", f"/proxy/{HOSTILE}/still-there")
        assert reply.status == 200 and reply.json() == {"ok": True}

    def assert_nothing_leaked(self, log_text: str) -> None:
        """No provider token or admin token in any byte received or logged; no capability logged."""
        for secret in (*PROVIDER_SECRETS, self.admin_token):
            for blob in self.received:
                assert secret.encode() not in blob, f"{secret[:8]}... reached a client"
            assert secret not in log_text, f"{secret[:8]}... reached the log"
        for capability in self.capabilities:
            assert capability not in log_text, "a capability reached the log"


def _dump(headers: CIMultiDict[str]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("utf-8", "replace")


@asynccontextmanager
async def running_rig(
    tmp_path: Path, bomb: bytes, limits: LimitsConfig = RIG_LIMITS
) -> AsyncIterator[Rig]:
    """Start the provider, the hostile upstream (serving ``bomb``) and the sidecar; stop all."""
    async with running_provider() as provider, running_hostile_upstream(bomb) as upstream:
        grant = await provider.new_grant()
        settings = await asyncio.to_thread(
            lab_settings, tmp_path / "data", provider.url,
            refresh_token=grant["refresh_token"], limits=limits,
        )
        tokens = tmp_path / "hostile-tokens.json"
        await asyncio.to_thread(tokens.write_text, json.dumps({"access_token": CANARY}))
        hostile = ConnectionConfig(
            id=HOSTILE,
            provider="oauth2",
            base_url=f"{upstream.url}/api",
            allowed_hosts=["127.0.0.1"],
            source=StaticSourceConfig(kind="static", tokens_file=tokens),
        )
        settings = settings.model_copy(update={"connections": [*settings.connections, hostile]})
        async with running_sidecar(settings) as sidecar:
            admin = (await asyncio.to_thread(settings.admin_token_path.read_text)).strip()
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False
            ) as http:
                cap = await sidecar.capability(HOSTILE)
                yield Rig(sidecar, provider, upstream, http, admin, cap, capabilities=[cap])


def assert_problem(answer: Reply | RawAnswer, type_: str) -> dict[str, Any]:
    assert answer.content_type == PROBLEM_CONTENT_TYPE, answer.body[:200]
    problem: dict[str, Any] = answer.json()
    assert problem["type"] == type_, problem
    assert problem["status"] == answer.status == PROBLEM_TYPES[type_]
    return problem


def assert_refused(answer: RawAnswer) -> None:
    """A 4xx that is either a Revive problem or aiohttp's own answer to malformed HTTP + close."""
    assert answer.status is not None and 400 <= answer.status < 500, answer.raw[:200]
    if answer.content_type == PROBLEM_CONTENT_TYPE:
        assert answer.json()["type"] in PROBLEM_TYPES
    else:
        assert answer.closed


def raw_get(target: str | bytes, *headers: tuple[str, str | bytes], close: bool = True) -> bytes:
    """A raw GET; ``close`` asks the server to hang up after answering a well-formed one."""
    extra = [("Connection", "close")] if close else []
    return request_bytes("GET", target, [("Host", "127.0.0.1"), *headers, *extra])


async def peak_growth_kb(work: Callable[[], Awaitable[None]]) -> int:
    """Peak RSS growth of this process, in kB, while ``work`` runs."""
    gauge = PeakRss()
    before = await asyncio.to_thread(gauge.kilobytes, "VmRSS")
    await asyncio.to_thread(gauge.reset)
    await work()
    return await asyncio.to_thread(gauge.kilobytes) - before
