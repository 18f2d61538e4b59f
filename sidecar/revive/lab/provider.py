"""A fake provider that speaks like Microsoft (Entra v2 + a Graph subset), with faults.

DESIGN §11. It is a real local aiohttp app, so the sidecar, the lab and the tests drive
it over real HTTP exactly as they would drive ``login.microsoftonline.com`` and
``graph.microsoft.com``::

    create_provider_app(config)          the web.Application
      ├─ provider_oauth    /{tenant}/oauth2/v2.0/token, /{tenant}/oauth2/v2.0/authorize
      ├─ provider_graph    /v1.0/me, /v1.0/me/events, /v1.0/me/sendMail,
      │                    /v1.0/me/mailFolders/SentItems/messages
      ├─ provider_control  /_lab/faults, /_lab/mails, /_lab/calls, /_lab/grants, /_lab/reset
      ├─ provider_state    ProviderConfig, ProviderState (under PROVIDER_STATE)
      └─ provider_bodies   the Entra and Graph error shapes of corpus/providers.jsonl

Everything lives in one ``ProviderState`` per app; there is no module-level mutable state.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from . import provider_control, provider_graph, provider_oauth
from .provider_state import (
    CALL_NOTE,
    PROVIDER_STATE,
    CallNote,
    CallRecord,
    ProviderConfig,
    ProviderState,
    iso_now,
)

__all__ = [
    "PROVIDER_STATE",
    "ProviderConfig",
    "ProviderState",
    "create_provider_app",
    "serve_provider",
    "start_provider",
]

log = logging.getLogger(__name__)


@web.middleware
async def _call_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log every non-control request: path, status, token verdict, grant type, claims.

    Only facts, never a token: the log is served verbatim by ``GET /_lab/calls``.
    """
    if request.path.startswith("/_lab/"):
        return await handler(request)
    note = CallNote()
    request[CALL_NOTE] = note
    status: int | None = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[PROVIDER_STATE].record_call(
            CallRecord(
                at=iso_now(),
                method=request.method,
                path=request.path,
                status=None if note.dropped else status,
                token_valid=note.token_valid,
                grant_type=note.grant_type,
                claims=note.claims,
            )
        )


def create_provider_app(config: ProviderConfig | None = None) -> web.Application:
    """Build the fake Microsoft provider.

    Args:
        config: tenant, client credentials, token lifetime and rotation; defaults to
            ``ProviderConfig()`` (tenant ``lab``, client ``revive-lab`` / ``lab-secret``).

    Returns:
        An application whose ``ProviderState`` is ``app[PROVIDER_STATE]``.
    """
    app = web.Application(middlewares=[_call_log])
    app[PROVIDER_STATE] = ProviderState(config or ProviderConfig())
    # Control and Graph routes first: their fixed prefixes must win over /{tenant}/...
    app.add_routes(provider_control.routes)
    app.add_routes(provider_graph.routes)
    app.add_routes(provider_oauth.routes)
    return app


async def start_provider(
    host: str = "127.0.0.1", port: int = 0, config: ProviderConfig | None = None
) -> tuple[web.AppRunner, str]:
    """Start the provider on ``host:port`` (0 picks a free port).

    Returns:
        The runner (call ``await runner.cleanup()`` to stop) and the base URL,
        e.g. ``http://127.0.0.1:54321``.
    """
    # A short shutdown grace: a handler parked in an injected latency must not hold cleanup.
    runner = web.AppRunner(create_provider_app(config), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
    return runner, f"http://{shown}:{bound_port}"


async def serve_provider(host: str, port: int, config: ProviderConfig | None = None) -> None:
    """Run the provider until cancelled (``revive lab provider --port N``)."""
    runner, url = await start_provider(host, port, config)
    log.info("fake Microsoft provider listening on %s", url)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
