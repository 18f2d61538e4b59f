"""Stage: the action ledger around a mutating request (DESIGN §7).

Claim before forwarding, in the same transaction as the fence check, and wait for it to be
durable: that is what makes "never sent twice" hold. Record what came back — the worker may
hear the answer before that record is durable, since a crash in between only leaves the
claim ``in_flight`` for the restart sweep and reconcile. Replay a committed (or permanently
failed) answer instead of sending again. Whatever happens, the claim is finished: an
exception after the request may have left marks the action ``unknown``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from revive.classify import Policy
from revive.proxy.headers import downstream_headers
from revive.store import ActionRow, ClaimRequest, FinishedAction, FinishState, Store

REPLAYED = "Revive-Replayed"


def derive_idempotency_key(run_id: str, action_key: str) -> str:
    """Stable across retries and resumes of the same action of the same run (DESIGN §6)."""
    digest = hashlib.sha256(f"{run_id}\x00{action_key}".encode()).hexdigest()
    return f"ik_{digest[:40]}"


def fingerprint(method: str, path_qs: str, body: bytes | None, length: int | None) -> str:
    """What makes two requests "the same request" for one idempotency key."""
    h = hashlib.sha256(f"{method.upper()} {path_qs}\n".encode())
    if body is not None:
        h.update(body)
    elif length is not None:
        h.update(f"stream:{length}".encode())
    return h.hexdigest()


@dataclass(slots=True)
class LedgerEntry:
    """One claimed action; ``finish`` is called exactly once, whatever happens."""

    store: Store
    request: ClaimRequest
    action: ActionRow
    sent: bool = False
    done: bool = False

    @property
    def key(self) -> str:
        return self.request.idempotency_key

    async def finish(
        self,
        state: FinishState,
        *,
        status: int | None = None,
        headers: CIMultiDictProxy[str] | None = None,
        body: bytes | None = None,
        case_id: str | None = None,
    ) -> FinishedAction:
        """Record the outcome and wait until it is durable."""
        return await self.finish_later(
            state, status=status, headers=headers, body=body, case_id=case_id
        )

    def finish_later(
        self,
        state: FinishState,
        *,
        status: int | None = None,
        headers: CIMultiDictProxy[str] | None = None,
        body: bytes | None = None,
        case_id: str | None = None,
    ) -> Coroutine[Any, Any, FinishedAction]:
        """Mark the claim finished now; return the store write to await (or run) later.

        Everything the write needs is captured here, so the caller may answer the worker
        before the write is durable: a crash in between leaves the claim ``in_flight``,
        which the restarted sidecar sweeps to ``unknown`` and reconcile settles.
        """
        response = None
        if status is not None and headers is not None and body is not None:
            # Same JSON as json.dumps({"status", "headers", "body_b64"}), built directly: this
            # runs for every mutating request, and base64 text needs no escaping.
            response = '{"status": %d, "headers": %s, "body_b64": "%s"}' % (
                status, json.dumps(downstream_headers(headers)),
                base64.b64encode(body).decode("ascii"),
            )
        self.done = True
        return self.store.finish(
            self.key, self.request.owner, state, status=status, response=response, case_id=case_id
        )

    async def settle_unfinished(self) -> None:
        """The last word when an exception left the claim open."""
        if not self.done:
            await self.finish("unknown" if self.sent else "not_committed")


def replay(action: ActionRow, policy: Policy, method: str, path: str) -> web.Response:
    """Answer from the ledger, as the provider answered the first time (Stripe does the same).

    An action found committed by reconcile has no stored answer: the policy says what the
    provider would have answered (Graph sendMail: 202 Accepted, no body).
    """
    headers = {REPLAYED: "true"}
    if action.response is not None:
        stored = json.loads(action.response)
        out = web.Response(status=int(stored["status"]), body=base64.b64decode(stored["body_b64"]))
        out.headers.extend(stored["headers"])
        out.headers.update(headers)
        return out
    rule = policy.reconcile_for(method, path)
    status = action.status or (rule.committed_status if rule is not None else 200)
    return web.Response(status=status, headers=headers)
