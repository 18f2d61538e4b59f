"""Issue #4 item 1: ``protect_action`` against a real sidecar and the fake provider."""

from __future__ import annotations

import pickle
import time
from typing import Any

import aiohttp
import pytest

from revive import RecoveryRequired as TopLevelRecoveryRequired
from revive import protect_action as top_level_protect_action
from revive.client import (
    ActionContext,
    ActionOutcome,
    ActionResult,
    CapabilityInvalid,
    Fenced,
    OutcomeUnknown,
    ReconcileRequired,
    RecoveryCase,
    RecoveryRequired,
    Redeemed,
    SidecarClient,
    derive_idempotency_key,
    protect_action,
)
from revive.lab.settings import LAB_CONNECTION
from revive.proxy.ledger import derive_idempotency_key as sidecar_derive
from revive.testing.story import RUN, WORKFLOW, Story, briefing

ACTION = "send-briefing"
CHECKPOINT = "chk-send"


class Sender:
    """An ``execute`` that sends the briefing through ``ctx.session``; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.keys: list[str] = []

    async def __call__(self, ctx: ActionContext) -> int:
        self.calls += 1
        self.keys.append(ctx.idempotency_key)
        async with ctx.session.post("v1.0/me/sendMail", json=briefing()) as resp:
            assert resp.status == 202, await resp.text()
            return resp.status


async def protect(story: Story, execute: Any, **kw: Any) -> ActionResult[Any]:
    args: dict[str, Any] = {
        "sidecar_url": story.sidecar.url, "run_id": RUN, "checkpoint_id": CHECKPOINT,
        "connection_id": LAB_CONNECTION, "action_key": ACTION, "workflow": WORKFLOW,
        "execute": execute, **kw,
    }
    return await protect_action(**args)


async def ready_capability(story: Story, case_id: str) -> str:
    """The human reconnects; the operator issues the case's recovery capability."""
    callback = await story.reconnect()
    assert callback.status == 200, callback.text
    assert (await story.case(case_id))["state"] == "ready"
    issued = await story.call("POST", f"/v1/cases/{case_id}/capability", admin=True, json={})
    assert issued.status == 200, issued.text
    capability: str = issued.body["capability"]
    return capability


async def test_protect_action_sends_one_mail_through_the_session(story: Story) -> None:
    send = Sender()
    result = await protect(story, send)
    assert result == ActionResult(202, 1, False, False, derive_idempotency_key(RUN, ACTION))
    assert send.calls == 1
    mails = await story.provider.mails()
    assert len(mails) == 1 and mails[0]["subject"] == WORKFLOW
    # The ledger keyed the action exactly as the client derived it.
    run = await story.call("GET", f"/v1/runs/{RUN}")
    assert run.status == 200 and run.body["epoch"] == 1

    again = await protect(story, send)  # a retry of the same action of the same run
    assert again.replayed and not again.skipped and again.value == 202
    assert send.keys[0] == send.keys[1]
    assert len(await story.provider.mails()) == 1


async def test_dead_grant_parks_the_run_and_the_resume_sends_once(story: Story) -> None:
    await story.provider.fault("kill_grant")
    send = Sender()
    with pytest.raises(RecoveryRequired) as parked:
        await protect(story, send)
    case = parked.value.case
    assert parked.value.status == 424
    assert case.provider_code == "AADSTS700082"
    assert case.run_id == RUN and case.checkpoint_id == CHECKPOINT and case.action_key == ACTION
    assert case.idempotency_key == derive_idempotency_key(RUN, ACTION)
    assert send.calls == 1 and await story.provider.mails() == []
    recorded = await story.case(case.case_id)
    assert recorded["idempotency_key"] == case.idempotency_key

    # While the case is open, minting is refused with the same case: execute never runs.
    with pytest.raises(TopLevelRecoveryRequired) as again:
        await top_level_protect_action(
            sidecar_url=story.sidecar.url, run_id=RUN, checkpoint_id=CHECKPOINT,
            connection_id=LAB_CONNECTION, action_key=ACTION, execute=send,
        )
    assert again.value.case.case_id == case.case_id
    assert again.value.case.provider_code == "AADSTS700082"
    assert send.calls == 1

    capability = await ready_capability(story, case.case_id)
    result = await protect(story, send, recovery_capability=capability)
    assert result.epoch == 2 and not result.skipped and not result.replayed
    assert result.value == 202 and result.idempotency_key == case.idempotency_key
    assert send.calls == 2 and send.keys == [case.idempotency_key] * 2
    assert len(await story.provider.mails()) == 1
    closed = await story.case_reaching(case.case_id, "closed")
    assert [t["to_state"] for t in closed["transitions"]][-2:] == ["resumed", "closed"]

    # The epoch the runtime stored is the only one that may act now.
    with pytest.raises(Fenced):
        await protect(story, send, epoch=1)
    with pytest.raises(CapabilityInvalid):  # single use
        await protect(story, send, recovery_capability=capability)
    later = await protect(story, send, epoch=2)
    assert later.epoch == 2 and later.replayed
    assert len(await story.provider.mails()) == 1


async def test_committed_before_the_drop_is_not_executed_again(story: Story) -> None:
    send = Sender()
    await story.provider.fault("commit_then_drop")
    with pytest.raises(OutcomeUnknown) as dropped:
        await protect(story, send)
    assert dropped.value.idempotency_key == derive_idempotency_key(RUN, ACTION)
    assert len(await story.provider.mails()) == 1

    await story.provider.fault("kill_grant")
    with pytest.raises(RecoveryRequired) as parked:
        await protect(story, send)  # the sidecar must reconcile first; it needs the dead grant
    assert send.calls == 2
    capability = await ready_capability(story, parked.value.case.case_id)
    assert (await story.case(parked.value.case.case_id))["outcome"] == "committed"

    resumed = Sender()
    result = await protect(story, resumed, recovery_capability=capability)
    assert resumed.calls == 0
    assert result == ActionResult(None, 2, True, True, derive_idempotency_key(RUN, ACTION))
    assert len(await story.provider.mails()) == 1
    await story.case_reaching(parked.value.case.case_id, "closed")


async def test_httpx_client_from_the_context(story: Story) -> None:
    async def execute(ctx: ActionContext) -> dict[str, Any]:
        client = ctx.httpx_client(timeout=30)
        me = await client.get("/v1.0/me")  # httpx keeps the proxy prefix for a leading '/'
        assert me.status_code == 200, me.text
        sent = await client.post("v1.0/me/sendMail", json=briefing())
        assert sent.status_code == 202, sent.text
        profile: dict[str, Any] = me.json()
        return profile

    result = await protect(story, execute)
    assert result.value is not None and not result.skipped
    assert len(await story.provider.mails()) == 1


async def test_httpx_client_raises_recovery_required(story: Story) -> None:
    await story.provider.fault("kill_grant")

    async def execute(ctx: ActionContext) -> None:
        async with ctx.httpx_client() as client:
            await client.post("v1.0/me/sendMail", json=briefing())

    with pytest.raises(RecoveryRequired) as parked:
        await protect(story, execute)
    assert parked.value.case.provider_code == "AADSTS700082"


async def test_a_swallowed_recovery_required_still_parks_the_run(story: Story) -> None:
    await story.provider.fault("kill_grant")

    async def execute(ctx: ActionContext) -> str:
        try:
            await Sender()(ctx)
        except Exception:  # an SDK that turns every error into its own
            return "sdk error"
        return "sent"

    with pytest.raises(RecoveryRequired):
        await protect(story, execute)


async def test_worker_reconcile_settles_an_unknown_outcome(generic_story: Story) -> None:
    story = generic_story
    send = Sender()
    await story.provider.fault("commit_then_drop")
    with pytest.raises(OutcomeUnknown):
        await protect(story, send)
    with pytest.raises(ReconcileRequired):  # nothing re-executes an unknown outcome
        await protect(story, send)

    looked: list[str] = []

    async def in_sent_items(ctx: ActionContext) -> bool:
        looked.append(ctx.idempotency_key)
        async with ctx.session.get("v1.0/me/mailFolders/SentItems/messages") as resp:
            assert resp.status == 200, await resp.text()
            messages = (await resp.json())["value"]
        return any(m.get("subject") == WORKFLOW for m in messages)

    result = await protect(story, send, reconcile=in_sent_items)
    assert result.skipped and result.replayed and result.value is None
    assert looked == [derive_idempotency_key(RUN, ACTION)]
    assert send.calls == 3  # the retry after the settle was not needed
    assert len(await story.provider.mails()) == 1


async def test_resume_with_unknown_outcome_asks_reconcile(generic_story: Story) -> None:
    story = generic_story
    await story.provider.fault("commit_then_drop")
    with pytest.raises(OutcomeUnknown):
        await protect(story, Sender())
    await story.provider.fault("kill_grant")
    asked: list[int] = []

    async def in_sent_items(ctx: ActionContext) -> bool:
        asked.append(ctx.epoch)
        async with ctx.session.get("v1.0/me/mailFolders/SentItems/messages") as resp:
            assert resp.status == 200, await resp.text()
            messages = (await resp.json())["value"]
        return any(m.get("subject") == WORKFLOW for m in messages)

    send = Sender()
    # The ledger asks the worker to reconcile; the worker's own lookup meets the dead grant.
    with pytest.raises(RecoveryRequired) as parked:
        await protect(story, send, reconcile=in_sent_items)
    assert asked == [1] and parked.value.case.provider_code == "invalid_grant"  # generic policy
    case_id = parked.value.case.case_id
    capability = await ready_capability(story, case_id)
    # The case was opened by a lookup, not by the action: the redemption names no action,
    # the resumed execute meets reconcile-required, and the worker's reconcile settles it.
    result = await protect(story, send, recovery_capability=capability, reconcile=in_sent_items)
    assert asked == [1, 2] and send.calls == 2
    assert result.skipped and result.replayed and result.epoch == 2
    assert len(await story.provider.mails()) == 1
    detail = await story.case(case_id)
    settled = [a for a in detail["actions"] if a["idempotency_key"] == result.idempotency_key]
    assert settled and settled[0]["state"] == "committed"
    assert settled[0]["evidence"]["source"] == "worker reconcile"


@pytest.mark.parametrize("exists", [True, False])
async def test_redeemed_unknown_outcome_is_reconciled_before_execute(
    generic_story: Story, monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    """A redemption reporting ``unknown``: reconcile decides, execute runs only if absent."""
    story = generic_story
    key = derive_idempotency_key(RUN, ACTION)
    await story.provider.fault("commit_then_drop")
    with pytest.raises(OutcomeUnknown):
        await protect(story, Sender())
    # Park the run on a case (a read meets the dead grant), then make it ready.
    await story.provider.fault("kill_grant")
    token = await story.mint()
    parked = await story.graph("GET", "v1.0/me", token)
    assert parked.status == 424, parked.text
    capability = await ready_capability(story, parked.body["case_id"])

    real_redeem = SidecarClient.redeem

    async def redeem_reporting_unknown(self: SidecarClient, token: str) -> Redeemed:
        redeemed = await real_redeem(self, token)
        unknown = ActionOutcome(action_key=ACTION, idempotency_key=key, outcome="unknown")
        return redeemed.model_copy(update={"action": unknown})

    monkeypatch.setattr(SidecarClient, "redeem", redeem_reporting_unknown)
    asked: list[str] = []

    async def reconcile(ctx: ActionContext) -> bool:
        asked.append(ctx.idempotency_key)
        return exists

    send = Sender()
    result = await protect(story, send, recovery_capability=capability, reconcile=reconcile)
    assert asked == [key] and result.epoch == 2
    action = next(a for a in (await story.case(parked.body["case_id"]))["actions"]
                  if a["idempotency_key"] == key)
    if exists:
        assert send.calls == 0 and result.skipped and result.replayed
        assert action["state"] == "committed"
        assert len(await story.provider.mails()) == 1
    else:  # the worker said it is absent: the ledger lets the same key execute again
        assert send.calls == 1 and not result.skipped and result.value == 202
        assert len(await story.provider.mails()) == 2


async def test_capability_is_renewed_near_its_expiry(story: Story) -> None:
    seen: list[str] = []

    async def execute(ctx: ActionContext) -> int:
        first = await ctx.capability()
        holder = ctx._holder
        holder.clock = lambda: time.time() + (holder.expires_at - time.time()) - 30
        async with ctx.session.get("v1.0/me") as resp:
            assert resp.status == 200
        seen.extend([first, await ctx.capability()])
        return holder.renewals

    result = await protect(story, execute)
    assert result.value is not None and result.value >= 1
    assert seen[0] != seen[1]


async def test_session_refuses_absolute_paths_that_leave_the_proxy(story: Story) -> None:
    async def execute(ctx: ActionContext) -> None:
        async with ctx.session.get("/v1.0/me"):
            pass

    with pytest.raises(ValueError, match="outside the proxy prefix"):
        await protect(story, execute)


async def test_reuses_a_callers_session_without_closing_it(story: Story) -> None:
    async with aiohttp.ClientSession() as http:
        result = await protect(story, Sender(), http=http)
        assert not http.closed and result.value == 202


def test_derived_key_matches_the_sidecar() -> None:
    for run, action in [(RUN, ACTION), ("thread-1", "node:send"), ("é", "ü\x00")]:
        key = derive_idempotency_key(run, action)
        assert key == sidecar_derive(run, action)
        assert key.startswith("ik_") and len(key) == 43


def test_recovery_required_pickles_with_its_case() -> None:
    case = RecoveryCase.from_problem({
        "type": "urn:revive:recovery-required", "status": 424, "detail": "dead",
        "case_id": "case_1", "run_id": RUN, "checkpoint_id": CHECKPOINT, "action_key": ACTION,
        "provider_code": "AADSTS700082", "generation": 1, "workflow": WORKFLOW,
    })
    exc = RecoveryRequired(case)
    back = pickle.loads(pickle.dumps(exc))
    assert isinstance(back, RecoveryRequired) and back.case == case
    assert case.extra == {"workflow": WORKFLOW} and case.to_dict()["generation"] == 1
    assert "case_1" in str(back) and "AADSTS700082" in str(back)
