"""Issue #3 acceptance: the run_7f2 stories, black-box over HTTP."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from revive.lab.settings import LAB_CONNECTION

from revive.testing.story import RUN, WORKFLOW, Story

TOKEN_MARKERS = ("lab_at_", "lab_rt_", "lab_code_")


async def _kill_grant_at_send(story: Story) -> tuple[str, dict[str, object]]:
    """Calendar read OK, grant killed, sendMail answers 424: returns the run token and problem."""
    token = await story.mint(checkpoint="chk-calendar")
    events = await story.graph("GET", "v1.0/me/events", token)
    assert events.status == 200
    await story.provider.fault("kill_grant")
    failed = await story.send_briefing(token)
    assert failed.status == 424, failed.text
    return token, failed.body


async def test_run_7f2_dead_grant_recovers_the_same_run_with_one_mail(story: Story) -> None:
    old_token, problem = await _kill_grant_at_send(story)
    assert problem["type"] == "urn:revive:recovery-required"
    assert problem["provider_code"] == "AADSTS700082"
    assert problem["run_id"] == RUN and problem["checkpoint_id"] == "chk-send"
    assert problem["action_key"] == "send-briefing"
    case_id = problem["case_id"]

    case = await story.case(case_id)
    assert case["run_id"] == RUN and case["connection_id"] == LAB_CONNECTION
    assert case["checkpoint_id"] == "chk-send" and case["action_key"] == "send-briefing"
    assert case["idempotency_key"] and case["generation"] == 1
    assert case["provider_code"] == "AADSTS700082" and case["state"] == "open"
    assert case["workflow"] is None or case["workflow"] == WORKFLOW

    # While the case is open the run cannot mint its way past it.
    blocked = await story.call(
        "POST", f"/v1/runs/{RUN}/capabilities",
        json={"connection_id": LAB_CONNECTION, "checkpoint_id": "chk-send", "epoch": 1},
    )
    assert blocked.status == 424 and blocked.body["case_id"] == case_id

    callback = await story.reconnect()
    assert callback.status == 200, callback.text
    case = await story.case(case_id)
    assert case["state"] == "ready" and case["outcome"] == "not_committed"
    reconnected = next(t for t in case["transitions"] if t["to_state"] == "reconnected")
    assert reconnected["evidence"]["generation"] == 2
    assert reconnected["evidence"]["probe"]["status"] == 200

    issued = await story.call("POST", f"/v1/cases/{case_id}/capability", admin=True, json={})
    assert issued.status == 200, issued.text
    redeemed = await story.call(
        "POST", "/v1/capabilities/redeem", json={"capability": issued.body["capability"]}
    )
    assert redeemed.status == 200, redeemed.text
    assert redeemed.body["epoch"] == 2 and redeemed.body["generation"] == 2
    assert redeemed.body["checkpoint_id"] == "chk-send"
    assert redeemed.body["action"]["outcome"] == "not_committed"
    new_token = redeemed.body["capability"]

    sent = await story.send_briefing(new_token)
    assert sent.status == 202, sent.text
    case = await story.case_reaching(case_id, "closed")
    assert [t["to_state"] for t in case["transitions"]] == [
        "open", "reconnected", "ready", "resumed", "closed"
    ]
    assert all(t["actor"] and t["at"] for t in case["transitions"])
    assert len(await story.provider.mails()) == 1

    # The worker left over from before the recovery is fenced, reading or writing.
    for stale in (
        await story.graph("GET", "v1.0/me", old_token),
        await story.send_briefing(old_token),
    ):
        assert stale.status == 409, stale.text
        assert stale.body["type"] == "urn:revive:fenced"
    assert len(await story.provider.mails()) == 1


async def test_unknown_outcome_meets_dead_grant_and_replays(story: Story) -> None:
    token = await story.mint()
    await story.provider.fault("commit_then_drop")
    dropped = await story.send_briefing(token)
    assert dropped.status == 502 and dropped.body["type"] == "urn:revive:outcome-unknown"
    assert len(await story.provider.mails()) == 1
    await story.provider.fault("kill_grant")

    retry = await story.send_briefing(token)  # reconcile needs a refresh: the grant is dead
    assert retry.status == 424, retry.text
    case = await story.case(retry.body["case_id"])
    unknown = [a for a in case["actions"] if a["idempotency_key"] == case["idempotency_key"]]
    assert unknown and unknown[0]["state"] == "unknown"

    assert (await story.reconnect()).status == 200
    case = await story.case(retry.body["case_id"])
    assert case["state"] == "ready" and case["outcome"] == "committed"
    issued = await story.call(
        "POST", f"/v1/cases/{case['case_id']}/capability", admin=True, json={}
    )
    redeemed = await story.call(
        "POST", "/v1/capabilities/redeem", json={"capability": issued.body["capability"]}
    )
    assert redeemed.status == 200 and redeemed.body["action"]["outcome"] == "committed"
    resumed = await story.send_briefing(redeemed.body["capability"])
    assert resumed.status == 202  # the policy's answer for a committed sendMail
    assert resumed.headers.get("Revive-Replayed") == "true"
    assert len(await story.provider.mails()) == 1
    assert (await story.case(case["case_id"]))["state"] == "closed"


async def test_twenty_concurrent_redemptions_one_wins(story: Story) -> None:
    _, problem = await _kill_grant_at_send(story)
    assert (await story.reconnect()).status == 200
    issued = await story.call(
        "POST", f"/v1/cases/{problem['case_id']}/capability", admin=True, json={}
    )
    body = {"capability": issued.body["capability"]}
    answers = await asyncio.gather(
        *(story.call("POST", "/v1/capabilities/redeem", json=body) for _ in range(20))
    )
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] + [401] * 19
    assert all(
        a.body["type"] == "urn:revive:capability-invalid" for a in answers if a.status == 401
    )


async def test_no_token_in_the_database_the_answers_or_the_case(story: Story) -> None:
    _, problem = await _kill_grant_at_send(story)
    assert (await story.reconnect()).status == 200
    case = await story.call("GET", f"/v1/cases/{problem['case_id']}", admin=True)
    for marker in TOKEN_MARKERS:
        assert marker not in case.text
    grant_dir: Path = story.data_dir
    raw = b"".join([await asyncio.to_thread(p.read_bytes) for p in grant_dir.glob("revive.db*")])
    assert raw, "the SQLite files exist"
    for marker in TOKEN_MARKERS:
        assert marker.encode() not in raw


async def test_worker_settles_an_unknown_outcome_when_no_reconcile_exists(
    generic_story: Story,
) -> None:
    story = generic_story
    token = await story.mint()
    await story.provider.fault("commit_then_drop")
    dropped = await story.send_briefing(token)
    assert dropped.status == 502
    key = dropped.body["idempotency_key"]

    blocked = await story.send_briefing(token)  # nothing re-executes an unknown outcome
    assert blocked.status == 409 and blocked.body["type"] == "urn:revive:reconcile-required"
    assert len(await story.provider.mails()) == 1

    settled = await story.call(
        "POST", f"/v1/actions/{key}/outcome",
        json={"outcome": "committed", "evidence": {"checked": "Sent Items by hand"}},
    )
    assert settled.status == 200, settled.text
    replayed = await story.send_briefing(token)
    assert replayed.status == 200 and replayed.headers["Revive-Replayed"] == "true"
    assert len(await story.provider.mails()) == 1


async def test_one_reconnect_advances_every_case_of_the_connection(story: Story) -> None:
    first = await story.mint(run="run_a")
    second = await story.mint(run="run_b")
    await story.provider.fault("kill_grant")
    cases = []
    for token in (first, second):
        failed = await story.send_briefing(token)
        assert failed.status == 424
        cases.append(failed.body["case_id"])
    assert len(set(cases)) == 2  # one case per run
    assert (await story.reconnect()).status == 200
    for case_id in cases:
        assert (await story.case(case_id))["state"] == "ready"


async def test_no_token_in_the_logs_of_a_whole_story(
    story: Story, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, problem = await _kill_grant_at_send(story)
    assert (await story.reconnect()).status == 200
    issued = await story.call(
        "POST", f"/v1/cases/{problem['case_id']}/capability", admin=True, json={}
    )
    redeemed = await story.call(
        "POST", "/v1/capabilities/redeem", json={"capability": issued.body["capability"]}
    )
    assert (await story.send_briefing(redeemed.body["capability"])).status == 202
    text = caplog.text
    assert "recovery case" in text  # the story was logged...
    for marker in TOKEN_MARKERS:  # ...without a provider token
        assert marker not in text
    assert re.search(r"eyJ[\w-]+\.[\w-]+\.", text) is None  # nor a capability


async def test_a_case_opened_by_a_read_closes_at_redemption(story: Story) -> None:
    token = await story.mint()
    await story.provider.fault("kill_grant")
    failed = await story.graph("GET", "v1.0/me/events", token)
    assert failed.status == 424
    assert (await story.reconnect()).status == 200
    issued = await story.call(
        "POST", f"/v1/cases/{failed.body['case_id']}/capability", admin=True, json={}
    )
    redeemed = await story.call(
        "POST", "/v1/capabilities/redeem", json={"capability": issued.body["capability"]}
    )
    assert redeemed.status == 200 and redeemed.body["action"] is None
    assert (await story.case(failed.body["case_id"]))["state"] == "closed"
    again = await story.graph("GET", "v1.0/me/events", redeemed.body["capability"])
    assert again.status == 200
