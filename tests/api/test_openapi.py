"""The OpenAPI document: valid 3.1, complete for the app's routes and the problem types."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate
from revive.api.auth import AdminAuth
from revive.api.models import AbandonRequest, MintRunCapabilityRequest
from revive.api.openapi import OPERATIONS, PROXY_OPERATION, build_openapi
from revive.api.routes import add_routes
from revive.api.service import RecoveryApi
from revive.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPES

API_KEY = web.AppKey[RecoveryApi]("api")
ADMIN_KEY = web.AppKey[AdminAuth]("admin")
METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_openapi()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def test_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    json.dumps(doc)  # plain JSON, nothing pydantic-specific left in it


def test_every_registered_v1_route_is_documented(doc: dict[str, Any]) -> None:
    app = web.Application()
    add_routes(app, API_KEY, ADMIN_KEY)
    registered = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    assert all(path.startswith("/v1/") for path, _ in registered)
    assert len(registered) == len(OPERATIONS)
    for path, method in registered:
        assert method in doc["paths"].get(path, {}), f"{method.upper()} {path} undocumented"


def test_the_proxy_route_is_documented(doc: dict[str, Any]) -> None:
    item = doc["paths"]["/proxy/{connection_id}/{tail}"]
    assert METHODS <= set(item)
    assert item["post"]["security"] == [{"runCapability": []}]
    assert PROXY_OPERATION.operation_id == "proxy"


def test_every_problem_type_is_documented(doc: dict[str, Any]) -> None:
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["properties"]["type"]["enum"]) == set(PROBLEM_TYPES)
    answered: dict[str, set[int]] = {}
    for _, _, op in operations(doc):
        for status, answer in op["responses"].items():
            content = answer.get("content", {})
            if PROBLEM_CONTENT_TYPE in content:
                for kind in content[PROBLEM_CONTENT_TYPE]["schema"]["properties"]["type"]["enum"]:
                    answered.setdefault(kind, set()).add(int(status))
    assert set(answered) == set(PROBLEM_TYPES)
    for kind, statuses in answered.items():
        assert statuses == {PROBLEM_TYPES[kind]}, kind  # documented under its own status


def test_every_operation_documents_its_answers(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids))
    for path, method, op in operations(doc):
        where = f"{method.upper()} {path}"
        assert {"400", "500"} <= set(op["responses"]), where
        assert any(s.startswith("2") or s in ("302", "default") for s in op["responses"]), where
        if "admin" in op["tags"]:
            assert "401" in op["responses"], where
            assert op["security"] == [{"adminToken": []}], where
        for name in [p for p in path.split("/") if p.startswith("{")]:
            assert any(p["name"] == name[1:-1] and p["in"] == "path"
                       for p in op["parameters"]), where


def test_bodies_come_from_the_models(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    mint = doc["paths"]["/v1/runs/{run_id}/capabilities"]["post"]
    ref = mint["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/MintRunCapabilityRequest"
    schema = schemas["MintRunCapabilityRequest"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["epoch"]["minimum"] == 1
    assert set(schema["required"]) == {"connection_id", "checkpoint_id", "epoch"}
    assert schemas["AbandonRequest"]["required"] == ["reason"]
    assert MintRunCapabilityRequest.__name__ in schemas and AbandonRequest.__name__ in schemas
    # An action view never documents (or carries) the stored answer.
    assert "response" not in schemas["ActionView"]["properties"]
    cases = doc["paths"]["/v1/cases"]["get"]
    assert {p["name"] for p in cases["parameters"] if p["in"] == "query"} == {
        "state", "connection_id", "run_id"
    }


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(doc))
    assert found
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_security_schemes(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["adminToken"] == {**schemes["adminToken"], "type": "http", "scheme": "bearer"}
    assert schemes["runCapability"]["bearerFormat"] == "JWT"
