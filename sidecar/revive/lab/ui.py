"""The recovery lab UI: an aiohttp sub-app mounted at ``/lab/`` (issue 5).

The page (``templates/index.html`` + ``static/``) reads JSON from this sub-app, which reads
the parent sidecar's store through its ``RecoveryService``, and follows changes over
server-sent events (``GET /lab/events``: the store is polled every 300 ms and only what
changed is pushed). With ``interactive=True`` (``revive lab``) it also proxies the fake
provider's fault and mail API, runs the demo worker, and resumes it with a recovery
capability it asks the sidecar's ``/v1`` API for (the page never holds the admin token).
Read-only (``revive serve``) every route needs the admin bearer token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from revive.api.models import ActionView, CaseDetail, CaseSummary
from revive.lab.demo import DemoWorker
from revive.store import Store

__all__ = ["LAB_FAULTS", "create_lab_app"]

_HERE = Path(__file__).resolve().parent
TEMPLATES = _HERE / "templates"
STATIC = _HERE / "static"
POLL_SECONDS = 0.3
HEARTBEAT_SECONDS = 10.0
#: How long one SSE stream may live; the page reconnects (EventSource-style) after it.
STREAM_SECONDS = 600.0

#: Fault buttons of the page: provider fault name -> label. "kill_worker" is the lab's own.
LAB_FAULTS: dict[str, str] = {
    "expire_token": "Expire token",
    "kill_grant": "Kill grant",
    "claims_challenge": "CAE claims challenge",
    "unavailable": "503 burst",
    "rate_limit": "429 with Retry-After",
    "commit_then_drop": "Commit then drop",
    "latency": "Slow provider (3 s)",
}
_FAULT_BODIES: dict[str, dict[str, Any]] = {
    "unavailable": {"count": 3, "retry_after": 1},
    "rate_limit": {"count": 2, "retry_after": 1},
    "latency": {"ms": 3000, "count": 1},
}

CONFIG = web.AppKey("lab_config", dict)
DEMO = web.AppKey("lab_demo", DemoWorker)
HTTP = web.AppKey("lab_http", aiohttp.ClientSession)
CLOSING = web.AppKey("lab_closing", asyncio.Event)

_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_lab_app(
    *, provider_url: str | None, admin_token: str, interactive: bool
) -> web.Application:
    """The lab sub-app; mount it with ``app.add_subapp("/lab/", create_lab_app(...))``.

    Args:
        provider_url: the fake provider's base URL (its ``/_lab`` control API); ``None``
            hides the fault buttons and the mail log.
        admin_token: the sidecar's admin token: read-only mode checks it on every route;
            interactive mode uses it server-side to issue recovery capabilities.
        interactive: ``True`` for ``revive lab`` (faults, demo run, reconnect, resume; loopback
            peers only), ``False`` for ``revive serve`` (read-only, behind the admin token).
    """
    app = web.Application()
    app[CONFIG] = {
        "provider_url": provider_url.rstrip("/") if provider_url else None,
        "admin_token": admin_token,
        "interactive": interactive,
    }
    app[DEMO] = DemoWorker()
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)  # open event streams end at once, not at the timeout
    app.cleanup_ctx.append(_lifetime)
    app.middlewares.append(_guard)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.router.add_get("/api/state", _state)
    app.router.add_get("/api/cases/{case_id}", _case)
    app.router.add_get("/events", _events)
    if interactive:
        app.router.add_post("/api/faults", _fault)
        app.router.add_post("/api/run", _run)
        app.router.add_post("/api/kill", _kill)
        app.router.add_post("/api/resume", _resume)
    return app


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15),
                                 cookie_jar=aiohttp.DummyCookieJar())
    app[HTTP] = http
    yield
    await app[DEMO].close()
    await http.close()


async def _closing(app: web.Application) -> None:
    app[CLOSING].set()


def _config(request: web.Request) -> dict[str, Any]:
    config: dict[str, Any] = request.app[CONFIG]
    return config


def _problem(status: int, detail: str) -> web.Response:
    return web.json_response({"title": web.HTTPException.__name__, "status": status,
                              "detail": detail}, status=status,
                             content_type="application/problem+json")


def _is_loopback(remote: str | None) -> bool:
    return remote is not None and (remote.startswith("127.") or remote in ("::1", "localhost"))


@web.middleware
async def _guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Interactive: loopback peers only, POSTs need the lab header (no cross-site forms).
    Read-only: the admin bearer token on every JSON route (the page and its assets are public:
    they hold no data)."""
    config = _config(request)
    public = request.path.rstrip("/") in ("/lab", "") or "/static/" in request.path
    if config["interactive"]:
        if not _is_loopback(request.remote):
            return _problem(403, "the interactive lab answers loopback peers only")
        if request.method == "POST" and request.headers.get("X-Revive-Lab") != "1":
            return _problem(403, "send X-Revive-Lab: 1")
    elif not public:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        expected = str(config["admin_token"]).encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), expected
        ):
            answer = _problem(401, "send Authorization: Bearer <admin token>")
            answer.headers["WWW-Authenticate"] = 'Bearer realm="revive-admin"'
            return answer
    return await handler(request)


async def _index(request: web.Request) -> web.StreamResponse:
    if not request.path.endswith("/"):
        raise web.HTTPFound(request.path + "/")
    return web.FileResponse(TEMPLATES / "index.html", headers=_PAGE_HEADERS)


def _store(request: web.Request) -> Store:
    from revive.app import SERVICE  # here: revive.app may import this module to mount it

    return request.config_dict[SERVICE].store


# -- reading --------------------------------------------------------------------------------


async def _snapshot(request: web.Request) -> dict[str, Any]:
    """Everything the page lists: cases, runs with their ledgers, the demo, the mails."""
    config = _config(request)
    store = _store(request)
    demo = request.app[DEMO]
    cases = await store.list_cases()
    run_ids = sorted({c.run_id for c in cases} | ({demo.state.run_id} if config["interactive"]
                                                  else set()))
    runs: list[dict[str, Any]] = []
    for run_id in run_ids:
        run = await store.get_run(run_id)
        if run is None:
            continue
        actions = await store.list_actions(run_id)
        runs.append({
            "run_id": run.run_id, "epoch": run.epoch, "workflow": run.workflow,
            "updated_at": run.updated_at,
            "actions": [_action(a, demo) for a in (ActionView.from_row(r) for r in actions)],
        })
    snapshot: dict[str, Any] = {
        "interactive": config["interactive"],
        "cases": [CaseSummary.from_row(c).model_dump(mode="json") for c in cases],
        "runs": runs,
    }
    if config["interactive"]:
        snapshot["demo"] = demo.state.public() | {"running": demo.running}
        snapshot["faults"] = [{"fault": k, "label": v} for k, v in LAB_FAULTS.items()]
        snapshot["mails"] = await _provider_json(request, "GET", "/_lab/mails")
    return snapshot


def _action(view: ActionView, demo: DemoWorker) -> dict[str, Any]:
    row = view.model_dump(mode="json")
    evidence = view.evidence or {}
    row["reconciled"] = bool(evidence) and view.state in ("committed", "not_committed")
    row["replayed"] = (view.run_id == demo.state.run_id
                       and demo.state.replayed.get(view.action_key, False))
    row["ledger"] = "replayed" if row["replayed"] else view.state.replace("_", " ")
    return row


async def _provider_json(request: web.Request, method: str, path: str,
                         body: dict[str, Any] | None = None) -> Any:
    base = _config(request)["provider_url"]
    if base is None:
        return None
    try:
        async with request.app[HTTP].request(method, base + path, json=body) as resp:
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def _state(request: web.Request) -> web.Response:
    if _config(request)["interactive"]:
        # The page's first load starts run_7f2 up to its send (calendar read, briefing built).
        request.app[DEMO].prepare(_sidecar_url(request))
    return web.json_response(await _snapshot(request), headers={"Cache-Control": "no-store"})


async def _case_detail(request: web.Request, case_id: str) -> dict[str, Any] | None:
    store = _store(request)
    case = await store.get_case(case_id)
    if case is None:
        return None
    transitions = await store.transitions(case_id)
    actions = await store.list_actions(case.run_id)
    detail = CaseDetail.from_rows(case, transitions, actions).model_dump(mode="json")
    demo = request.app[DEMO]
    if not detail.get("workflow"):
        run = await store.get_run(case.run_id)
        detail["workflow"] = run.workflow if run is not None and run.workflow else (
            demo.state.workflow if case.run_id == demo.state.run_id else None
        )
    detail["actions"] = [_action(ActionView.from_row(a), demo) for a in actions]
    failed = next((a for a in detail["actions"]
                   if a["idempotency_key"] == case.idempotency_key), None)
    detail["failed_action"] = failed
    detail["what_broke"] = what_broke(detail)
    return detail


def what_broke(case: dict[str, Any]) -> str:
    """One plain sentence from the case: which grant died, for which run, and what waits."""
    code = case.get("provider_code") or case.get("failure_class") or "an error"
    workflow = case.get("workflow") or case.get("run_id")
    cls = str(case.get("failure_class") or "").replace("_", " ")
    return (
        f"The provider rejected generation {case.get('generation')} of "
        f"{case.get('connection_id')} ({code}{', ' + cls if cls and cls != code else ''}), so "
        f"\"{workflow}\" stopped at {case.get('checkpoint_id')} before "
        f"{case.get('action_key')} could finish; a human must reconnect the account."
    )


async def _case(request: web.Request) -> web.Response:
    detail = await _case_detail(request, request.match_info["case_id"])
    if detail is None:
        return _problem(404, "no such case")
    return web.json_response(detail, headers={"Cache-Control": "no-store"})


async def _events(request: web.Request) -> web.StreamResponse:
    """SSE: ``snapshot`` when anything listed changes, ``transition`` per new transition,
    ``ledger`` per changed action; a comment every 10 s; ends when the client goes away."""
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    })
    await resp.prepare(request)
    store = _store(request)
    last_snapshot = ""
    seen_versions: dict[str, int] = {}
    seen_actions: dict[str, str] = {}
    beat = time.monotonic()
    deadline = beat + STREAM_SECONDS
    try:
        await resp.write(b"retry: 1000\n\n")
        closing = request.app[CLOSING]
        while time.monotonic() < deadline and not closing.is_set():
            if request.transport is None or request.transport.is_closing():
                break
            snapshot = await _snapshot(request)
            text = json.dumps(snapshot, sort_keys=True)
            if text != last_snapshot:
                last_snapshot = text
                for case in snapshot["cases"]:
                    old = seen_versions.get(case["case_id"], 0)
                    if case["version"] > old:
                        for t in await store.transitions(case["case_id"]):
                            if t.seq > old:
                                await _send(resp, "transition", {
                                    "case_id": case["case_id"], "seq": t.seq,
                                    "from_state": t.from_state, "to_state": t.to_state,
                                    "at": t.at, "actor": t.actor,
                                })
                        seen_versions[case["case_id"]] = case["version"]
                for run in snapshot["runs"]:
                    for action in run["actions"]:
                        key = action["idempotency_key"]
                        if seen_actions.get(key) != action["ledger"]:
                            seen_actions[key] = action["ledger"]
                            await _send(resp, "ledger", action)
                await _send(resp, "snapshot", snapshot)
                beat = time.monotonic()
            elif time.monotonic() - beat > HEARTBEAT_SECONDS:
                await resp.write(b": heartbeat\n\n")
                beat = time.monotonic()
            try:
                await asyncio.wait_for(closing.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
    except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
        pass
    return resp


async def _send(resp: web.StreamResponse, event: str, data: Any) -> None:
    await resp.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


# -- acting (interactive only) ---------------------------------------------------------------


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


async def _fault(request: web.Request) -> web.Response:
    body = await _json_body(request)
    fault = body.get("fault")
    if fault == "kill_worker":
        return web.json_response({"fault": fault, "killed": request.app[DEMO].kill()})
    if not isinstance(fault, str) or fault not in LAB_FAULTS:
        return _problem(400, f"'fault' must be one of {sorted(LAB_FAULTS) + ['kill_worker']}")
    answer = await _provider_json(request, "POST", "/_lab/faults",
                                  {"fault": fault, **_FAULT_BODIES.get(fault, {})})
    if answer is None:
        return _problem(502, "the fake provider did not answer")
    return web.json_response(answer)


def _sidecar_url(request: web.Request) -> str:
    return str(request.url.origin())


async def _run(request: web.Request) -> web.Response:
    started = request.app[DEMO].start(_sidecar_url(request))
    return web.json_response({"started": started, **request.app[DEMO].state.public()})


async def _kill(request: web.Request) -> web.Response:
    return web.json_response({"killed": request.app[DEMO].kill()})


async def _resume(request: web.Request) -> web.Response:
    """Issue the case's recovery capability through ``POST /v1/cases/{id}/capability`` (with
    the admin token, server-side) and resume the demo run with it."""
    body = await _json_body(request)
    demo = request.app[DEMO]
    case_id = body.get("case_id") or demo.state.case_id
    if not isinstance(case_id, str) or not case_id:
        return _problem(400, "no parked case to resume")
    if demo.running:
        return _problem(409, "the worker is running")
    url = f"{_sidecar_url(request)}/v1/cases/{case_id}/capability"
    headers = {"Authorization": f"Bearer {_config(request)['admin_token']}"}
    async with request.app[HTTP].post(url, json={"actor": "lab operator"},
                                      headers=headers) as resp:
        answer = await resp.json(content_type=None)
        if resp.status != 200 or not isinstance(answer, dict):
            detail = answer.get("detail") if isinstance(answer, dict) else None
            return _problem(resp.status if resp.status >= 400 else 502,
                            str(detail or "the sidecar refused the capability"))
    demo.start(_sidecar_url(request), recovery_capability=str(answer["capability"]))
    return web.json_response({"resumed": case_id, "epoch": answer.get("epoch")})
