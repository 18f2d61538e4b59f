"""Workflow side: keep the run's epoch, and park a protected activity until its run recovers.

Deterministic by construction: no I/O, no clocks, no randomness; only workflow state, the
activity results in history, and the ``revive_recovered`` signal decide what happens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar, overload

from temporalio import workflow
from temporalio.converter import value_to_type
from temporalio.exceptions import ActivityError, ApplicationError

from revive.adapters.temporal._types import (
    CAPABILITY_INVALID,
    FENCED,
    RECOVERED_SIGNAL,
    RECOVERY_REQUIRED,
    RECOVERY_TIMEOUT,
    STATUS_QUERY,
    ProtectedResult,
    ReviveRun,
)

__all__ = ["ReviveWorkflow"]

R = TypeVar("R")


class ReviveWorkflow:
    """The Revive state of one workflow run; create it in the workflow's ``__init__``.

    It keeps the run's epoch, hands it to every protected activity, and when one fails with
    ``ReviveRecoveryRequired`` waits for the ``revive_recovered(capability)`` signal, then
    re-runs the same activity with the capability; the activity redeems it and reports the
    new epoch, which every later activity inherits. Parallel activities blocked by the same
    case share one capability: the first re-runs with it, the others with the new epoch.

    Args:
        epoch: the run's epoch to start from (1 for a new run; carry it across
            continue-as-new).
        recovery_timeout: fail the workflow (``ReviveRecoveryTimeout``) when no recovery
            arrives within it; by default a parked run waits as long as it takes.
        signal: the signal name that delivers a recovery capability.
        query: the query name answering ``{"epoch", "waiting"}``.
    """

    def __init__(
        self,
        *,
        epoch: int = 1,
        recovery_timeout: timedelta | None = None,
        signal: str = RECOVERED_SIGNAL,
        query: str = STATUS_QUERY,
    ) -> None:
        self.epoch = epoch
        self.recovery_timeout = recovery_timeout
        self._capability: str | None = None
        self._used: set[str] = set()
        self._waiting: dict[str, dict[str, Any]] = {}
        self._calls = 0
        workflow.set_signal_handler(signal, self.recovered)
        workflow.set_query_handler(query, self.status)

    def recovered(self, capability: str) -> None:
        """Signal handler: keep ``capability`` for the next blocked activity (once)."""
        if capability and capability not in self._used:
            self._capability = capability

    def status(self) -> dict[str, Any]:
        """Query handler: the epoch and the cases the run waits on (no capability)."""
        return {"epoch": self.epoch, "waiting": list(self._waiting.values())}

    @property
    def waiting(self) -> list[dict[str, Any]]:
        """The cases blocked activities wait on."""
        return list(self._waiting.values())

    @overload
    async def execute_activity(
        self,
        activity: Callable[..., Awaitable[ProtectedResult]],
        make_input: Callable[[ReviveRun], Any],
        *,
        result_type: type[R],
        checkpoint_id: str | None = None,
        **options: Any,
    ) -> R: ...

    @overload
    async def execute_activity(
        self,
        activity: Callable[..., Awaitable[ProtectedResult]],
        make_input: Callable[[ReviveRun], Any],
        *,
        result_type: None = None,
        checkpoint_id: str | None = None,
        **options: Any,
    ) -> Any: ...

    async def execute_activity(
        self,
        activity: Callable[..., Awaitable[ProtectedResult]],
        make_input: Callable[[ReviveRun], Any],
        *,
        result_type: type[Any] | None = None,
        checkpoint_id: str | None = None,
        **options: Any,
    ) -> Any:
        """Execute a protected activity, waiting out any recovery its run needs.

        Args:
            activity: an ``@activity.defn`` (function or method) taking one ``…Input`` and
                returning the :class:`ProtectedResult` of :func:`protect_activity`.
            make_input: builds that input around the :class:`ReviveRun` it is given (called
                again, with the recovery capability, for the re-run).
            result_type: converts the activity's value to this type (a dataclass, say).
            checkpoint_id: where in the workflow this call stands; by default the activity's
                name and the call's ordinal, which replay reproduces.
            **options: passed to ``workflow.execute_activity`` (``start_to_close_timeout``,
                ``retry_policy``, ...).

        Returns:
            the activity's value (``None`` when the action was already committed).

        Raises:
            ApplicationError: ``ReviveRecoveryTimeout`` when ``recovery_timeout`` passed.
            ActivityError: any other failure of the activity, unchanged.
        """
        self._calls += 1
        name = getattr(activity, "__name__", "activity")
        checkpoint = checkpoint_id or f"{name}#{self._calls}"
        run_id = workflow.info().workflow_id
        capability: str | None = None
        while True:
            run = ReviveRun(run_id, checkpoint, self.epoch, capability)
            try:
                result = await workflow.execute_activity(activity, make_input(run), **options)
            except ActivityError as exc:
                kind = _revive_type(exc)
                if kind == RECOVERY_REQUIRED:
                    capability = await self._recovery(exc, run)
                elif kind == CAPABILITY_INVALID and capability is not None:
                    capability = await self._recovery(exc, run)  # expired: await a fresh one
                elif kind == FENCED and self.epoch > run.epoch:
                    capability = None  # another activity redeemed meanwhile: use its epoch
                else:
                    raise
                continue
            self.epoch = max(self.epoch, result.epoch)
            if result_type is None or result.value is None:
                return result.value
            return value_to_type(result_type, result.value)

    async def _recovery(self, exc: ActivityError, run: ReviveRun) -> str | None:
        """Wait until a capability arrives or another activity moved the epoch past ``run``'s.

        Returns the capability to redeem, or None to re-run under the new epoch.
        """
        case = _case_of(exc)
        key = str(case.get("case_id") or f"{run.checkpoint_id}@{run.epoch}")
        self._waiting[key] = case
        try:
            await workflow.wait_condition(
                lambda: self._capability is not None or self.epoch > run.epoch,
                timeout=self.recovery_timeout,
            )
        except TimeoutError:
            raise ApplicationError(
                f"run {run.run_id} was not recovered in time (case {key})", case,
                type=RECOVERY_TIMEOUT, non_retryable=True,
            ) from None
        finally:
            self._waiting.pop(key, None)
        if self.epoch > run.epoch:
            return None
        capability, self._capability = self._capability, None
        if capability is not None:
            self._used.add(capability)
        return capability


def _revive_type(exc: ActivityError) -> str | None:
    cause = exc.cause
    return cause.type if isinstance(cause, ApplicationError) else None


def _case_of(exc: ActivityError) -> dict[str, Any]:
    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.details:
        detail = cause.details[0]
        if isinstance(detail, dict):
            return detail
    return {}
