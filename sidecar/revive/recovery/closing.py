"""Closing a ``resumed`` case once its action has committed, however the commit happened.

Closing is a second step after the commit (or after the redemption, for a case with no
action), so every path that commits must take it, and a crash between the two must not
leave a case ``resumed`` for ever. The paths (the chaos soak found each of them open):

- the proxy relays the resumed attempt's 2xx and records it (``action_committed``);
- the resumed attempt lost its answer and a reconcile settled it ``committed``, by the
  policy's lookup or the worker's own answer (``close_if_committed``);
- the resumed attempt met another dead grant: a second case took over the action row, and
  the commit must close the earlier case too (``action_committed`` closes every resumed case
  of the run with the same key);
- the sidecar died between the ledger's commit and the close, or after relaying a 2xx but
  before recording it (``close_settled_cases`` at start-up, reconciling ``unknown`` ones).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from revive.recovery.machine import CaseEvent, CaseState
from revive.store import ActionRow, CaseRow, ConflictError

if TYPE_CHECKING:
    from revive.recovery.service import RecoveryService

__all__ = ["action_committed", "close_if_committed", "close_settled_cases", "request_of"]

log = logging.getLogger("revive.recovery")


async def action_committed(service: RecoveryService, case_id: str, idempotency_key: str) -> None:
    """Close ``case_id`` and any earlier resumed case of the same action of the same run."""
    case = await service.store.get_case(case_id)
    if case is None:
        return
    for resumed in await service.store.list_cases(state=CaseState.RESUMED, run_id=case.run_id):
        if resumed.case_id != case_id and resumed.idempotency_key != idempotency_key:
            continue
        try:
            await service.move(
                resumed, CaseEvent.COMMITTED, "proxy", {"idempotency_key": idempotency_key}
            )
        except ConflictError:
            pass  # closed concurrently


async def close_if_committed(service: RecoveryService, action: ActionRow) -> None:
    """A settled action that committed closes the case waiting on it."""
    if action.state == "committed" and action.case_id is not None:
        await action_committed(service, action.case_id, action.idempotency_key)


async def close_settled_cases(service: RecoveryService) -> int:
    """Close the ``resumed`` cases whose action is committed, or that have none.

    A resumed action left ``unknown`` (answered, then the crash came before the ledger
    recorded it, and the run moved on) is reconciled in the background: found, it commits
    and its case closes.

    Returns:
        How many cases it closed.
    """
    closed = 0
    for case in await service.store.list_cases(state=CaseState.RESUMED):
        key = case.idempotency_key
        action = await service.store.get_action(key) if key else None
        if action is not None and action.state == "unknown":
            service.background(_reconcile_resumed(service, case, action))
            continue
        if action is not None and action.state != "committed":
            continue
        try:
            await service.move(case, CaseEvent.COMMITTED, "startup",
                               {"reason": "committed before a restart", "idempotency_key": key})
        except ConflictError:
            continue  # closed concurrently
        closed += 1
    return closed


async def _reconcile_resumed(service: RecoveryService, case: CaseRow, action: ActionRow) -> None:
    binding = service.bindings.get(case.connection_id)
    if binding is None:
        return
    try:
        await service.reconcile_action(binding, action, request_of(case))
    except Exception as exc:  # noqa: BLE001 - background: the run's next try reconciles
        log.warning(
            "reconcile of resumed case %s at start-up failed: %s", case.case_id,
            type(exc).__name__, extra={"case_id": case.case_id, "run_id": case.run_id},
        )


def request_of(case: CaseRow) -> tuple[str, str] | None:
    """The failed request's ``(method, path)`` as the case's evidence recorded it."""
    request = case.evidence.get("request") if isinstance(case.evidence, Mapping) else None
    if isinstance(request, Mapping):
        method, path = request.get("method"), request.get("path")
        if isinstance(method, str) and isinstance(path, str):
            return method, path
    return None
