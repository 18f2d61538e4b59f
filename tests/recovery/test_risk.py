"""Grants at risk and Nango's webhooks, at the function level with a real store.

The recovery service is stood in for by what ``revive.recovery.risk`` reads from it (``store``
and ``bindings``); the full path, reconnect included, is ``test_story_nango.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from revive.config import NangoSourceConfig
from revive.errors import WebhookSignatureInvalid
from revive.recovery import risk
from revive.sources import GrantRisk
from revive.sources.nango import NangoSource, sign_nango_webhook
from revive.store import SqliteStore, Store
from revive.testing.fake_nango import webhook_body

KEY_A, KEY_B = "whsk-canary-aaaaaaaaaaaa", "whsk-canary-bbbbbbbbbbbb"


@dataclass
class _Binding:
    source: Any


@dataclass
class _Reporting:
    """A source that sees its own risk coming (as oauth2's idle-grant keep-alive will)."""

    report: GrantRisk | None
    asked: list[float | None] = field(default_factory=list)

    def grant_risk(self, now: float | None = None) -> GrantRisk | None:
        self.asked.append(now)
        return self.report


@dataclass
class _Service:
    store: Store
    bindings: dict[str, _Binding]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with SqliteStore.open(tmp_path / "revive.db") as opened:
        yield opened


def _nango(tmp_path: Path, http: aiohttp.ClientSession, name: str, key: str | None) -> NangoSource:
    secret = tmp_path / f"{name}.secret"
    secret.write_text(f"sk-{name}-0123456789")
    signing = tmp_path / f"{name}.signing"
    if key is not None:
        signing.write_text(key)
    config = NangoSourceConfig(
        kind="nango", base_url="http://127.0.0.1:9", secret_key_file=secret,
        webhook_secret_file=signing, connection_id=f"nango-{name}", provider_config_key="ms",
    )
    return NangoSource(f"conn_{name}", config, http)


async def _deliver(service: _Service, body: bytes, key: str) -> risk.WebhookOutcome:
    """The webhook as Nango signs it with ``key``."""
    headers = {"X-Nango-Hmac-Sha256": sign_nango_webhook(key.encode(), body)}
    return await risk.nango_webhook(service, body, headers)  # type: ignore[arg-type]


async def test_sources_and_marks_merge_one_per_connection_and_reason(store: Store) -> None:
    await store.mark_at_risk("conn_a", "identity-layer-auth-failed", "nango said so")
    idle = GrantRisk("conn_b", "idle-grant-expiring", "unused for 85 days", 1_900_000_000.0)
    same = GrantRisk("conn_a", "identity-layer-auth-failed", "the source agrees")
    reporting = _Reporting(idle)
    service = _Service(store, {
        "conn_a": _Binding(_Reporting(same)),
        "conn_b": _Binding(reporting),
        "conn_c": _Binding(_Reporting(None)),
        "conn_d": _Binding(object()),  # a source that cannot tell
    })
    found = await risk.connections_at_risk(service, now=1_800_000_000.0)  # type: ignore[arg-type]
    assert [(r.connection_id, r.reason, r.origin) for r in found] == [
        ("conn_a", "identity-layer-auth-failed", "store"),
        ("conn_b", "idle-grant-expiring", "source"),
    ]
    assert found[0].detail == "nango said so" and found[0].since is not None
    assert (found[1].expires_at, found[1].since) == (1_900_000_000.0, None)
    assert reporting.asked == [1_800_000_000.0]


async def test_a_webhook_counts_only_for_the_sources_its_key_signs_for(
    store: Store, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    a, b = _nango(tmp_path, http, "a", KEY_A), _nango(tmp_path, http, "b", KEY_B)
    service = _Service(store, {"conn_a": _Binding(a), "conn_b": _Binding(b)})
    body = webhook_body("nango-b", "ms", operation="refresh", success=False)
    # Signed with a's key but naming b's connection: a verifies it, b never would.
    crossed = await _deliver(service, body, KEY_A)
    assert (crossed.handled, crossed.action) == (False, "ignored")
    assert await store.list_at_risk() == []
    marked = await _deliver(service, body, KEY_B)
    assert (marked.handled, marked.action, marked.connections) == (True, "at_risk", ("conn_b",))
    [mark] = await store.list_at_risk()
    assert (mark.connection_id, mark.reason) == ("conn_b", "identity-layer-auth-failed")
    assert "refresh_token_external_error" in mark.detail


async def test_an_unreadable_signing_key_refuses_only_its_own_webhooks(
    store: Store, tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    broken, b = _nango(tmp_path, http, "a", None), _nango(tmp_path, http, "b", KEY_B)
    service = _Service(store, {"conn_a": _Binding(broken), "conn_b": _Binding(b)})
    body = webhook_body("nango-a", "ms", success=False)
    with pytest.raises(WebhookSignatureInvalid) as refused:
        await _deliver(service, body, KEY_A)
    assert KEY_A not in str(refused.value) and KEY_B not in str(refused.value)
    assert "no signing key for conn_a" in caplog.text
    body = webhook_body("nango-b", "ms", success=False)
    done = await _deliver(service, body, KEY_B)
    assert done.action == "at_risk"
    assert KEY_B not in caplog.text


async def test_a_failure_detail_is_redacted_and_bounded(
    store: Store, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    source = _nango(tmp_path, http, "a", KEY_A)
    service = _Service(store, {"conn_a": _Binding(source)})
    description = f"upstream said: refresh_token=lab_rt_canary123 key {KEY_A} " + "x" * 2000
    body = webhook_body("nango-a", "ms", success=False, error_description=description)
    outcome = await _deliver(service, body, KEY_A)
    [mark] = await store.list_at_risk()
    for text in (mark.detail, outcome.note, json.dumps(outcome.connections)):
        assert "lab_rt_canary123" not in text and KEY_A not in text
    assert len(mark.detail) <= 300
