"""OAuth2Source against a real local token endpoint (an aiohttp app on an ephemeral port)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from revive.config import ConnectionConfig, OAuth2SourceConfig, Settings, StaticSourceConfig
from revive.errors import CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.sources import Grant, GrantStore, Lease, OAuth2Source, StaticSource, build_source

CANARY_RT = "rt-canary-5d1f0e9a3b7c"
CANARY_SECRET = "secret-canary-41aa9e0d"
CONN = "conn_ms"


# -- fakes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeVerdict:
    failure_class: str
    provider_code: str | None = None
    retry_after: float | None = None
    message: str | None = None
    rule: str = "fake"


class FakeClassifier:
    """RFC 6749 defaults only: enough to drive the source without ``revive.classify``."""

    def __init__(self) -> None:
        self.phases: list[Any] = []

    def classify(
        self,
        phase: Any,
        status: int | None,
        headers: Mapping[str, str],
        body: bytes | str | None,
        /,
    ) -> FakeVerdict:
        self.phases.append(phase)
        text = body.decode() if isinstance(body, bytes) else body or ""
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        message = data.get("error_description") if isinstance(data, dict) else None
        retry = headers.get("Retry-After")
        retry_after = float(retry) if retry else None
        if status is None or status >= 500 or status == 429 or data is None:
            return FakeVerdict("transient", error, retry_after, message)
        if 200 <= status < 300 and not error:
            return FakeVerdict("ok")
        if error == "invalid_grant":
            return FakeVerdict("dead_grant", error, None, message)
        return FakeVerdict("permanent", error, None, message)


Responder = Callable[[dict[str, str]], Awaitable[web.StreamResponse]]


@dataclass
class FakeProvider:
    """A token endpoint that counts calls, rotates on demand and can be scripted."""

    valid: set[str] = field(default_factory=lambda: {CANARY_RT})
    rotate: bool = False
    delay: float = 0.0
    expires_in: Any = 3600
    script: list[Responder] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    issued: int = 0

    @property
    def calls(self) -> int:
        return len(self.forms)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.forms.append(form)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.script:
            return await self.script.pop(0)(form)
        if form.get("client_id") != "client-1" or form.get("client_secret") != CANARY_SECRET:
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") not in self.valid:
            return web.json_response(
                {
                    "error": "invalid_grant",
                    "error_description": "AADSTS700082: The refresh token has expired.",
                    "error_codes": [700082],
                },
                status=400,
            )
        self.issued += 1
        body: dict[str, Any] = {
            "access_token": f"at-canary-{self.issued:04d}",
            "token_type": "Bearer",
        }
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        if self.rotate:
            new = f"rt-rotated-{self.issued:04d}"
            self.valid = {new}
            body["refresh_token"] = new
        return web.json_response(body)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    provider: FakeProvider
    server: TestServer
    http: aiohttp.ClientSession
    grants: GrantStore
    clock: Clock
    classifier: FakeClassifier
    tmp: Path
    sources: list[OAuth2Source] = field(default_factory=list)

    def config(self, **overrides: Any) -> OAuth2SourceConfig:
        secret = self.tmp / "client-secret"
        secret.write_text(f"  {CANARY_SECRET}\n")
        values: dict[str, Any] = {
            "kind": "oauth2",
            "token_url": str(self.server.make_url("/tenant/oauth2/v2.0/token")),
            "client_id": "client-1",
            "client_secret_file": secret,
            "scopes": ["offline_access", "Mail.Send"],
            "token_timeout_seconds": 2.0,
        }
        values.update(overrides)
        return OAuth2SourceConfig(**values)

    def source(self, **overrides: Any) -> OAuth2Source:
        src = OAuth2Source(
            CONN, self.config(**overrides), self.grants, self.classifier, self.http, self.clock
        )
        self.sources.append(src)
        return src


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    provider = FakeProvider()
    app = web.Application()
    app.router.add_post("/tenant/oauth2/v2.0/token", provider.handle)
    server = TestServer(app)
    await server.start_server()
    grants = GrantStore(tmp_path / "data")
    await grants.save(CONN, Grant(refresh_token=SecretStr(CANARY_RT), obtained_at=1.0))
    async with aiohttp.ClientSession() as http:
        e = Env(provider, server, http, grants, Clock(), FakeClassifier(), tmp_path)
        yield e
        for src in e.sources:
            await src.close()
    await server.close()


async def _wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def _stored_rt(env: Env) -> str:
    grant = await GrantStore(env.tmp / "data").load(CONN)
    assert grant is not None
    return grant.refresh_token.get_secret_value()


# -- happy path and single flight ----------------------------------------------------------


async def test_first_lease_sends_the_refresh_grant(env: Env) -> None:
    source = env.source()
    lease = await source.lease()
    assert lease == Lease(CONN, 1, "at-canary-0001", env.clock.now + 3600)
    assert env.provider.forms == [
        {
            "grant_type": "refresh_token",
            "refresh_token": CANARY_RT,
            "client_id": "client-1",
            "client_secret": CANARY_SECRET,
            "scope": "offline_access Mail.Send",
        }
    ]
    assert env.classifier.phases == ["token_refresh"]
    assert await source.lease() is lease


async def test_100_concurrent_leases_on_expired_token_make_one_call(env: Env) -> None:
    source = env.source()
    first = await source.lease()
    env.clock.now += 3601
    env.provider.delay = 0.05
    leases = await asyncio.gather(*(source.lease() for _ in range(100)))
    assert env.provider.calls == 2
    assert {lease.access_token for lease in leases} == {"at-canary-0002"}
    assert first.access_token == "at-canary-0001"


async def test_100_concurrent_refreshes_of_one_stale_lease_make_one_call(env: Env) -> None:
    source = env.source()
    stale = await source.lease()
    env.provider.delay = 0.05
    leases = await asyncio.gather(*(source.refresh(stale) for _ in range(100)))
    assert env.provider.calls == 2
    assert {lease.access_token for lease in leases} == {"at-canary-0002"}
    # Late callers holding the stale lease get the replacement without another call.
    assert (await source.refresh(stale)).access_token == "at-canary-0002"
    assert env.provider.calls == 2


async def test_rotation_is_persisted_encrypted_and_used_next(env: Env) -> None:
    env.provider.rotate = True
    source = env.source()
    await source.lease()
    assert await _stored_rt(env) == "rt-rotated-0001"
    sealed = env.grants.path(CONN).read_bytes()
    assert b"rt-rotated-0001" not in sealed and CANARY_RT.encode() not in sealed

    lease = await source.refresh(await source.lease())
    assert env.provider.forms[-1]["refresh_token"] == "rt-rotated-0001"
    assert lease.access_token == "at-canary-0002"
    assert await _stored_rt(env) == "rt-rotated-0002"


async def test_rotated_token_is_not_handed_out_unless_persisted(env: Env) -> None:
    class FlakyStore(GrantStore):
        fail = True

        async def write(
            self, connection_id: str, grant: Grant, expected_version: int | None
        ) -> int:
            if self.fail:
                raise CredentialMisconfigured("disk full")
            return await super().write(connection_id, grant, expected_version)

    env.provider.rotate = True
    store = FlakyStore(env.tmp / "data")
    source = OAuth2Source(CONN, env.config(), store, env.classifier, env.http, env.clock)
    env.sources.append(source)
    with pytest.raises(CredentialMisconfigured):
        await source.lease()
    assert env.provider.issued == 1  # the provider issued a token, nobody received it
    assert await _stored_rt(env) == CANARY_RT
    # The rotated token was kept in memory, so the next attempt does not kill the grant.
    store.fail = False
    assert (await source.lease()).access_token == "at-canary-0002"
    assert env.provider.forms[-1]["refresh_token"] == "rt-rotated-0001"
    assert await _stored_rt(env) == "rt-rotated-0002"


async def test_close_during_the_save_keeps_the_rotated_token(env: Env) -> None:
    class SlowStore(GrantStore):
        writing = asyncio.Event()

        async def write(
            self, connection_id: str, grant: Grant, expected_version: int | None
        ) -> int:
            self.writing.set()
            await asyncio.sleep(0.2)  # the shutdown arrives while the rotation is being saved
            return await super().write(connection_id, grant, expected_version)

    env.provider.rotate = True
    store = SlowStore(env.tmp / "data")
    source = OAuth2Source(CONN, env.config(), store, env.classifier, env.http, env.clock)
    env.sources.append(source)
    lease = asyncio.ensure_future(source.lease())
    async with asyncio.timeout(10):
        await store.writing.wait()
    await source.close()
    assert env.provider.issued == 1
    assert await _stored_rt(env) == "rt-rotated-0001"  # the provider's current token
    await asyncio.gather(lease, return_exceptions=True)


async def test_proactive_refresh_within_skew(env: Env) -> None:
    env.provider.expires_in = 60  # inside the 120 s skew at once
    source = env.source(refresh_skew_seconds=120)
    first = await source.lease()
    env.provider.expires_in = 3600
    env.provider.delay = 0.05
    served = await asyncio.gather(*(source.lease() for _ in range(50)))
    assert {lease.access_token for lease in served} == {first.access_token}  # no waiting
    for _ in range(200):
        if (await source.lease()).access_token != first.access_token:
            break
        await asyncio.sleep(0.01)
    assert (await source.lease()).access_token == "at-canary-0002"
    assert env.provider.calls == 2


async def test_failed_proactive_refresh_is_logged_not_raised(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env.provider.expires_in = 60
    source = env.source(refresh_skew_seconds=120)
    first = await source.lease()

    async def unavailable(form: dict[str, str]) -> web.StreamResponse:
        return web.Response(status=503, text=f"<html>down {form['refresh_token']}</html>")

    env.provider.script.append(unavailable)
    assert await source.lease() is first
    await _wait_for(lambda: "proactive refresh" in caplog.text)
    assert await source.lease() is first  # backoff: no second attempt right away
    assert env.provider.calls == 2
    assert CANARY_RT not in caplog.text and CANARY_SECRET not in caplog.text


async def test_close_cancels_background_refresh(env: Env) -> None:
    env.provider.expires_in = 60
    source = env.source(refresh_skew_seconds=120)
    await source.lease()
    env.provider.delay = 5
    await source.lease()
    await _wait_for(lambda: env.provider.calls == 2)
    await asyncio.wait_for(source.close(), 1)
    assert env.provider.issued == 1


async def test_claims_bypass_the_cache_and_reach_the_endpoint(env: Env) -> None:
    source = env.source()
    stale = await source.lease()
    current = await source.refresh(stale)
    assert (await source.refresh(stale)) is current  # cached for a plain refresh
    claims = '{"access_token":{"nbf":{"essential":true,"value":"1657834417"}}}'
    fresh = await source.refresh(stale, claims=claims)
    assert fresh.access_token == "at-canary-0003"
    assert env.provider.forms[-1]["claims"] == claims
    assert "claims" not in env.provider.forms[1]


# -- failures ------------------------------------------------------------------------------


async def test_invalid_grant_is_dead_grant(env: Env) -> None:
    env.provider.valid = set()
    source = env.source()
    with pytest.raises(DeadGrant) as info:
        await source.lease()
    assert info.value.provider_code == "invalid_grant"
    assert info.value.provider_message is not None and "AADSTS700082" in info.value.provider_message
    assert env.provider.calls == 1  # stored token equals the used one: no retry
    assert await _stored_rt(env) == CANARY_RT  # a dead grant is kept as evidence


async def test_dead_grant_is_not_asked_again_until_the_grant_changes(env: Env) -> None:
    env.provider.valid = set()
    source = env.source()
    for _ in range(3):
        with pytest.raises(DeadGrant) as info:
            await source.lease()
        assert info.value.provider_code == "invalid_grant"
    assert env.provider.calls == 1  # no hammering of the token endpoint (AADSTS50196)

    await GrantStore(env.tmp / "data").save(
        CONN, Grant(refresh_token=SecretStr("rt-reconnected"), generation=2, obtained_at=3.0)
    )
    env.provider.valid = {"rt-reconnected"}
    lease = await source.lease()
    assert (lease.generation, lease.access_token) == (2, "at-canary-0001")
    assert env.provider.forms[-1]["refresh_token"] == "rt-reconnected"


async def test_token_rotated_by_another_writer_is_read_before_redeeming(env: Env) -> None:
    source = env.source()
    stale = await source.lease()
    other = GrantStore(env.tmp / "data")  # e.g. a second sidecar process
    await other.save(CONN, Grant(refresh_token=SecretStr("rt-from-elsewhere"), obtained_at=2.0))
    env.provider.valid = {"rt-from-elsewhere"}

    lease = await source.refresh(stale)
    assert lease.access_token == "at-canary-0002"
    # The file is read before each redemption: the revoked token is never presented.
    assert [f["refresh_token"] for f in env.provider.forms] == [CANARY_RT, "rt-from-elsewhere"]


async def test_no_grant_at_all(env: Env) -> None:
    env.grants.path(CONN).unlink()
    with pytest.raises(DeadGrant) as info:
        await env.source().lease()
    assert info.value.provider_code == "no_grant"
    assert env.provider.calls == 0


async def test_bootstrap_seals_refresh_token_file_once(env: Env) -> None:
    env.grants.path(CONN).unlink()
    seed = env.tmp / "seed-rt"
    seed.write_text(CANARY_RT + "\n")
    await env.source(refresh_token_file=seed).lease()
    assert await _stored_rt(env) == CANARY_RT
    seed.write_text("ignored-now\n")
    await env.source(refresh_token_file=seed).lease()
    assert env.provider.forms[-1]["refresh_token"] == CANARY_RT


@pytest.mark.parametrize(
    ("status", "body", "headers", "retry_after"),
    [
        (503, '{"error":"temporarily_unavailable"}', {"Retry-After": "7"}, 7.0),
        (200, "<html><body>Sign in to the Wi-Fi</body></html>", {}, None),
        (502, "<html>Bad gateway</html>", {}, None),
    ],
)
async def test_transient_answers_keep_the_grant(
    env: Env, status: int, body: str, headers: dict[str, str], retry_after: float | None
) -> None:
    async def answer(form: dict[str, str]) -> web.StreamResponse:
        return web.Response(status=status, text=body, headers=headers)

    env.provider.script.append(answer)
    with pytest.raises(CredentialUnavailable) as info:
        await env.source().lease()
    assert info.value.retry_after == retry_after
    assert await _stored_rt(env) == CANARY_RT


async def test_connection_refused_is_unavailable(env: Env) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = env.source(token_url=f"http://127.0.0.1:{port}/token")
    with pytest.raises(CredentialUnavailable):
        await source.lease()
    assert await _stored_rt(env) == CANARY_RT


async def test_timeout_is_unavailable(env: Env) -> None:
    env.provider.delay = 1.0
    with pytest.raises(CredentialUnavailable):
        await env.source(token_timeout_seconds=0.1).lease()


async def test_oversized_or_tokenless_success_is_unavailable(env: Env) -> None:
    async def huge(form: dict[str, str]) -> web.StreamResponse:
        return web.json_response({"access_token": "x" * 300_000})

    async def tokenless(form: dict[str, str]) -> web.StreamResponse:
        return web.json_response({"token_type": "Bearer"})

    env.provider.script += [huge, tokenless]
    source = env.source()
    for _ in range(2):
        with pytest.raises(CredentialUnavailable):
            await source.lease()


async def test_invalid_client_is_misconfigured_and_grant_untouched(env: Env) -> None:
    (env.tmp / "wrong-secret").write_text("expired-secret")
    source = env.source(client_secret_file=env.tmp / "wrong-secret")
    with pytest.raises(CredentialMisconfigured) as info:
        await source.lease()
    assert info.value.provider_code == "invalid_client"
    assert await _stored_rt(env) == CANARY_RT


async def test_missing_client_secret_file_is_misconfigured(env: Env) -> None:
    with pytest.raises(CredentialMisconfigured) as info:
        await env.source(client_secret_file=env.tmp / "nope").lease()
    assert "nope" in str(info.value)
    assert env.provider.calls == 0


# -- reconnect -----------------------------------------------------------------------------


async def test_install_grant_bumps_generation(env: Env) -> None:
    source = env.source()
    assert (await source.lease()).generation == 1
    lease = await source.install_grant("rt-reconnected", "Mail.Send", "at-from-code", 600)
    assert (lease.generation, lease.access_token, lease.expires_at) == (
        2, "at-from-code", env.clock.now + 600
    )
    assert await source.lease() is lease
    stored = await env.grants.load(CONN)
    assert stored is not None and (stored.generation, stored.scope) == (2, "Mail.Send")

    env.provider.valid = {"rt-x"}
    lease3 = await source.install_grant("rt-x", None, None, None)
    assert (lease3.generation, lease3.access_token) == (3, "at-canary-0002")


# -- secrets -------------------------------------------------------------------------------


async def test_canaries_never_leak(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    source = env.source()
    lease = await source.lease()
    grant = await env.grants.load(CONN)

    async def echo(form: dict[str, str]) -> web.StreamResponse:
        return web.json_response(
            {
                "error": "invalid_grant",
                "error_description": (
                    f"bad token {form['refresh_token']} for {form['client_secret']}"
                ),
            },
            status=400,
        )

    env.provider.script.append(echo)
    with pytest.raises(DeadGrant) as info:
        await source.refresh(lease)
    exc = info.value
    texts = [
        repr(source), str(source), repr(lease), str(lease), repr(grant), str(grant),
        str(exc), repr(exc), str(exc.provider_message), str(exc.provider_code), caplog.text,
        *(r.getMessage() for r in caplog.records),
    ]
    for canary in (CANARY_RT, CANARY_SECRET, lease.access_token):
        for text in texts:
            assert canary not in text


# -- factory -------------------------------------------------------------------------------


async def test_build_source_matches_kind(env: Env) -> None:
    static = ConnectionConfig(
        id="conn_static",
        provider="microsoft",
        base_url="https://graph.microsoft.com",
        source=StaticSourceConfig(kind="static", tokens_file=env.tmp / "t.json"),
    )
    oauth = ConnectionConfig(
        id=CONN, provider="microsoft", base_url="https://graph.microsoft.com", source=env.config()
    )
    settings = Settings(data_dir=env.tmp / "data")
    assert isinstance(build_source(static, settings, env.classifier, env.http), StaticSource)
    built = build_source(oauth, settings, env.classifier, env.http)
    assert isinstance(built, OAuth2Source)
    env.sources.append(built)
    assert (await built.lease()).access_token == "at-canary-0001"
