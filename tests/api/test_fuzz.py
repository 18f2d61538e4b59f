"""API fuzzing: schemathesis drives every operation of ``/v1/openapi.json`` on a live sidecar.

Hand-written route tests check the answers someone thought of; this checks the document
against the running server for inputs nobody thought of. For every operation the document
lists (so a route added later is fuzzed without touching this file), schemathesis generates
requests that fit the schema and requests that do not, and every answer must:

- not be a 5xx;
- as a 4xx, be ``application/problem+json`` whose ``type`` is one of ``PROBLEM_TYPES``,
  whose ``status`` is the HTTP status, and whose type is documented for that operation;
- conform to the document: status code, content type, headers and body schema
  (schemathesis' own conformance checks), and a request that breaks the schema is refused.

Random ids rarely name anything, so the sidecar is first walked through a real recovery
(a dead grant, a reconnect, an unknown outcome) and half of the generated requests carry ids
and capabilities that exist: the fuzzing reaches the handlers' real paths, not only their 404s.
Admin routes are fuzzed with the admin token, and again without it (every answer a 401).

Generation is derandomized (no example database; hypothesis derives its seed from the test's
code), so CI sees the same requests on every run. schemathesis sends with ``requests``,
which blocks: it runs in a worker thread while the sidecar serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import hypothesis.strategies as st
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from revive.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPES
from revive.lab.settings import LAB_CONNECTION
from revive.testing.story import RUN, Story

EXAMPLES = 100
"""Generated requests per operation and mode: ~4,400 requests in all, ~25 s on this machine.

A 1,000-example run (~6 min) found nothing this one misses; raise it locally to dig deeper."""

BUDGET_SECONDS = 100.0
"""A bound on the whole fuzz, should a request hang; the test's own timeout is 120 s."""

HTTP_LINE_LIMIT = 8190
"""aiohttp's parser limit on the request line and each header line (bytes, CRLF excluded).

A longer line never reaches the application: aiohttp itself answers a plain-text 400 and
closes. Such requests are checked for that 400 only (see ``_beyond_parser_limit``)."""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

AnyCase = Case[Any]

RUN_UNKNOWN = "run_fuzz_unknown"
RUN_OPEN = "run_fuzz_open"


@dataclass(frozen=True)
class Known:
    """Values that name something in the live sidecar, by the field names the API uses."""

    values: Mapping[str, tuple[str, ...]]

    def planted(self, base: st.SearchStrategy[AnyCase]) -> st.SearchStrategy[AnyCase]:
        """Cases from ``base`` whose ids and capabilities are swapped for known ones."""

        @st.composite
        def plant(draw: st.DrawFn) -> AnyCase:
            case = draw(base)
            for name in list(case.path_parameters):
                if name in self.values:
                    case.path_parameters[name] = draw(st.sampled_from(self.values[name]))
            if isinstance(case.body, dict):
                for name in list(case.body):
                    if name in self.values and isinstance(case.body[name], str):
                        case.body[name] = draw(st.sampled_from(self.values[name]))
            return case

        return plant()


@dataclass
class Fuzz:
    """One fuzzing session against one sidecar; collects every finding, not just the first."""

    base_url: str
    admin_token: str = field(repr=False)
    known: Known = field(repr=False)
    session: requests.Session = field(default_factory=requests.Session, repr=False)
    findings: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    beyond_limit: int = 0

    def run(self, document: dict[str, Any]) -> None:
        schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config())
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):
                raise AssertionError(f"an operation of the document does not load: {result.err()}")
            operation = result.ok()
            admin = "admin" in operation.definition.raw.get("tags", ())
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                generated = operation.as_strategy(generation_mode=mode)
                if mode is GenerationMode.POSITIVE:
                    generated = st.one_of(generated, self.known.planted(generated))
                if admin:
                    generated = generated.map(self._with_admin_token)
                self._explore(operation.label, mode, generated, self._conforms)
            if admin:  # schemathesis' own bearer values, or none: nothing but a 401 problem
                self._explore(
                    operation.label, "without the admin token",
                    operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                    self._refused_without_token,
                )

    def _with_admin_token(self, case: AnyCase) -> AnyCase:
        # A case without the header is a negative one that drops it on purpose: keep it so.
        if case.meta is None or case.meta.generation.mode.is_positive or (
            "Authorization" in case.headers
        ):
            case.headers["Authorization"] = f"Bearer {self.admin_token}"
        return case

    def _explore(
        self,
        label: str,
        mode: str,
        cases: st.SearchStrategy[AnyCase],
        check: Callable[[AnyCase, schemathesis.Response], None],
    ) -> None:
        @hypothesis.settings(
            max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink], print_blob=False,
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=cases)
        def explore(case: AnyCase) -> None:
            response = case.call(base_url=self.base_url, session=self.session, timeout=10)
            self.sent[label] = self.sent.get(label, 0) + 1
            if _beyond_parser_limit(response.request):
                self.beyond_limit += 1
                assert response.status_code == 400, _describe(case, response)
                return
            check(case, response)

        try:
            explore()
        except Unsatisfiable:
            # Nothing to negate: every value of every parameter is valid (a bare string id).
            assert mode == GenerationMode.NEGATIVE, f"{label}: no {mode} request generated"
        except (AssertionError, FailureGroup) as exc:
            self.findings.append(f"{label} [{mode}]: {exc}")

    def _conforms(self, case: AnyCase, response: schemathesis.Response) -> None:
        if response.status_code >= 400:
            problem = _assert_problem(case, response)
            if case.meta is not None and case.meta.generation.mode.is_positive:
                # A 400 may refuse a state ("the case is not ready"), never a valid input.
                assert "errors" not in problem, f"valid input refused: {_describe(case, response)}"
        case.validate_response(response, checks=CHECKS)

    def _refused_without_token(self, case: AnyCase, response: schemathesis.Response) -> None:
        problem = _assert_problem(case, response)
        assert problem["type"] == "urn:revive:unauthorized", _describe(case, response)
        assert "www-authenticate" in response.headers, _describe(case, response)
        case.validate_response(response, checks=CHECKS)


def _assert_problem(case: AnyCase, response: schemathesis.Response) -> dict[str, Any]:
    what = _describe(case, response)
    content_type = response.headers.get("content-type", [""])[0].split(";")[0].strip()
    assert content_type == PROBLEM_CONTENT_TYPE, what
    problem = json.loads(response.content)
    assert isinstance(problem, dict), what
    assert problem.get("type") in PROBLEM_TYPES, what
    assert problem["status"] == response.status_code == PROBLEM_TYPES[problem["type"]], what
    documented = case.operation.definition.raw["responses"].get(str(response.status_code), {})
    schema = documented.get("content", {}).get(PROBLEM_CONTENT_TYPE, {}).get("schema", {})
    assert problem["type"] in schema.get("properties", {}).get("type", {}).get("enum", ()), (
        f"undocumented problem type for this operation: {what}"
    )
    return problem


def _beyond_parser_limit(request: requests.PreparedRequest) -> bool:
    lines: list[list[str | bytes]] = [[request.method or "", " ", request.path_url, " HTTP/1.1"]]
    lines += [[name, ": ", value] for name, value in request.headers.items()]
    return any(sum(map(_size, line)) > HTTP_LINE_LIMIT for line in lines)


def _size(part: str | bytes) -> int:
    return len(part) if isinstance(part, bytes) else len(part.encode("utf-8", "surrogateescape"))


def _describe(case: AnyCase, response: schemathesis.Response) -> str:
    body = response.content[:500].decode("utf-8", "replace")
    return f"{case.method} {case.formatted_path} -> {response.status_code}: {body}"


# -- the recovery the fuzzing starts from -------------------------------------------------------


async def _walk_a_recovery(story: Story) -> Known:
    """Leave the sidecar holding a ready case, an open case, an unknown action and capabilities.

    Each step is a real worker or operator call, as in ``tests/recovery/test_story.py``.
    """
    run_token = await story.mint(checkpoint="chk-calendar")
    await story.provider.fault("kill_grant")
    dead = await story.send_briefing(run_token)
    assert dead.status == 424, dead.text
    ready_case = dead.body["case_id"]
    assert (await story.reconnect()).status == 200
    issued = await story.call("POST", f"/v1/cases/{ready_case}/capability", admin=True, json={})
    assert issued.status == 200, issued.text

    unknown_token = await story.mint(run=RUN_UNKNOWN)
    await story.provider.fault("commit_then_drop")
    dropped = await story.send_briefing(unknown_token)
    assert dropped.status == 502, dropped.text

    open_token = await story.mint(run=RUN_OPEN)
    await story.provider.fault("kill_grant")
    blocked = await story.send_briefing(open_token)
    assert blocked.status == 424, blocked.text
    open_case = blocked.body["case_id"]

    keys = []
    for case_id in (ready_case, open_case):
        keys += [a["idempotency_key"] for a in (await story.case(case_id))["actions"]]
    runs = await story.call("GET", f"/v1/runs/{RUN_UNKNOWN}")
    assert runs.status == 200, runs.text
    return Known({
        "connection_id": (LAB_CONNECTION,),
        "run_id": (RUN, RUN_UNKNOWN, RUN_OPEN),
        "case_id": (ready_case, open_case),
        "idempotency_key": tuple(dict.fromkeys(keys)),
        "capability": (run_token, unknown_token, open_token, issued.body["capability"]),
    })


async def test_every_operation_answers_within_its_document(story: Story) -> None:
    known = await _walk_a_recovery(story)
    document = await story.call("GET", "/v1/openapi.json")
    assert document.status == 200
    fuzz = Fuzz(story.sidecar.url, story.admin_token, known)
    async with asyncio.timeout(BUDGET_SECONDS):
        await asyncio.to_thread(fuzz.run, document.body)
    await asyncio.to_thread(fuzz.session.close)

    assert not fuzz.findings, "\n\n".join(fuzz.findings)
    operations = [
        f"{method.upper()} {path}"
        for path, item in document.body["paths"].items() for method in item
    ]
    assert sorted(fuzz.sent) == sorted(operations)  # every documented operation was fuzzed


# -- what the fuzzing found, pinned down -------------------------------------------------------

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


async def test_a_method_a_path_does_not_take_is_a_405_problem(story: Story) -> None:
    document = await story.call("GET", "/v1/openapi.json")
    for path, item in document.body["paths"].items():
        concrete = re.sub(r"\{\w+\}", "x", path)
        documented = sorted(method.upper() for method in item)
        for method in sorted(set(METHODS) - set(documented)):
            answer = await story.call(method, concrete, admin=True)
            assert answer.status == 405, (method, concrete, answer.text)
            assert answer.headers["Content-Type"] == PROBLEM_CONTENT_TYPE
            assert answer.body["type"] == "urn:revive:method-not-allowed"
            assert answer.headers["Allow"] == ", ".join(documented), (method, concrete)
    unknown = await story.call("DELETE", "/v1/no-such-route", admin=True)
    assert unknown.status == 404 and unknown.body["type"] == "urn:revive:not-found"


async def test_a_path_that_decodes_to_a_newline_gets_a_problem(story: Story) -> None:
    token = await story.mint()
    proxied = await story.graph("GET", "v1.0/me%0A", token)
    assert proxied.status == 400, proxied.text
    assert proxied.body["type"] == "urn:revive:bad-target"
    for path in ("/v1/%0A", "/%0A/x"):
        unknown = await story.call("GET", path)
        assert unknown.status == 404, unknown.text
        assert unknown.body["type"] == "urn:revive:not-found"


async def test_an_integral_float_epoch_is_an_integer(story: Story) -> None:
    # JSON Schema's "integer" includes 1.0, so the document allows it: so must the route.
    body = f'{{"connection_id": "{LAB_CONNECTION}", "checkpoint_id": "chk", "epoch": 1.0}}'
    headers = {"Content-Type": "application/json"}
    minted = await story.call("POST", "/v1/runs/run_float/capabilities", data=body,
                              headers=headers)
    assert minted.status == 200, minted.text
    assert minted.body["epoch"] == 1
    for epoch in ('"1"', "true", "1.5", str(2**63)):
        refused = await story.call("POST", "/v1/runs/run_float/capabilities",
                                   data=body.replace("1.0", epoch), headers=headers)
        assert refused.status == 400, (epoch, refused.text)
        assert refused.body["errors"][0]["field"] == "epoch"
