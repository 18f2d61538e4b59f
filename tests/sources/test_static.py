"""StaticSource: reads a token file off the loop; refresh re-reads it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from revive.errors import CredentialMisconfigured
from revive.sources import StaticSource

CANARY_AT = "at-canary-0b8e4d1c77a2"


async def test_reads_json(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": CANARY_AT, "expires_at": 4102444800}))
    source = StaticSource("conn_s", path)

    lease = await source.lease()
    assert (lease.connection_id, lease.generation, lease.access_token) == ("conn_s", 1, CANARY_AT)
    assert lease.expires_at == 4102444800.0
    assert await source.lease() is lease  # cached
    for text in (repr(lease), str(lease), repr(source)):
        assert CANARY_AT not in text
    await source.close()


async def test_reads_yaml_without_expiry(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"access_token: {CANARY_AT}\n")
    lease = await StaticSource("conn_s", path).lease()
    assert lease.access_token == CANARY_AT
    assert lease.expires_at is None and not lease.expired()


async def test_refresh_rereads_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": "first-token"}))
    source = StaticSource("conn_s", path)
    first = await source.lease()

    same = await source.refresh(first)
    assert same.access_token == "first-token"

    path.write_text(json.dumps({"access_token": "second-token"}))
    second = await source.refresh(same)
    assert second.access_token == "second-token"
    assert await source.lease() is second
    # A caller still holding the first lease gets the replacement without another read.
    path.write_text(json.dumps({"access_token": "third-token"}))
    assert (await source.refresh(first)).access_token == "second-token"


async def test_expired_token_is_reread(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": "old-token", "expires_at": 1}))
    source = StaticSource("conn_s", path)
    assert (await source.lease()).access_token == "old-token"
    path.write_text(json.dumps({"access_token": "new-token"}))
    assert (await source.lease()).access_token == "new-token"


async def test_concurrent_first_leases_read_once(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": CANARY_AT}))
    source = StaticSource("conn_s", path)
    leases = await asyncio.gather(*(source.lease() for _ in range(50)))
    assert len({id(lease) for lease in leases}) == 1


@pytest.mark.parametrize(
    "content",
    [None, "{not json: [", json.dumps({"expires_at": 5}), json.dumps({"access_token": 5}),
     json.dumps({"access_token": "x-token", "expires_at": "soon"}), json.dumps(["x"])],
)
async def test_bad_file_is_misconfigured(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "tokens.json"
    if content is not None:
        path.write_text(content.replace("x-token", CANARY_AT))
    with pytest.raises(CredentialMisconfigured) as info:
        await StaticSource("conn_s", path).lease()
    assert str(path) in str(info.value)
    assert CANARY_AT not in str(info.value)


class _NoClassifier:
    def classify(self, phase: str, status: int | None, headers: object, body: object) -> object:
        raise AssertionError("not used by these sources")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"kind": "nango", "secret_key_file": "/s", "connection_id": "c", "provider_config_key": "p"},
         "NangoSource"),
        ({"kind": "auth0", "domain_url": "https://t.auth0.com", "client_id": "x",
          "client_secret_file": "/s", "connection": "google-oauth2", "subject_token_file": "/t"},
         "Auth0Source"),
        ({"kind": "vault", "address": "https://vault:8200", "path": "p", "token_file": "/t"},
         "VaultSource"),
    ],
)
async def test_factory_builds_each_identity_layer_source(
    tmp_path: Path, source: dict[str, str], expected: str
) -> None:
    from revive.config import ConnectionConfig, Settings
    from revive.sources import build_source

    conn = ConnectionConfig.model_validate(
        {"id": "c1", "provider": "microsoft", "base_url": "https://graph.microsoft.com",
         "source": source}
    )
    async with aiohttp.ClientSession() as http:
        built = build_source(conn, Settings(data_dir=tmp_path), _NoClassifier(), http)  # type: ignore[arg-type]
        try:
            assert type(built).__name__ == expected and built.connection_id == "c1"
        finally:
            await built.close()
