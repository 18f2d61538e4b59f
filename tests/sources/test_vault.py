"""VaultSource and write_with_cas against the fake Vault (real HTTP, KV v2, token + k8s auth)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from revive.errors import CredentialMisconfigured, CredentialUnavailable, DeadGrant
from revive.sources.vault import (
    VaultCasConflict,
    VaultSource,
    VaultSourceConfig,
    read_secret,
    write_with_cas,
)
from revive.testing.fake_vault import FakeVault, running_fake_vault

CONN = "conn_vault"
AT1 = "at-canary-1f4e8a90c2"
AT2 = "at-canary-2b7d3c11e5"
JWT = "jwt-canary-k8s-77aa01"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def vault() -> AsyncIterator[FakeVault]:
    clock = Clock()
    async with running_fake_vault(FakeVault(clock=clock)) as fake:
        yield fake


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


def token_config(vault: FakeVault, tmp_path: Path, **kw: Any) -> VaultSourceConfig:
    token = vault.issue_token()
    return VaultSourceConfig(
        kind="vault",
        address=vault.url,
        path="conns/ms",
        token_file=_write(tmp_path / "vault-token", token),
        **kw,
    )


def k8s_config(vault: FakeVault, tmp_path: Path, **kw: Any) -> VaultSourceConfig:
    vault.k8s_roles["revive"] = JWT
    return VaultSourceConfig(
        kind="vault",
        address=vault.url,
        path="conns/ms",
        auth="kubernetes",
        kubernetes_role="revive",
        kubernetes_jwt_file=_write(tmp_path / "sa-token", JWT),
        **kw,
    )


def clock_of(vault: FakeVault) -> Clock:
    assert isinstance(vault.clock, Clock)
    return vault.clock


# -- config -----------------------------------------------------------------------------------


def test_config_requires_matching_auth_settings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="token_file"):
        VaultSourceConfig(kind="vault", address="https://vault:8200", path="p")
    with pytest.raises(ValidationError, match="kubernetes_role"):
        VaultSourceConfig(kind="vault", address="https://vault:8200", path="p", auth="kubernetes")
    with pytest.raises(ValidationError):
        VaultSourceConfig(
            kind="vault", address="https://vault:8200", path="../x", token_file=tmp_path / "t"
        )
    with pytest.raises(ValidationError):
        VaultSourceConfig(
            kind="vault", address="https://vault:8200", path="p", token_file=tmp_path / "t",
            surprise=1,  # type: ignore[call-arg]
        )


# -- lease / refresh --------------------------------------------------------------------------


async def test_token_auth_lease_reads_field_and_caches(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.put("secret", "conns/ms", {"access_token": AT1, "expires_at": 1_000_600})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock_of(vault))
    lease = await source.lease()
    assert (lease.connection_id, lease.generation, lease.access_token) == (CONN, 1, AT1)
    assert lease.expires_at == 1_000_600
    assert source.version == 1
    assert await source.lease() is lease
    reads = [c for c in vault.calls if c[0] == "GET"]
    assert reads == [("GET", "/v1/secret/data/conns/ms", True)]


async def test_expired_secret_is_reread(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = clock_of(vault)
    vault.put("secret", "conns/ms", {"access_token": AT1, "expires_at": clock.now + 60})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock)
    assert (await source.lease()).access_token == AT1
    vault.put("secret", "conns/ms", {"access_token": AT2, "expires_at": clock.now + 3600})
    clock.now += 61
    assert (await source.lease()).access_token == AT2


async def test_lease_duration_bounds_the_cache(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = clock_of(vault)
    vault.lease_duration = 30
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock)
    assert (await source.lease()).expires_at is None
    vault.put("secret", "conns/ms", {"access_token": AT2})
    assert (await source.lease()).access_token == AT1
    clock.now += 31
    assert (await source.lease()).access_token == AT2


async def test_refresh_rereads_and_returns_unchanged_value(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock_of(vault))
    first = await source.lease()
    same = await source.refresh(first)
    assert same.access_token == AT1  # unchanged: the proxy relays the provider's rejection
    vault.put("secret", "conns/ms", {"access_token": AT2})
    fresh = await source.refresh(first)
    assert fresh.access_token == AT2
    assert source.version == 2
    # A caller still holding the first lease gets the new one without another read.
    reads = len([c for c in vault.calls if c[0] == "GET"])
    assert (await source.refresh(first)).access_token == AT2
    assert len([c for c in vault.calls if c[0] == "GET"]) == reads


async def test_concurrent_refreshes_share_one_read(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock_of(vault))
    first = await source.lease()
    vault.put("secret", "conns/ms", {"access_token": AT2})
    before = len(vault.calls)
    leases = await asyncio.gather(*(source.refresh(first) for _ in range(10)))
    assert {lease.access_token for lease in leases} == {AT2}
    assert len(vault.calls) - before == 1


# -- dead grant / misconfigured / transient ---------------------------------------------------


async def test_missing_secret_is_dead_grant(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock_of(vault))
    with pytest.raises(DeadGrant) as err:
        await source.lease()
    assert err.value.provider_code == "vault_secret_missing"


async def test_missing_field_and_deleted_version_are_dead_grant(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.put("secret", "conns/ms", {"other": "x"})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock_of(vault))
    with pytest.raises(DeadGrant) as err:
        await source.lease()
    assert err.value.provider_code == "vault_secret_missing"
    vault.put("secret", "conns/ms", {"access_token": AT1})
    lease = await source.refresh(None)
    vault.delete_latest("secret", "conns/ms")
    with pytest.raises(DeadGrant) as err:
        await source.refresh(lease)
    assert err.value.provider_code == "vault_secret_missing"


async def test_bad_token_rereads_file_once_then_misconfigured(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.put("secret", "conns/ms", {"access_token": AT1})
    config = token_config(vault, tmp_path)
    source = VaultSource(CONN, config, http, clock_of(vault))
    await source.lease()
    assert config.token_file is not None
    old = config.token_file.read_text().strip()
    vault.revoke(old)
    # Vault Agent rewrote the sink: the 403 makes the source re-read it and succeed.
    _write(config.token_file, vault.issue_token())
    assert (await source.refresh(None)).access_token == AT1
    # Now revoke for good: one more attempt, then an operator fault.
    vault.tokens.clear()
    calls = len(vault.calls)
    with pytest.raises(CredentialMisconfigured) as err:
        await source.refresh(None)
    assert err.value.provider_code == "vault_permission_denied"
    assert len(vault.calls) - calls == 2


@pytest.mark.parametrize("status", [500, 502, 429, 412])
async def test_server_errors_are_transient(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path, status: int
) -> None:
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock_of(vault))
    vault.fail_next = [status]
    with pytest.raises(CredentialUnavailable) as err:
        await source.lease()
    assert err.value.provider_code == f"vault_http_{status}"
    assert (await source.lease()).access_token == AT1


async def test_sealed_vault_is_transient_and_cached_lease_survives(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock_of(vault))
    lease = await source.lease()
    vault.sealed = True
    assert await source.lease() is lease  # still valid: no Vault call needed
    with pytest.raises(CredentialUnavailable) as err:
        await source.refresh(lease)
    assert err.value.provider_code == "vault_sealed"
    assert "Vault is sealed" in str(err.value)
    vault.sealed = False
    assert (await source.refresh(lease)).access_token == AT1


async def test_unreachable_vault_is_transient(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = VaultSourceConfig(
        kind="vault", address="http://127.0.0.1:9", path="p",
        token_file=_write(tmp_path / "t", "hvs.x"), timeout_seconds=2,
    )
    with pytest.raises(CredentialUnavailable) as err:
        await VaultSource(CONN, config, http).lease()
    assert err.value.provider_code == "vault_unreachable"


async def test_missing_token_file_is_misconfigured(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = VaultSourceConfig(
        kind="vault", address=vault.url, path="p", token_file=tmp_path / "absent"
    )
    with pytest.raises(CredentialMisconfigured):
        await VaultSource(CONN, config, http).lease()


async def test_namespace_header_is_sent(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.namespace = "team-a"
    vault.put("secret", "conns/ms", {"access_token": AT1})
    good = VaultSource(CONN, token_config(vault, tmp_path, namespace="team-a"), http)
    assert (await good.lease()).access_token == AT1
    bad = VaultSource(CONN, token_config(vault, tmp_path), http)
    with pytest.raises(CredentialMisconfigured):
        await bad.lease()


# -- Kubernetes auth and renewal --------------------------------------------------------------


async def test_kubernetes_login_and_renew_self(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = clock_of(vault)
    vault.k8s_ttl = 300
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, k8s_config(vault, tmp_path), http, clock)
    assert (await source.lease()).access_token == AT1
    assert vault.calls[0] == ("POST", "/v1/auth/kubernetes/login", False)
    assert vault.bodies[0] == {"role": "revive", "jwt": "***"}  # the fake masks it in its log
    clock.now += 250  # past 2/3 of the 300 s lease: renew before it ends
    await source.refresh(None)
    paths = [c[1] for c in vault.calls]
    assert paths.count("/v1/auth/token/renew-self") == 1
    assert paths.count("/v1/auth/kubernetes/login") == 1
    assert paths[-1] == "/v1/secret/data/conns/ms"


async def test_kubernetes_non_renewable_token_logs_in_again(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = clock_of(vault)
    vault.k8s_ttl, vault.k8s_renewable = 300, False
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, k8s_config(vault, tmp_path), http, clock)
    await source.lease()
    clock.now += 250
    await source.refresh(None)
    clock.now += 400  # the first token has expired in the fake; the second is in use
    await source.refresh(None)
    paths = [c[1] for c in vault.calls]
    assert "/v1/auth/token/renew-self" not in paths
    assert paths.count("/v1/auth/kubernetes/login") == 3


async def test_kubernetes_max_ttl_reached_logs_in_again(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    clock = clock_of(vault)
    vault.k8s_ttl, vault.max_ttl = 300, 320
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, k8s_config(vault, tmp_path), http, clock)
    await source.lease()
    clock.now += 250
    await source.refresh(None)  # renewed, but only up to 320 s after issue
    clock.now += 60  # expired at the fake: the source knows and logs in instead
    await source.refresh(None)
    paths = [c[1] for c in vault.calls]
    assert paths.count("/v1/auth/kubernetes/login") == 2
    assert ("GET", "/v1/secret/data/conns/ms", True) in vault.calls


async def test_kubernetes_login_refused_is_misconfigured(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = k8s_config(vault, tmp_path)
    vault.k8s_roles["revive"] = "some-other-jwt"
    with pytest.raises(CredentialMisconfigured) as err:
        await VaultSource(CONN, config, http).lease()
    assert err.value.provider_code == "vault_login_refused"
    vault.k8s_roles.clear()
    with pytest.raises(CredentialMisconfigured) as err:
        await VaultSource(CONN, config, http).lease()
    assert "invalid role name" in str(err.value)


async def test_kubernetes_403_on_read_relogs_in_once(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, k8s_config(vault, tmp_path), http, clock_of(vault))
    await source.lease()
    vault.tokens.clear()  # Vault restarted from a snapshot / tokens revoked
    assert (await source.refresh(None)).access_token == AT1
    assert [c[1] for c in vault.calls].count("/v1/auth/kubernetes/login") == 2


# -- write-back with check-and-set ------------------------------------------------------------


async def test_cas_write_two_writers_one_loses(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = token_config(vault, tmp_path, field="refresh_token")
    assert await write_with_cas(http, config, {"refresh_token": "rt-1"}, 0) == 1
    seen = await read_secret(http, config)
    assert (seen.version, seen.data) == (1, {"refresh_token": "rt-1"})
    # Two sidecars both rotated from version 1; only the first write lands.
    assert await write_with_cas(http, config, {"refresh_token": "rt-A"}, seen.version) == 2
    with pytest.raises(VaultCasConflict) as err:
        await write_with_cas(http, config, {"refresh_token": "rt-B"}, seen.version)
    assert isinstance(err.value, CredentialUnavailable)
    assert err.value.provider_code == "vault_cas_mismatch"
    assert vault.latest("secret", "conns/ms") == (2, {"refresh_token": "rt-A"})
    assert "rt-A" not in repr(seen)


async def test_cas_zero_refuses_to_overwrite_and_source_helper(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, token_config(vault, tmp_path), http, clock_of(vault))
    with pytest.raises(VaultCasConflict):
        await source.write_with_cas({"access_token": AT2}, 0)
    assert await source.write_with_cas({"access_token": AT2}, 1) == 2
    assert (await source.refresh(None)).access_token == AT2


async def test_cas_write_when_sealed_is_transient(
    vault: FakeVault, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = token_config(vault, tmp_path)
    vault.sealed = True
    with pytest.raises(CredentialUnavailable) as err:
        await write_with_cas(http, config, {"access_token": AT1}, 0)
    assert not isinstance(err.value, VaultCasConflict)
    assert err.value.provider_code == "vault_sealed"


# -- secrets never leak -----------------------------------------------------------------------


async def test_secrets_never_in_repr_errors_or_logs(
    vault: FakeVault,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = clock_of(vault)
    vault.k8s_ttl = 300
    vault.put("secret", "conns/ms", {"access_token": AT1})
    source = VaultSource(CONN, k8s_config(vault, tmp_path), http, clock)
    lease = await source.lease()
    vault_tokens = list(vault.tokens)
    texts = [repr(source), str(source), repr(lease), repr(source._client)]
    clock.now += 250
    await source.refresh(lease)
    vault.tokens.clear()
    vault.k8s_roles["revive"] = "rotated-elsewhere"
    for failing in (source.refresh(None),):
        with pytest.raises(CredentialMisconfigured) as err:
            await failing
        texts += [str(err.value), repr(err.value), str(err.value.provider_message)]
    vault.k8s_roles["revive"] = JWT
    vault.sealed = True
    with pytest.raises(CredentialUnavailable) as unavailable:
        await source.refresh(None)
    texts += [str(unavailable.value), repr(unavailable.value)]
    texts += [r.getMessage() for r in caplog.records]
    blob = "\n".join(texts)
    for secret in (AT1, JWT, *vault_tokens):
        assert secret not in blob
