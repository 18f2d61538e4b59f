"""Found by the chaos soak (issue #9): a resumed case must close however its action commits.

The proxy closed a ``resumed`` case only when it relayed the action's 2xx itself. Two other
ways to commit left the case ``resumed`` for ever:
- the resumed run's retry met an ``unknown`` outcome (its first resumed attempt was dropped,
  or a killed sidecar's sweep left it) and a reconcile — the policy's or the worker's —
  settled it ``committed``;
- the sidecar died between the ledger's commit and the case's close (a second step), or
  between a redemption and the close it implies; nothing looked again after a restart;
- the resumed attempt met a dead grant again: a second case took the action over, and the
  commit closed only that one;
- the sidecar relayed the resumed send's 202 and died before the ledger recorded it: the run
  moved on, the restart swept the claim to ``unknown``, and nobody asked the provider again.
"""

from __future__ import annotations

from pathlib import Path

from revive.app import STORE
from revive.store import ClaimRequest, Store
from revive.testing.provider import running_provider
from revive.testing.soak.runtime import STAMP_ID
from revive.testing.story import RUN, Story, briefing, granted_lab_settings, story_on


async def _resumed(story: Story) -> tuple[str, str]:
    """A run parked by a dead grant at sendMail, reconnected and redeemed: (case, capability)."""
    token = await story.mint()
    await story.provider.fault("kill_grant")
    failed = await story.send_briefing(token)
    assert failed.status == 424, failed.text
    case_id = failed.body["case_id"]
    assert (await story.reconnect()).status == 200
    issued = await story.call("POST", f"/v1/cases/{case_id}/capability", admin=True, json={})
    redeemed = await story.call(
        "POST", "/v1/capabilities/redeem", json={"capability": issued.body["capability"]}
    )
    assert redeemed.status == 200, redeemed.text
    assert (await story.case(case_id))["state"] == "resumed"
    capability: str = redeemed.body["capability"]
    return case_id, capability


async def test_policy_reconcile_after_the_resume_closes_the_case(story: Story) -> None:
    case_id, capability = await _resumed(story)
    await story.provider.fault("commit_then_drop")
    dropped = await story.send_briefing(capability)  # the resumed send: out, answer lost
    assert dropped.status == 502 and dropped.body["type"] == "urn:revive:outcome-unknown"
    retry = await story.send_briefing(capability)  # the sidecar's reconcile finds the mail
    assert retry.status == 202 and retry.headers.get("Revive-Replayed") == "true"
    assert len(await story.provider.mails()) == 1
    closed = await story.case_reaching(case_id, "closed")
    assert closed["transitions"][-1]["from_state"] == "resumed"


async def test_an_action_that_needed_two_recoveries_closes_both_cases(story: Story) -> None:
    first, capability = await _resumed(story)
    await story.provider.fault("kill_grant")  # dies again before the resumed send
    again = await story.send_briefing(capability)
    assert again.status == 424, again.text
    second = again.body["case_id"]
    assert second != first and again.body["idempotency_key"] == (await story.case(first))[
        "idempotency_key"
    ]
    assert (await story.reconnect()).status == 200
    issued = await story.call("POST", f"/v1/cases/{second}/capability", admin=True, json={})
    redeemed = await story.call(
        "POST", "/v1/capabilities/redeem", json={"capability": issued.body["capability"]}
    )
    assert redeemed.status == 200 and redeemed.body["epoch"] == 3
    sent = await story.send_briefing(redeemed.body["capability"])
    assert sent.status == 202, sent.text
    assert len(await story.provider.mails()) == 1
    assert (await story.case_reaching(second, "closed"))["state"] == "closed"
    assert (await story.case_reaching(first, "closed"))["state"] == "closed"


async def test_worker_reconcile_after_the_resume_closes_the_case(generic_story: Story) -> None:
    story = generic_story  # no reconcile rule: only the worker can settle the outcome
    case_id, capability = await _resumed(story)
    await story.provider.fault("commit_then_drop")
    dropped = await story.send_briefing(capability)
    assert dropped.status == 502
    settled = await story.call(
        "POST", f"/v1/actions/{dropped.body['idempotency_key']}/outcome",
        json={"outcome": "committed", "evidence": {"found": "in Sent Items"}},
    )
    assert settled.status == 200, settled.text
    assert (await story.case_reaching(case_id, "closed"))["state"] == "closed"
    assert len(await story.provider.mails()) == 1


async def test_a_restart_closes_a_case_whose_action_committed_before_the_crash(
    tmp_path: Path,
) -> None:
    async with running_provider() as provider:
        settings = await granted_lab_settings(provider, tmp_path / "data")
        async with story_on(provider, settings, tmp_path / "data") as story:
            case_id, _ = await _resumed(story)
            case = await story.case(case_id)
            # The resumed send commits in the ledger, and the sidecar dies before it closes
            # the case: the ledger's half of that, written straight to the store.
            key = case["idempotency_key"]
            store = await _claim_resumed_send(story, key, settings.sidecar_id)
            await store.finish(key, settings.sidecar_id, "committed", status=202)
            assert (await story.case(case_id))["state"] == "resumed"
        async with story_on(provider, settings, tmp_path / "data") as story:
            closed = await story.case(case_id)
            assert closed["state"] == "closed"
            assert closed["transitions"][-1]["actor"] == "startup"


async def test_a_restart_reconciles_a_resumed_action_answered_but_never_recorded(
    tmp_path: Path,
) -> None:
    async with running_provider() as provider:
        settings = await granted_lab_settings(provider, tmp_path / "data")
        async with story_on(provider, settings, tmp_path / "data") as story:
            case_id, _ = await _resumed(story)
            key = (await story.case(case_id))["idempotency_key"]
            # The resumed send is claimed and reaches the provider (stamped with its key),
            # the worker hears 202, and the sidecar dies before finishing the claim.
            await _claim_resumed_send(story, key, settings.sidecar_id)
            fresh = await provider.new_grant()
            async with story.http.post(
                f"{provider.url}/v1.0/me/sendMail", json=_stamped(key),
                headers={"Authorization": f"Bearer {fresh['access_token']}"},
            ) as resp:
                assert resp.status == 202
        async with story_on(provider, settings, tmp_path / "data") as story:
            closed = await story.case_reaching(case_id, "closed")
            assert closed["transitions"][-1]["from_state"] == "resumed"
            action = next(a for a in closed["actions"] if a["idempotency_key"] == key)
            assert action["state"] == "committed"
        assert len(await provider.mails()) == 1


async def _claim_resumed_send(story: Story, key: str, owner: str) -> Store:
    """Claim the resumed send (epoch 2, generation 2) straight in the sidecar's store."""
    store = story.sidecar.app[STORE]
    row = await store.get_action(key)
    assert row is not None
    await store.claim(ClaimRequest(
        key, RUN, row.action_key, row.checkpoint_id, row.connection_id, row.fingerprint,
        owner, 2, 2,
    ))
    return store


def _stamped(key: str) -> dict[str, object]:
    """The briefing as the sidecar forwards it: stamped for the policy's Sent Items lookup."""
    message = dict(briefing()["message"])
    message["singleValueExtendedProperties"] = [{"id": STAMP_ID, "value": key}]
    return {"message": message}
