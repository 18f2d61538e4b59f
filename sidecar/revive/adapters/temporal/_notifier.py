"""Notifier side: the sidecar's ``case.ready`` webhook becomes a ``revive_recovered`` signal.

The workflow id is the run id, so the event alone names the workflow to signal; the signal
goes to its current run, the one parked on the case (no new workflow is started).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from revive.adapters._webhook import CaseEvent, OnCaseEvent, ResumeGone, case_webhook
from revive.adapters.temporal._types import RECOVERED_SIGNAL

__all__ = ["signal_on_ready", "temporal_case_webhook"]


def signal_on_ready(client: Client, *, signal: str = RECOVERED_SIGNAL) -> OnCaseEvent:
    """An ``on_ready`` callback that signals the case's workflow with its capability.

    Args:
        client: a connected Temporal client for the workflow's namespace.
        signal: the signal name :class:`ReviveWorkflow` listens on.

    Returns:
        ``async (event) -> None``; it raises :class:`ResumeGone` when the workflow does not
        exist or has already closed, and ``RPCError`` when Temporal cannot be reached.
    """

    async def on_ready(event: CaseEvent) -> None:
        if event.recovery_capability is None:
            return
        handle = client.get_workflow_handle(event.run_id)
        try:
            await handle.signal(signal, event.recovery_capability)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise ResumeGone(f"workflow {event.run_id} is not running") from exc
            raise

    return on_ready


def temporal_case_webhook(
    client: Client, secret: bytes, *, signal: str = RECOVERED_SIGNAL
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler for the sidecar's webhook that resumes Temporal workflows.

    Mount it on any aiohttp app the sidecar can reach and point the sidecar's
    ``notifier`` (``kind: webhook``) at it::

        app.router.add_post("/revive/cases", temporal_case_webhook(client, secret))

    Args:
        client: a connected Temporal client.
        secret: the webhook secret shared with the sidecar.
        signal: the signal name :class:`ReviveWorkflow` listens on.

    Returns:
        the handler (see :func:`revive.adapters.case_webhook` for its answers).
    """
    return case_webhook(secret, signal_on_ready(client, signal=signal))
