"""Reconcile: stamping is pure and idempotent; lookups run against the fake provider over HTTP."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from revive.classify import HeaderStamp, JsonBodyStamp, ReconcileRule, load_policies
from revive.errors import CredentialUnavailable, DeadGrant
from revive.recovery.reconcile import ReconcileResult, Reconciler, stamp_request
from revive.recovery.reconcile import _lookup_url as lookup_url
from revive.sources import StaticSource
from revive.sources.base import Lease
from revive.testing.provider import RunningProvider, running_provider
from yarl import URL

POLICIES = Path(__file__).resolve().parents[2] / "policies"
PROP_ID = "String {00020329-0000-0000-C000-000000000046} Name x-revive-idempotency-key"


@pytest.fixture(scope="module")
def rule() -> ReconcileRule:
    found = load_policies(POLICIES)["microsoft"].reconcile_for("POST", "/v1.0/me/sendMail")
    assert found is not None
    return found


@pytest.fixture
async def source(provider: RunningProvider, tmp_path: Path) -> StaticSource:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"access_token": (await provider.new_grant())["access_token"]}))
    return StaticSource("conn_ms", path)


class FakeSleep:
    """Records every pause instead of taking it; ``then`` runs during a pause (Sent Items fills)."""

    def __init__(self, then: Any = None) -> None:
        self.calls: list[float] = []
        self.then = then

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.then is not None:
            await self.then()
            self.then = None


class FakeSource:
    """A CredentialSource over fixed tokens; ``refresh`` hands out the next one or raises."""

    def __init__(self, token: str, refreshed: str | None = None, error: Exception | None = None):
        self.connection_id = "conn_ms"
        self._lease = Lease("conn_ms", 1, token, None)
        self._refreshed = refreshed
        self._error = error
        self.refreshes = 0

    async def lease(self) -> Lease:
        return self._lease

    async def refresh(self, stale: Lease | None, *, claims: str | None = None) -> Lease:
        self.refreshes += 1
        if self._error is not None:
            raise self._error
        assert self._refreshed is not None
        self._lease = Lease("conn_ms", 1, self._refreshed, None)
        return self._lease

    async def close(self) -> None:
        pass


def message(subject: str = "Quarterly numbers", **extra: Any) -> bytes:
    msg = {
        "subject": subject,
        "body": {"contentType": "Text", "content": "hi"},
        "toRecipients": [{"emailAddress": {"address": "megan@revivelab.onmicrosoft.com"}}],
        **extra,
    }
    return json.dumps({"message": msg, "saveToSentItems": True}).encode()


async def send(provider: RunningProvider, token: str, body: bytes) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with provider.session.post(
        provider.url + "/v1.0/me/sendMail", headers=headers, data=body
    ) as resp:
        assert resp.status == 202, await resp.text()


async def stamp_and_send(
    provider: RunningProvider, source: Any, rule: ReconcileRule, key: str
) -> None:
    body = message()
    stamped = stamp_request(rule, body, CIMultiDict(), key)
    assert stamped is not None and stamped is not body
    await send(provider, (await source.lease()).access_token, stamped)


async def test_stamped_and_sent_mail_is_committed(
    provider: RunningProvider,
    http: aiohttp.ClientSession,
    source: StaticSource,
    rule: ReconcileRule,
) -> None:
    body = message()
    headers: CIMultiDict[str] = CIMultiDict({"Content-Length": str(len(body))})
    stamped = stamp_request(rule, body, headers, "act-7f3a")
    assert stamped is not None
    assert headers["Content-Length"] == str(len(stamped))
    props = json.loads(stamped)["message"]["singleValueExtendedProperties"]
    assert props == [{"id": PROP_ID, "value": "act-7f3a"}]
    await send(provider, (await source.lease()).access_token, stamped)
    assert [m["idempotency_key"] for m in await provider.mails()] == ["act-7f3a"]

    sleep = FakeSleep()
    result = await Reconciler(sleep=sleep).lookup(
        rule, URL(provider.url), source, http, "act-7f3a"
    )

    assert result.outcome == "committed"
    assert (result.evidence["polls"], result.evidence["statuses"]) == (1, [200])
    assert result.evidence["reason"] == "found" and sleep.calls == []
    assert "act-7f3a" in result.evidence["request"]["query"]["$filter"]
    token = (await source.lease()).access_token
    assert token not in json.dumps(result.evidence) and token not in repr(result)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.outcome = "not_committed"  # type: ignore[misc]


async def test_never_sent_key_is_not_committed_after_every_poll(
    provider: RunningProvider,
    http: aiohttp.ClientSession,
    source: StaticSource,
    rule: ReconcileRule,
) -> None:
    await stamp_and_send(provider, source, rule, "some-other-key")
    sleep = FakeSleep()
    result = await Reconciler(sleep=sleep).lookup(
        rule, URL(provider.url), source, http, "never-sent"
    )

    assert result.outcome == "not_committed"
    attempts = rule.lookup.attempts
    assert result.evidence["polls"] == attempts
    assert result.evidence["statuses"] == [200] * attempts
    assert sleep.calls == [rule.lookup.interval_s] * (attempts - 1)
    lookups = await provider.calls("/v1.0/me/mailFolders/")
    assert len(lookups) == attempts


async def test_mail_that_reaches_sent_items_late_is_found_on_a_later_poll(
    provider: RunningProvider,
    http: aiohttp.ClientSession,
    source: StaticSource,
    rule: ReconcileRule,
) -> None:
    async def arrives() -> None:
        await stamp_and_send(provider, source, rule, "late-1")

    sleep = FakeSleep(then=arrives)
    result = await Reconciler(sleep=sleep).lookup(rule, URL(provider.url), source, http, "late-1")
    assert result.outcome == "committed"
    assert result.evidence["polls"] == 2 and len(sleep.calls) == 1


async def test_key_with_quote_is_escaped_and_found(
    provider: RunningProvider,
    http: aiohttp.ClientSession,
    source: StaticSource,
    rule: ReconcileRule,
) -> None:
    key = "o'brien & co+1 ü"
    await stamp_and_send(provider, source, rule, key)
    assert (await provider.mails())[0]["idempotency_key"] == key  # stamped raw, not escaped

    result = await Reconciler(sleep=FakeSleep()).lookup(rule, URL(provider.url), source, http, key)
    assert result.outcome == "committed"
    assert "ep/value eq 'o''brien & co+1 ü'" in result.evidence["request"]["query"]["$filter"]
    # an unescaped look for a prefix must not match: the literal really is closed correctly
    other = await Reconciler(sleep=FakeSleep()).lookup(
        rule, URL(provider.url), source, http, "o'brien"
    )
    assert other.outcome == "not_committed"


def test_restamping_is_idempotent_and_replaces_a_stale_value(rule: ReconcileRule) -> None:
    once = stamp_request(rule, message(), CIMultiDict(), "k-1")
    assert once is not None
    assert stamp_request(rule, once, CIMultiDict(), "k-1") == once

    stale = message(
        singleValueExtendedProperties=[
            {"id": "String {aaaa} Name other", "value": "keep"},
            {"id": PROP_ID.upper(), "value": "old"},
            {"id": PROP_ID, "value": "older"},
        ]
    )
    stamped = stamp_request(rule, stale, CIMultiDict(), "k-2")
    assert stamped is not None
    props = json.loads(stamped)["message"]["singleValueExtendedProperties"]
    assert props == [
        {"id": "String {aaaa} Name other", "value": "keep"},
        {"id": PROP_ID, "value": "k-2"},
    ]
    assert b": " not in stamped and b", " not in stamped  # compact


def test_missing_containers_are_created(rule: ReconcileRule) -> None:
    for body, expected_rest in (
        (b"{}", {}),
        (b'{"message": null, "saveToSentItems": false}', {"saveToSentItems": False}),
        (b'{"message": {"singleValueExtendedProperties": null}}', {}),
    ):
        stamped = stamp_request(rule, body, CIMultiDict(), "k")
        assert stamped is not None
        doc = json.loads(stamped)
        entries = [{"id": PROP_ID, "value": "k"}]
        assert doc.pop("message") == {"singleValueExtendedProperties": entries}
        assert doc == expected_rest


def test_body_that_cannot_carry_the_stamp_is_returned_unchanged(rule: ReconcileRule) -> None:
    for body in (
        None,
        b"",
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'"message"',
        b'{"message": "a string"}',
        b'{"message": {"singleValueExtendedProperties": {"not": "a list"}}}',
    ):
        headers: CIMultiDict[str] = CIMultiDict({"Content-Length": "9"})
        assert stamp_request(rule, body, headers, "k") is body
        assert headers["Content-Length"] == "9"


def test_header_stamp_sets_and_replaces_the_header(rule: ReconcileRule) -> None:
    stamp = HeaderStamp("Idempotency-Key", "revive-{idempotency_key}")
    header_rule = dataclasses.replace(rule, stamp=stamp)
    body = b'{"amount": 100}'
    headers: CIMultiDict[str] = CIMultiDict({"idempotency-key": "client-chose-this"})
    assert stamp_request(header_rule, body, headers, "k-9") is body
    assert headers.getall("Idempotency-Key") == ["revive-k-9"]
    assert stamp_request(header_rule, None, headers, "k-9") is None
    assert headers.getall("Idempotency-Key") == ["revive-k-9"]


def test_internet_message_header_entries_dedupe_by_name(rule: ReconcileRule) -> None:
    entry = {"name": "x-revive-idempotency-key", "value": "{idempotency_key}"}
    stamp = JsonBodyStamp("/message/internetMessageHeaders", entry)
    header_rule = dataclasses.replace(rule, stamp=stamp)
    body = message(internetMessageHeaders=[{"name": "X-Revive-Idempotency-Key", "value": "old"}])
    stamped = stamp_request(header_rule, body, CIMultiDict(), "k-3")
    assert stamped is not None
    assert json.loads(stamped)["message"]["internetMessageHeaders"] == [
        {"name": "x-revive-idempotency-key", "value": "k-3"}
    ]


async def test_expired_token_is_refreshed_once(
    provider: RunningProvider, http: aiohttp.ClientSession, rule: ReconcileRule
) -> None:
    old = (await provider.new_grant())["access_token"]
    await provider.fault("expire_token")
    fresh = (await provider.new_grant())["access_token"]
    src = FakeSource(old, refreshed=fresh)
    await stamp_and_send(provider, FakeSource(fresh), rule, "k-401")

    result = await Reconciler(sleep=FakeSleep()).lookup(rule, URL(provider.url), src, http, "k-401")
    assert result.outcome == "committed"
    assert result.evidence["statuses"] == [401, 200] and result.evidence["refreshed"] is True
    assert src.refreshes == 1


async def test_second_401_after_refresh_is_undetermined(
    provider: RunningProvider, http: aiohttp.ClientSession, rule: ReconcileRule
) -> None:
    src = FakeSource("not-a-token", refreshed="still-not-a-token")
    result = await Reconciler(sleep=FakeSleep()).lookup(rule, URL(provider.url), src, http, "k")
    assert result.outcome == "undetermined"
    assert result.evidence["reason"] == "unauthorized_after_refresh"
    assert result.evidence["statuses"] == [401, 401] and src.refreshes == 1


async def test_dead_grant_during_lookup_propagates(
    provider: RunningProvider, http: aiohttp.ClientSession, rule: ReconcileRule
) -> None:
    token = (await provider.new_grant())["access_token"]
    await provider.fault("kill_grant")
    src = FakeSource(token, error=DeadGrant("grant expired", provider_code="AADSTS700082"))
    with pytest.raises(DeadGrant) as caught:
        await Reconciler(sleep=FakeSleep()).lookup(rule, URL(provider.url), src, http, "k")
    assert caught.value.provider_code == "AADSTS700082" and src.refreshes == 1


async def test_transient_refresh_failure_propagates(
    provider: RunningProvider, http: aiohttp.ClientSession, rule: ReconcileRule
) -> None:
    src = FakeSource("expired", error=CredentialUnavailable("token endpoint down"))
    with pytest.raises(CredentialUnavailable):
        await Reconciler(sleep=FakeSleep()).lookup(rule, URL(provider.url), src, http, "k")


async def test_unavailable_on_every_attempt_is_undetermined(
    provider: RunningProvider,
    http: aiohttp.ClientSession,
    source: StaticSource,
    rule: ReconcileRule,
) -> None:
    attempts = rule.lookup.attempts
    await provider.fault("unavailable", count=attempts)
    sleep = FakeSleep()
    result = await Reconciler(sleep=sleep).lookup(rule, URL(provider.url), source, http, "k")
    assert result.outcome == "undetermined" and result.evidence["reason"] == "no_clean_answer"
    assert result.evidence["statuses"] == [503] * attempts
    assert len(sleep.calls) == attempts - 1


async def test_one_unavailable_poll_rules_out_not_committed_but_not_found_later(
    provider: RunningProvider,
    http: aiohttp.ClientSession,
    source: StaticSource,
    rule: ReconcileRule,
) -> None:
    await provider.fault("unavailable", count=1)
    reconciler = Reconciler(sleep=FakeSleep())
    result = await reconciler.lookup(rule, URL(provider.url), source, http, "absent")
    assert result.outcome == "undetermined"
    assert result.evidence["statuses"][0] == 503

    await stamp_and_send(provider, source, rule, "present")
    await provider.fault("unavailable", count=1)
    found = await reconciler.lookup(rule, URL(provider.url), source, http, "present")
    assert found.outcome == "committed" and found.evidence["statuses"] == [503, 200]


async def test_connection_errors_are_undetermined(
    http: aiohttp.ClientSession, rule: ReconcileRule
) -> None:
    async with running_provider() as gone:
        url = URL(gone.url)
    sleep = FakeSleep()
    result = await Reconciler(sleep=sleep).lookup(rule, url, FakeSource("t"), http, "k")
    assert result.outcome == "undetermined"
    assert all(isinstance(s, str) for s in result.evidence["statuses"])
    assert result.evidence["polls"] == rule.lookup.attempts


async def test_refused_lookup_stops_at_once(
    provider: RunningProvider,
    http: aiohttp.ClientSession,
    source: StaticSource,
    rule: ReconcileRule,
) -> None:
    bad = dataclasses.replace(
        rule, lookup=dataclasses.replace(rule.lookup, path="/v1.0/me/mailFolders/Nowhere/messages")
    )
    sleep = FakeSleep()
    result = await Reconciler(sleep=sleep).lookup(bad, URL(provider.url), source, http, "k")
    assert isinstance(result, ReconcileResult)
    assert (result.outcome, result.evidence["statuses"], sleep.calls) == ("undetermined", [404], [])
    assert result.evidence["reason"] == "lookup_refused"


def test_lookup_url_keeps_base_prefix_and_encodes_spaces() -> None:
    url = lookup_url(
        URL("https://graph.example/proxy/"),
        "/v1.0/me/messages",
        (("$filter", "a eq 'x y+z&w'"),),
    )
    assert url.raw_path == "/proxy/v1.0/me/messages"
    assert re.fullmatch(r"\$filter=a%20eq%20'x%20y%2Bz%26w'", url.raw_query_string)
    assert url.query["$filter"] == "a eq 'x y+z&w'"
