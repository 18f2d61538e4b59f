"""Issue #7 acceptance: run_7f2 with the ``nango`` source, black-box over HTTP.

The grant lives in (fake) Nango, which refreshes it at the (fake) Microsoft provider. The
reconnect is a human re-authorizing in Nango's connect UI; Nango then POSTs its signed
``auth`` webhook to the sidecar by itself: the test makes no reconnect call of its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from revive.lab.settings import LAB_CONNECTION
from revive.testing.cli import run_cli
from revive.testing.fake_nango import send_auth_webhook, webhook_body
from revive.testing.nango_story import (
    NANGO_CONNECTION,
    NANGO_INTEGRATION,
    SECRET_KEY,
    NangoStory,
    running_nango_story,
)
from revive.testing.story import RUN, Story

AUTH_FAILED = "identity-layer-auth-failed"
TOKEN_MARKERS = ("lab_at_", "lab_rt_", "lab_code_")


@pytest.fixture
async def nango_story(tmp_path: Path) -> AsyncIterator[NangoStory]:
    async with running_nango_story(tmp_path) as running:
        yield running


async def _at_risk(story: Story) -> list[dict[str, Any]]:
    answer = await story.call("GET", "/v1/connections/at-risk", admin=True)
    assert answer.status == 200, answer.text
    connections: list[dict[str, Any]] = answer.body["connections"]
    return connections


def _override() -> bytes:
    return webhook_body(NANGO_CONNECTION, NANGO_INTEGRATION, operation="override")


async def test_run_7f2_recovers_through_a_signed_nango_webhook(nango_story: NangoStory) -> None:
    story, nango = nango_story.story, nango_story.nango
    old_token = await story.mint(checkpoint="chk-calendar")
    assert (await story.graph("GET", "v1.0/me/events", old_token)).status == 200
    await story.provider.fault("kill_grant")

    # Nango's refresh at the provider fails the documented way: the dead grant reaches the run.
    failed = await story.send_briefing(old_token)
    assert failed.status == 424, failed.text
    problem = failed.body
    assert problem["type"] == "urn:revive:recovery-required"
    assert problem["provider_code"] == "AADSTS700082"
    assert (problem["run_id"], problem["checkpoint_id"], problem["action_key"]) == (
        RUN, "chk-send", "send-briefing"
    )
    case_id = problem["case_id"]
    case = await story.case(case_id)
    assert (case["state"], case["generation"], case["connection_id"]) == ("open", 1, LAB_CONNECTION)
    # Nango also reported the failed refresh by webhook: the connection is marked at risk.
    assert json.loads(nango.webhooks[-1].body)["success"] is False
    assert [(r["connection_id"], r["reason"]) for r in await _at_risk(story)] == [
        (LAB_CONNECTION, AUTH_FAILED)
    ]

    # Forged, unsigned, or signed with the API key instead of the signing key: 401, no change.
    url = nango_story.webhook_url
    forged = await send_auth_webhook(url, nango_story.signing_key, _override(), forged=True)
    wrong_key = await send_auth_webhook(url, SECRET_KEY, _override())
    async with story.http.post(url, data=_override(),
                               headers={"Content-Type": "application/json"}) as resp:
        unsigned = (resp.status, await resp.read())
    for status, body in (forged, wrong_key, unsigned):
        assert status == 401
        assert json.loads(body)["type"] == "urn:revive:webhook-signature-invalid"
    assert await story.case(case_id) == case

    # The human re-authorizes in Nango; Nango exchanges the code and sends the webhook itself.
    page = await nango_story.reconnect_in_nango()
    assert page.status == 200, page.text
    delivery = nango.webhooks[-1]
    sent = json.loads(delivery.body)
    assert (sent["type"], sent["operation"], sent["success"]) == ("auth", "override", True)
    assert delivery.status == 200, delivery.answer
    answer = json.loads(delivery.answer)
    assert (answer["handled"], answer["action"], answer["connections"]) == (
        True, "reconnected", [LAB_CONNECTION]
    )
    assert [(c["case_id"], c["state"]) for c in answer["advanced"]] == [(case_id, "ready")]
    assert await _at_risk(story) == []
    # Nango retries a webhook whose answer it missed: nothing waits, nothing moves again.
    status, again = await send_auth_webhook(url, nango_story.signing_key, delivery.body)
    assert status == 200 and json.loads(again)["action"] == "cleared"

    # Generation 2 is proven by the probe; reconcile says the mail never went out.
    case = await story.case(case_id)
    assert case["state"] == "ready" and case["outcome"] == "not_committed"
    reconnected = next(t for t in case["transitions"] if t["to_state"] == "reconnected")
    assert reconnected["actor"] == "nango-webhook"
    assert reconnected["evidence"]["generation"] == 2
    assert reconnected["evidence"]["probe"]["status"] == 200
    assert reconnected["evidence"]["nango_operation"] == "override"

    issued = await story.call("POST", f"/v1/cases/{case_id}/capability", admin=True, json={})
    assert issued.status == 200, issued.text
    redeemed = await story.call(
        "POST", "/v1/capabilities/redeem", json={"capability": issued.body["capability"]}
    )
    assert redeemed.status == 200, redeemed.text
    assert (redeemed.body["epoch"], redeemed.body["generation"]) == (2, 2)
    assert redeemed.body["action"]["outcome"] == "not_committed"
    sent_mail = await story.send_briefing(redeemed.body["capability"])
    assert sent_mail.status == 202, sent_mail.text

    case = await story.case_reaching(case_id, "closed")
    assert [(t["to_state"], t["actor"]) for t in case["transitions"]] == [
        ("open", "proxy"), ("reconnected", "nango-webhook"), ("ready", "reconciler"),
        ("resumed", "worker"), ("closed", "proxy"),
    ]
    assert all(t["at"] for t in case["transitions"])
    assert len(await story.provider.mails()) == 1
    for stale in (await story.graph("GET", "v1.0/me", old_token),
                  await story.send_briefing(old_token)):
        assert stale.status == 409 and stale.body["type"] == "urn:revive:fenced"
    assert len(await story.provider.mails()) == 1
    for marker in TOKEN_MARKERS:
        assert marker not in json.dumps(case)


async def test_a_failed_refresh_marks_the_connection_at_risk_and_opens_nothing(
    nango_story: NangoStory,
) -> None:
    story, nango = nango_story.story, nango_story.nango
    await story.provider.fault("kill_grant")
    # Nango's own scheduled refresh fails; no run is involved.
    assert await nango.background_refresh(NANGO_CONNECTION, NANGO_INTEGRATION) is False
    delivery = nango.webhooks[-1]
    assert delivery.status == 200 and json.loads(delivery.answer)["action"] == "at_risk"

    [risk] = await _at_risk(story)
    assert (risk["connection_id"], risk["reason"], risk["origin"]) == (
        LAB_CONNECTION, AUTH_FAILED, "store"
    )
    assert "refresh" in risk["detail"] and risk["since"] is not None
    for secret in (*TOKEN_MARKERS, nango_story.signing_key, SECRET_KEY):
        assert secret not in json.dumps(risk)
    cases = await story.call("GET", "/v1/cases", admin=True)
    assert cases.status == 200 and cases.body["cases"] == []

    metrics = await story.call("GET", "/metrics")
    expected = (
        f'revive_connections_at_risk{{connection="{LAB_CONNECTION}",reason="{AUTH_FAILED}"}} 1.0'
    )
    assert expected in metrics.text

    token_file = str(story.data_dir / "admin-token")
    table = await run_cli("cases", "list", "--at-risk", "--url", story.sidecar.url,
                          "--admin-token-file", token_file)
    assert table.code == 0, table.stderr
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:2] == ["CONNECTION_ID", "REASON"]
    assert row.split()[:2] == [LAB_CONNECTION, AUTH_FAILED]
    listed = await run_cli("cases", "list", "--at-risk", "--json", "--url", story.sidecar.url,
                           "--admin-token-file", token_file)
    assert json.loads(listed.stdout)["connections"] == [risk]
    no_cases = await run_cli("cases", "list", "--url", story.sidecar.url,
                             "--admin-token-file", token_file)
    assert (no_cases.code, no_cases.stdout.strip()) == (0, "no cases")

    # The human re-authorizes before any run failed: nothing to recover, the mark goes.
    assert (await nango_story.reconnect_in_nango()).status == 200
    answer = json.loads(nango.webhooks[-1].answer)
    assert (answer["handled"], answer["action"], answer["advanced"]) == (True, "cleared", [])
    assert await _at_risk(story) == []
    assert "revive_connections_at_risk{" not in (await story.call("GET", "/metrics")).text
    token = await story.mint()
    assert (await story.send_briefing(token)).status == 202  # the new grant works
    assert (await story.call("GET", "/v1/cases", admin=True)).body["cases"] == []


async def test_other_webhooks_are_acknowledged_and_change_nothing(
    nango_story: NangoStory,
) -> None:
    story, key, url = nango_story.story, nango_story.signing_key, nango_story.webhook_url
    sync = json.dumps({"type": "sync", "connectionId": NANGO_CONNECTION,
                       "providerConfigKey": NANGO_INTEGRATION, "success": True}).encode()
    other = webhook_body("someone-else", NANGO_INTEGRATION, success=False)
    later = json.dumps({"type": "auth", "operation": "teleport", "connectionId": NANGO_CONNECTION,
                        "providerConfigKey": NANGO_INTEGRATION, "success": False}).encode()
    for body in (sync, other, later):
        status, answer = await send_auth_webhook(url, key, body)
        assert status == 200, answer
        assert json.loads(answer)["handled"] is False
    assert await _at_risk(story) == []

    for bad in (b"not json", b"[1, 2]", b'{"type": "auth", "operation": "refresh"}'):
        status, answer = await send_auth_webhook(url, key, bad)
        assert status == 400 and json.loads(answer)["type"] == "urn:revive:bad-request"
    status, answer = await send_auth_webhook(url, key, b" " * (256 * 1024 + 1))
    assert status == 413 and json.loads(answer)["type"] == "urn:revive:payload-too-large"
    assert await _at_risk(story) == []
    assert (await story.call("GET", "/v1/cases", admin=True)).body["cases"] == []
