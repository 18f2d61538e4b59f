"""The ``/v1`` routes over real HTTP, in front of a fake ``RecoveryApi``.

Each test starts the routes on an ephemeral loopback port. A test middleware can make the
handlers see another peer address (``request.clone(remote=...)``), which is how the loopback
rules are exercised without a second interface.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from revive.api.auth import AdminAuth
from revive.api.problems import not_found
from revive.api.routes import add_routes
from revive.api.service import AtRisk, Minted, RecoveryApi, Redemption, WebhookOutcome
from revive.errors import (
    BadRequest,
    CapabilityInvalid,
    Fenced,
    NotFound,
    ProblemError,
    RecoveryRequired,
)
from revive.recovery.machine import TransitionNotAllowed
from revive.store.models import ActionRow, CaseRow, ConflictError, RunRow, TransitionRow
from revive.tokens import CapabilityClaims

PROBLEM = "application/problem+json"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
CAPABILITY = "eyJ.fake-run-capability.sig"
RECOVERY = "eyJ.fake-recovery-capability.sig"
STORED_RESPONSE = '{"headers": {}, "body_b64": "c2VjcmV0LXJlcGxheS1jYW5hcnk="}'
OTHER_PEER = "192.0.2.77"

API_KEY = web.AppKey[RecoveryApi]("api")
ADMIN_KEY = web.AppKey[AdminAuth]("admin")


# -- factories ----------------------------------------------------------------------------------


def claims(**over: Any) -> CapabilityClaims:
    base: dict[str, Any] = {
        "run_id": "run-1", "connection_id": "graph", "generation": 2, "epoch": 1,
        "checkpoint_id": "chk-1", "typ": "run", "iat": 1_700_000_000, "exp": 1_700_000_900,
        "jti": "jti-1",
    }
    return CapabilityClaims(**{**base, **over})


def action_row(**over: Any) -> ActionRow:
    base: dict[str, Any] = {
        "idempotency_key": "idem-1", "run_id": "run-1", "action_key": "send-mail",
        "checkpoint_id": "chk-1", "connection_id": "graph", "fingerprint": "fp",
        "state": "unknown", "attempts": 1, "status": None, "response": STORED_RESPONSE,
        "case_id": "case-1", "owner": "sidecar-a", "evidence": None,
        "updated_at": 1_700_000_010.5,
    }
    return ActionRow(**{**base, **over})


def case_row(**over: Any) -> CaseRow:
    base: dict[str, Any] = {
        "case_id": "case-1", "run_id": "run-1", "connection_id": "graph", "generation": 2,
        "epoch": 1, "checkpoint_id": "chk-1", "action_key": "send-mail",
        "idempotency_key": "idem-1",
        "failure_class": "dead_grant", "provider_code": "AADSTS700082",
        "provider_message": "The refresh token has expired", "evidence": {"status": 400},
        "state": "open", "version": 1, "outcome": None, "workflow": "mailer",
        "created_at": 1_700_000_000.0, "updated_at": 1_700_000_001.0,
    }
    return CaseRow(**{**base, **over})


def transition_row(**over: Any) -> TransitionRow:
    base: dict[str, Any] = {
        "case_id": "case-1", "seq": 1, "from_state": None, "to_state": "open",
        "at": 1_700_000_000.0, "actor": "proxy", "evidence": {"status": 400},
    }
    return TransitionRow(**{**base, **over})


@dataclass
class FakeApi:
    """A ``RecoveryApi`` that records every call and raises what a test puts in ``fail``."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    action: ActionRow | None = field(default_factory=action_row)
    cases: list[CaseRow] = field(default_factory=lambda: [case_row()])

    def _called(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    async def mint_run_capability(
        self, run_id: str, connection_id: str, checkpoint_id: str, epoch: int,
        workflow: str | None,
    ) -> Minted:
        self._called("mint_run_capability", run_id, connection_id, checkpoint_id, epoch, workflow)
        return Minted(CAPABILITY, claims(run_id=run_id, connection_id=connection_id,
                                         checkpoint_id=checkpoint_id, epoch=epoch))

    async def renew(self, token: str) -> Minted:
        self._called("renew", token)
        return Minted(CAPABILITY, claims(exp=1_700_001_800, jti="jti-2"))

    async def redeem(self, token: str) -> Redemption:
        self._called("redeem", token)
        return Redemption(
            minted=Minted(CAPABILITY, claims(epoch=2, generation=3)), epoch=2, generation=3,
            checkpoint_id="chk-1", case_id="case-1", action=self.action,
        )

    async def settle_action(
        self, idempotency_key: str, outcome: Literal["committed", "not_committed"],
        evidence: dict[str, Any],
    ) -> ActionRow:
        self._called("settle_action", idempotency_key, outcome, evidence)
        return action_row(idempotency_key=idempotency_key, state=outcome, evidence=evidence)

    async def run_status(self, run_id: str) -> tuple[RunRow, list[CaseRow]]:
        self._called("run_status", run_id)
        return RunRow(run_id, 3, "mailer", 1.0, 2.0), self.cases

    async def list_cases(
        self, state: str | None, connection_id: str | None, run_id: str | None
    ) -> list[CaseRow]:
        self._called("list_cases", state, connection_id, run_id)
        return self.cases

    async def get_case(
        self, case_id: str
    ) -> tuple[CaseRow, list[TransitionRow], list[ActionRow]]:
        self._called("get_case", case_id)
        transitions = [
            transition_row(),
            transition_row(seq=2, from_state="open", to_state="awaiting_reconnect",
                           actor="notifier", evidence={}),
        ]
        return case_row(case_id=case_id), transitions, [action_row(), action_row(
            idempotency_key="idem-0", state="committed", status=201)]

    async def reconnected(
        self, connection_id: str, actor: str, evidence: dict[str, Any]
    ) -> list[CaseRow]:
        self._called("reconnected", connection_id, actor, evidence)
        return [replace(c, state="reconnected") for c in self.cases]

    async def nango_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookOutcome:
        self._called("nango_webhook", body)
        return WebhookOutcome(False, None, "ignored")

    async def connections_at_risk(self) -> list[AtRisk]:
        self._called("connections_at_risk")
        return []

    async def begin_connect(self, connection_id: str, redirect_uri: str) -> str:
        self._called("begin_connect", connection_id, redirect_uri)
        return f"https://login.example/authorize?client_id=x&state=s1&cid={connection_id}"

    async def complete_connect(
        self, connection_id: str, params: Mapping[str, str]
    ) -> list[CaseRow]:
        self._called("complete_connect", connection_id, dict(params))
        return [replace(c, state="ready") for c in self.cases]

    async def issue_recovery_capability(self, case_id: str, actor: str) -> Minted:
        self._called("issue_recovery_capability", case_id, actor)
        return Minted(RECOVERY, claims(typ="recovery", case_id=case_id, epoch=2, generation=3,
                                       exp=1_700_000_300))

    async def abandon(self, case_id: str, actor: str, reason: str) -> CaseRow:
        self._called("abandon", case_id, actor, reason)
        return case_row(case_id=case_id, state="abandoned", version=2)

    def jwks(self) -> dict[str, Any]:
        self._called("jwks")
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k1",
                          "alg": "EdDSA", "use": "sig"}]}


def _typed(fake: FakeApi) -> RecoveryApi:
    return fake  # mypy proves FakeApi satisfies the Protocol here


# -- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    api: FakeApi
    http: aiohttp.ClientSession

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def call(
        self, method: str, path: str, *, admin: bool = False, **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, Any]:
        headers = {**(self.admin() if admin else {}), **kwargs.pop("headers", {})}
        async with self.http.request(method, self.url + path, headers=headers,
                                     allow_redirects=False, **kwargs) as resp:
            text = await resp.text()
            body: Any = text
            if resp.content_type in ("application/json", PROBLEM):
                body = json.loads(text)
            return resp, body


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(*, loopback_only: bool = True, peer: str | None = None) -> Server:
        middlewares = []
        if peer is not None:
            @web.middleware
            async def as_peer(request: web.Request, handler: Any) -> web.StreamResponse:
                response: web.StreamResponse = await handler(request.clone(remote=peer))
                return response
            middlewares.append(as_peer)
        app = web.Application(middlewares=middlewares)
        fake = FakeApi()
        app[API_KEY] = _typed(fake)
        app[ADMIN_KEY] = AdminAuth(ADMIN_TOKEN)
        add_routes(app, API_KEY, ADMIN_KEY, loopback_only=loopback_only)
        app.router.add_route("*", "/{tail:.*}", not_found)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Server(f"http://127.0.0.1:{runner.addresses[0][1]}", fake, http)

    yield start
    for http in sessions:
        await http.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def server(serve: ServerFactory) -> Server:
    return await serve()


MINT = {"connection_id": "graph", "checkpoint_id": "chk-1", "epoch": 1, "workflow": "mailer"}


def assert_problem(resp: aiohttp.ClientResponse, body: Any, status: int, kind: str) -> None:
    assert resp.status == status, body
    assert resp.content_type == PROBLEM
    assert body["type"] == f"urn:revive:{kind}"
    assert body["status"] == status


# -- worker routes ------------------------------------------------------------------------------


async def test_mint_run_capability(server: Server) -> None:
    resp, body = await server.call("POST", "/v1/runs/run-1/capabilities", json=MINT)
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert body == {
        "capability": CAPABILITY, "expires_at": 1_700_000_900, "run_id": "run-1",
        "connection_id": "graph", "epoch": 1, "generation": 2, "checkpoint_id": "chk-1",
    }
    assert server.api.calls == [("mint_run_capability", ("run-1", "graph", "chk-1", 1, "mailer"))]


async def test_mint_workflow_is_optional(server: Server) -> None:
    body = {k: v for k, v in MINT.items() if k != "workflow"}
    resp, _ = await server.call("POST", "/v1/runs/run-1/capabilities", json=body)
    assert resp.status == 200
    assert server.api.calls[0][1][-1] is None


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({**MINT, "epoch": 0}, "epoch"),
        ({**MINT, "epoch": "1"}, "epoch"),  # strict: no string coercion
        ({**MINT, "epoch": True}, "epoch"),
        ({**MINT, "epoch": 1.5}, "epoch"),
        ({k: v for k, v in MINT.items() if k != "connection_id"}, "connection_id"),
        ({**MINT, "checkpoint_id": ""}, "checkpoint_id"),
        ({**MINT, "colour": "blue"}, "colour"),
        ([MINT], "body"),
    ],
)
async def test_mint_invalid_body_names_the_field(
    server: Server, payload: Any, field: str
) -> None:
    resp, body = await server.call("POST", "/v1/runs/run-1/capabilities", json=payload)
    assert_problem(resp, body, 400, "bad-request")
    assert [e["field"] for e in body["errors"]] == [field]
    assert field in body["detail"]
    assert server.api.calls == []


@pytest.mark.parametrize("raw", [b"{not json", b"{\"epoch\": 1,}", b"\xff\xfe"])
async def test_body_that_is_not_json(server: Server, raw: bytes) -> None:
    resp, body = await server.call(
        "POST", "/v1/runs/run-1/capabilities", data=raw,
        headers={"Content-Type": "application/json"},
    )
    assert_problem(resp, body, 400, "bad-request")
    assert body["errors"][0]["field"] == "body"
    assert server.api.calls == []


async def test_body_must_be_sent_as_json(server: Server) -> None:
    # A text/plain POST is what a hostile web page can send to loopback without a preflight.
    resp, body = await server.call(
        "POST", "/v1/runs/run-1/capabilities", data=json.dumps(MINT),
        headers={"Content-Type": "text/plain"},
    )
    assert_problem(resp, body, 400, "bad-request")
    assert "application/json" in body["detail"]
    assert server.api.calls == []


async def test_invalid_value_is_never_echoed(server: Server) -> None:
    canary = "eyJ.secret-canary-capability"
    resp, body = await server.call("POST", "/v1/capabilities/redeem",
                                   json={"capability": [canary]})
    assert_problem(resp, body, 400, "bad-request")
    assert body["errors"][0]["field"] == "capability"
    assert canary not in json.dumps(body)


@pytest.mark.parametrize(
    ("error", "status", "kind", "extra"),
    [
        (Fenced("epoch 1 is older than 2", run_id="run-1"), 409, "fenced", {"run_id": "run-1"}),
        (RecoveryRequired("run-1 has an open case", case_id="case-9", run_id="run-1",
                          checkpoint_id="chk-1", action_key="send-mail",
                          provider_code="invalid_grant"),
         424, "recovery-required",
         {"case_id": "case-9", "run_id": "run-1", "checkpoint_id": "chk-1",
          "action_key": "send-mail", "provider_code": "invalid_grant"}),
        (NotFound("no connection named 'graph'"), 404, "not-found", {}),
    ],
)
async def test_mint_problems_from_the_service(
    server: Server, error: ProblemError, status: int, kind: str, extra: dict[str, Any]
) -> None:
    server.api.fail["mint_run_capability"] = error
    resp, body = await server.call("POST", "/v1/runs/run-1/capabilities", json=MINT)
    assert_problem(resp, body, status, kind)
    assert body["detail"] == error.detail
    assert body["instance"] == "/v1/runs/run-1/capabilities"
    for key, value in extra.items():
        assert body[key] == value


async def test_renew(server: Server) -> None:
    resp, body = await server.call("POST", "/v1/capabilities/renew",
                                   json={"capability": CAPABILITY})
    assert resp.status == 200
    assert body["expires_at"] == 1_700_001_800
    assert set(body) == {"capability", "expires_at", "run_id", "connection_id", "epoch",
                         "generation", "checkpoint_id"}
    assert server.api.calls == [("renew", (CAPABILITY,))]


@pytest.mark.parametrize("route", ["/v1/capabilities/renew", "/v1/capabilities/redeem"])
@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [(CapabilityInvalid("capability expired"), 401, "capability-invalid"),
     (Fenced("generation 2 is older than 3"), 409, "fenced")],
)
async def test_capability_problems(
    server: Server, route: str, error: ProblemError, status: int, kind: str
) -> None:
    server.api.fail["renew"] = server.api.fail["redeem"] = error
    resp, body = await server.call("POST", route, json={"capability": CAPABILITY})
    assert_problem(resp, body, status, kind)
    assert CAPABILITY not in json.dumps(body)


@pytest.mark.parametrize(
    ("state", "outcome"),
    [("unknown", "unknown"), ("committed", "committed"), ("not_committed", "not_committed"),
     ("failed", "failed"), ("in_flight", "unknown")],
)
async def test_redeem(server: Server, state: str, outcome: str) -> None:
    server.api.action = action_row(state=state)
    resp, body = await server.call("POST", "/v1/capabilities/redeem",
                                   json={"capability": RECOVERY})
    assert resp.status == 200
    assert body == {
        "capability": CAPABILITY, "expires_at": 1_700_000_900, "run_id": "run-1", "epoch": 2,
        "generation": 3, "checkpoint_id": "chk-1", "case_id": "case-1",
        "action": {"action_key": "send-mail", "idempotency_key": "idem-1", "outcome": outcome},
    }
    assert server.api.calls == [("redeem", (RECOVERY,))]


async def test_redeem_without_an_action(server: Server) -> None:
    server.api.action = None
    resp, body = await server.call("POST", "/v1/capabilities/redeem",
                                   json={"capability": RECOVERY})
    assert resp.status == 200
    assert body["action"] is None


async def test_settle_action(server: Server) -> None:
    resp, body = await server.call(
        "POST", "/v1/actions/idem%2F7/outcome",
        json={"outcome": "committed", "evidence": {"message_id": "m-1"}},
    )
    assert resp.status == 200
    assert body["idempotency_key"] == "idem/7"
    assert body["state"] == "committed"
    assert body["evidence"] == {"message_id": "m-1"}
    assert "response" not in body
    assert "c2VjcmV0" not in json.dumps(body)
    assert server.api.calls == [("settle_action", ("idem/7", "committed", {"message_id": "m-1"}))]


async def test_settle_evidence_defaults_to_empty(server: Server) -> None:
    resp, _ = await server.call("POST", "/v1/actions/idem-1/outcome",
                                json={"outcome": "not_committed"})
    assert resp.status == 200
    assert server.api.calls == [("settle_action", ("idem-1", "not_committed", {}))]


@pytest.mark.parametrize(
    ("payload", "field"),
    [({"outcome": "maybe"}, "outcome"), ({}, "outcome"),
     ({"outcome": "committed", "evidence": []}, "evidence"),
     ({"outcome": "committed", "response": "x"}, "response")],
)
async def test_settle_invalid(server: Server, payload: Any, field: str) -> None:
    resp, body = await server.call("POST", "/v1/actions/idem-1/outcome", json=payload)
    assert_problem(resp, body, 400, "bad-request")
    assert [e["field"] for e in body["errors"]] == [field]
    assert server.api.calls == []


async def test_settle_conflict_is_a_bad_request(server: Server) -> None:
    server.api.fail["settle_action"] = ConflictError("action", "idem-1", "unknown", "committed")
    resp, body = await server.call("POST", "/v1/actions/idem-1/outcome",
                                   json={"outcome": "committed"})
    assert_problem(resp, body, 400, "bad-request")
    assert body["state"] == "committed"
    assert "only an unknown outcome" in body["detail"]


async def test_settle_unknown_key(server: Server) -> None:
    server.api.fail["settle_action"] = NotFound("no action idem-x")
    resp, body = await server.call("POST", "/v1/actions/idem-x/outcome",
                                   json={"outcome": "committed"})
    assert_problem(resp, body, 404, "not-found")


async def test_run_status(server: Server) -> None:
    resp, body = await server.call("GET", "/v1/runs/run-1")
    assert resp.status == 200
    assert body["run_id"] == "run-1" and body["epoch"] == 3 and body["workflow"] == "mailer"
    [case] = body["open_cases"]
    assert case["case_id"] == "case-1" and case["state"] == "open"
    assert "evidence" not in case and "provider_message" not in case  # summary only


async def test_run_status_unknown_run(server: Server) -> None:
    server.api.fail["run_status"] = NotFound("no run run-x")
    resp, body = await server.call("GET", "/v1/runs/run-x")
    assert_problem(resp, body, 404, "not-found")


WORKER_CALLS = [
    ("POST", "/v1/runs/run-1/capabilities", MINT),
    ("POST", "/v1/capabilities/renew", {"capability": CAPABILITY}),
    ("POST", "/v1/capabilities/redeem", {"capability": RECOVERY}),
    ("POST", "/v1/actions/idem-1/outcome", {"outcome": "committed"}),
    ("GET", "/v1/runs/run-1", None),
]


@pytest.mark.parametrize(("method", "path", "payload"), WORKER_CALLS)
async def test_worker_routes_refuse_other_peers(
    serve: ServerFactory, method: str, path: str, payload: Any
) -> None:
    server = await serve(peer=OTHER_PEER)
    resp, body = await server.call(method, path, json=payload)
    assert_problem(resp, body, 400, "bad-request")
    assert "loopback" in body["detail"]
    assert server.api.calls == []


@pytest.mark.parametrize(("method", "path", "payload"), WORKER_CALLS)
async def test_worker_routes_open_to_other_peers_when_allowed(
    serve: ServerFactory, method: str, path: str, payload: Any
) -> None:
    server = await serve(peer=OTHER_PEER, loopback_only=False)
    resp, _ = await server.call(method, path, json=payload)
    assert resp.status == 200


async def test_ipv4_mapped_loopback_is_loopback(serve: ServerFactory) -> None:
    server = await serve(peer="::ffff:127.0.0.1")
    resp, _ = await server.call("GET", "/v1/runs/run-1")
    assert resp.status == 200


# -- admin routes -------------------------------------------------------------------------------


ADMIN_CALLS = [
    ("GET", "/v1/cases", None),
    ("GET", "/v1/cases/case-1", None),
    ("POST", "/v1/connections/graph/reconnected", {}),
    ("POST", "/v1/cases/case-1/capability", {}),
    ("POST", "/v1/cases/case-1/abandon", {"reason": "customer left"}),
]


@pytest.mark.parametrize(("method", "path", "payload"), ADMIN_CALLS)
@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {ADMIN_TOKEN}x", "Bearer wrong-token-0123456789", f"Basic {ADMIN_TOKEN}",
     "Bearer ", f"Token {ADMIN_TOKEN}", "Bearer \u00e9\u00e9\u00e9"],
)
async def test_admin_routes_need_the_token(
    server: Server, method: str, path: str, payload: Any, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    resp, body = await server.call(method, path, json=payload, headers=headers)
    assert_problem(resp, body, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert ADMIN_TOKEN not in json.dumps(body)
    assert server.api.calls == []


@pytest.mark.parametrize(("method", "path", "payload"), ADMIN_CALLS)
async def test_admin_routes_with_the_token(
    serve: ServerFactory, method: str, path: str, payload: Any
) -> None:
    # From another peer too: the token, not the address, authorises the control routes.
    server = await serve(peer=OTHER_PEER)
    resp, _ = await server.call(method, path, json=payload, admin=True)
    assert resp.status == 200
    assert len(server.api.calls) == 1


async def test_admin_scheme_is_case_insensitive(server: Server) -> None:
    resp, _ = await server.call("GET", "/v1/cases",
                                headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
    assert resp.status == 200


async def test_list_cases_with_filters(server: Server) -> None:
    resp, body = await server.call(
        "GET", "/v1/cases?state=ready&connection_id=graph&run_id=run-1", admin=True
    )
    assert resp.status == 200
    assert [c["case_id"] for c in body["cases"]] == ["case-1"]
    assert server.api.calls == [("list_cases", ("ready", "graph", "run-1"))]


async def test_list_cases_without_filters(server: Server) -> None:
    resp, _ = await server.call("GET", "/v1/cases", admin=True)
    assert resp.status == 200
    assert server.api.calls == [("list_cases", (None, None, None))]


@pytest.mark.parametrize(
    ("query", "field"),
    [("state=sleeping", "state"), ("colour=red", "colour"), ("run_id=", "run_id")],
)
async def test_list_cases_invalid_query(server: Server, query: str, field: str) -> None:
    resp, body = await server.call("GET", f"/v1/cases?{query}", admin=True)
    assert_problem(resp, body, 400, "bad-request")
    assert [e["field"] for e in body["errors"]] == [field]
    assert server.api.calls == []


async def test_list_cases_repeated_filter(server: Server) -> None:
    resp, body = await server.call("GET", "/v1/cases?state=open&state=ready", admin=True)
    assert_problem(resp, body, 400, "bad-request")


async def test_get_case_is_the_incident_record(server: Server) -> None:
    resp, body = await server.call("GET", "/v1/cases/case-1", admin=True)
    assert resp.status == 200
    for name in CaseRow.__dataclass_fields__:
        assert name in body, name
    assert body["evidence"] == {"status": 400}
    assert body["provider_message"] == "The refresh token has expired"
    assert body["transitions"] == [
        {"seq": 1, "from_state": None, "to_state": "open", "at": 1_700_000_000.0,
         "actor": "proxy", "evidence": {"status": 400}},
        {"seq": 2, "from_state": "open", "to_state": "awaiting_reconnect",
         "at": 1_700_000_000.0, "actor": "notifier", "evidence": {}},
    ]
    assert [a["idempotency_key"] for a in body["actions"]] == ["idem-1", "idem-0"]
    assert all("response" not in a for a in body["actions"])
    assert "c2VjcmV0" not in json.dumps(body)  # the stored answer never leaves


async def test_get_case_unknown(server: Server) -> None:
    server.api.fail["get_case"] = NotFound("no case case-x")
    resp, body = await server.call("GET", "/v1/cases/case-x", admin=True)
    assert_problem(resp, body, 404, "not-found")


async def test_reconnected_empty_body_uses_defaults(server: Server) -> None:
    async with server.http.post(server.url + "/v1/connections/graph/reconnected",
                                headers=server.admin()) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["connection_id"] == "graph"
    assert [c["state"] for c in body["advanced"]] == ["reconnected"]
    assert server.api.calls == [("reconnected", ("graph", "operator", {}))]


async def test_reconnected_with_actor_and_evidence(server: Server) -> None:
    resp, _ = await server.call(
        "POST", "/v1/connections/graph/reconnected", admin=True,
        json={"actor": "nango-webhook", "evidence": {"event": "auth.refreshed"}},
    )
    assert resp.status == 200
    assert server.api.calls == [
        ("reconnected", ("graph", "nango-webhook", {"event": "auth.refreshed"}))
    ]


async def test_reconnected_unknown_connection(server: Server) -> None:
    server.api.fail["reconnected"] = NotFound("no connection named 'nope'")
    resp, body = await server.call("POST", "/v1/connections/nope/reconnected", admin=True,
                                   json={})
    assert_problem(resp, body, 404, "not-found")


async def test_issue_recovery_capability(server: Server) -> None:
    resp, body = await server.call("POST", "/v1/cases/case-1/capability", admin=True,
                                   json={"actor": "alice"})
    assert resp.status == 200
    assert body == {
        "capability": RECOVERY, "expires_at": 1_700_000_300, "case_id": "case-1",
        "run_id": "run-1", "epoch": 2, "generation": 3, "checkpoint_id": "chk-1",
    }
    assert resp.headers["Cache-Control"] == "no-store"
    assert server.api.calls == [("issue_recovery_capability", ("case-1", "alice"))]


async def test_issue_recovery_capability_not_ready(server: Server) -> None:
    server.api.fail["issue_recovery_capability"] = BadRequest("case case-1 is open, not ready")
    resp, body = await server.call("POST", "/v1/cases/case-1/capability", admin=True, json={})
    assert_problem(resp, body, 400, "bad-request")
    assert "not ready" in body["detail"]


async def test_abandon(server: Server) -> None:
    resp, body = await server.call("POST", "/v1/cases/case-1/abandon", admin=True,
                                   json={"reason": "customer left", "actor": "bob"})
    assert resp.status == 200
    assert body["state"] == "abandoned" and body["case_id"] == "case-1"
    assert server.api.calls == [("abandon", ("case-1", "bob", "customer left"))]


async def test_abandon_needs_a_reason(server: Server) -> None:
    resp, body = await server.call("POST", "/v1/cases/case-1/abandon", admin=True, json={})
    assert_problem(resp, body, 400, "bad-request")
    assert [e["field"] for e in body["errors"]] == ["reason"]


@pytest.mark.parametrize(
    "error",
    [TransitionNotAllowed("closed", "abandoned"), ConflictError("case", "case-1", "2", "3")],
)
async def test_abandon_a_case_that_moved(server: Server, error: Exception) -> None:
    server.api.fail["abandon"] = error
    resp, body = await server.call("POST", "/v1/cases/case-1/abandon", admin=True,
                                   json={"reason": "r"})
    assert_problem(resp, body, 400, "bad-request")
    assert body["state"] in ("closed", "3")


# -- browser and public routes ------------------------------------------------------------------


async def test_connect_redirects_to_the_provider(server: Server) -> None:
    resp, _ = await server.call("GET", "/v1/connections/graph/connect")
    assert resp.status == 302
    assert resp.headers["Location"] == (
        "https://login.example/authorize?client_id=x&state=s1&cid=graph"
    )
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert server.api.calls == [
        ("begin_connect", ("graph", f"{server.url}/v1/connections/graph/callback"))
    ]


async def test_connect_is_loopback_only_whatever_the_flag(serve: ServerFactory) -> None:
    server = await serve(peer=OTHER_PEER, loopback_only=False)
    resp, body = await server.call("GET", "/v1/connections/graph/connect",
                                   headers=server.admin())
    assert_problem(resp, body, 400, "bad-request")
    assert "loopback" in body["detail"]
    assert server.api.calls == []


async def test_connect_unknown_connection(server: Server) -> None:
    server.api.fail["begin_connect"] = NotFound("no connection named 'nope'")
    resp, body = await server.call("GET", "/v1/connections/nope/connect")
    assert_problem(resp, body, 404, "not-found")


async def test_callback_page(serve: ServerFactory) -> None:
    server = await serve(peer=OTHER_PEER)  # the state, not the address, guards the callback
    server.api.cases = [case_row(), case_row(case_id="case-2")]
    resp, page = await server.call("GET", "/v1/connections/graph/callback?code=c0de&state=s1")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "Reconnected graph; 2 cases advanced" in page
    assert resp.headers["Content-Security-Policy"] == "default-src 'none'"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert server.api.calls == [("complete_connect", ("graph", {"code": "c0de", "state": "s1"}))]


async def test_callback_page_escapes_the_connection_id(server: Server) -> None:
    resp, page = await server.call("GET", "/v1/connections/%3Cb%3Ex/callback?code=c&state=s")
    assert resp.status == 200
    assert "Reconnected &lt;b&gt;x; 1 case advanced" in page
    assert "<b>" not in page


async def test_callback_refuses_repeated_parameters(server: Server) -> None:
    resp, body = await server.call(
        "GET", "/v1/connections/graph/callback?code=a&state=s1&state=s2"
    )
    assert_problem(resp, body, 400, "bad-request")
    assert server.api.calls == []


async def test_callback_problem(server: Server) -> None:
    server.api.fail["complete_connect"] = BadRequest("unknown or expired state")
    resp, body = await server.call("GET", "/v1/connections/graph/callback?error=access_denied")
    assert_problem(resp, body, 400, "bad-request")
    assert body["detail"] == "unknown or expired state"


async def test_jwks(serve: ServerFactory) -> None:
    server = await serve(peer=OTHER_PEER)
    resp, body = await server.call("GET", "/v1/jwks")
    assert resp.status == 200
    assert body["keys"][0]["kid"] == "k1"


async def test_openapi_is_served(serve: ServerFactory) -> None:
    server = await serve(peer=OTHER_PEER)
    resp, body = await server.call("GET", "/v1/openapi.json")
    assert resp.status == 200
    assert body["openapi"] == "3.1.0"
    assert "/v1/runs/{run_id}/capabilities" in body["paths"]


async def test_unexpected_error_is_an_opaque_500(server: Server) -> None:
    server.api.fail["run_status"] = RuntimeError(f"db exploded near {CAPABILITY}")
    resp, body = await server.call("GET", "/v1/runs/run-1")
    assert_problem(resp, body, 500, "internal")
    assert CAPABILITY not in json.dumps(body)


async def test_wrong_method_is_a_problem(server: Server) -> None:
    resp, _ = await server.call("GET", "/v1/capabilities/redeem")
    assert resp.content_type == PROBLEM
    assert resp.status in (404, 405)
