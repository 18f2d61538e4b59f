"""Policy files load into frozen policies; every bad file fails naming file, rule and reason."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from revive.classify import (
    FailureClass,
    HeaderStamp,
    JsonBodyStamp,
    Policy,
    ProbeSpec,
    load_policies,
    load_policy,
)
from revive.errors import PolicyError

ROOT = Path(__file__).parents[2]
POLICY_DIR = ROOT / "policies"
PROVIDERS = [
    "microsoft", "google", "slack", "github", "salesforce", "hubspot", "atlassian", "dropbox",
    "zoom", "notion", "xero", "quickbooks", "box", "shopify",
]

GOOD = """\
classify:
  api_call:
    - id: first
      when: {status: 418}
      class: permanent
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Factory: write a policy file into tmp_path and return its path."""

    def _write(text: str, name: str = "acme") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


@pytest.fixture(scope="module")
def policies() -> dict[str, Policy]:
    return load_policies(POLICY_DIR)


def test_every_provider_and_the_defaults_load(policies: dict[str, Policy]) -> None:
    assert set(policies) == {*PROVIDERS, "oauth2"}


@pytest.mark.parametrize("name", [*PROVIDERS, "oauth2"])
def test_each_file_loads_alone(name: str) -> None:
    policy = load_policy(POLICY_DIR / f"{name}.yaml")
    assert policy.name == name
    assert policy.file.endswith(f"{name}.yaml")
    assert policy.retry.attempts >= 1


def test_provider_rules_come_before_the_defaults(policies: dict[str, Policy]) -> None:
    rules = policies["slack"].classifier.api_call
    owners = [r.policy for r in rules]
    assert owners[0] == "slack" and owners[-1] == "oauth2"
    assert owners == sorted(owners, key=lambda o: o == "oauth2")  # no interleaving


def test_microsoft_facts(policies: dict[str, Policy]) -> None:
    ms = policies["microsoft"]
    assert ms.probe == ProbeSpec("GET", "/v1.0/me", (200,))
    assert ms.refresh_token_rotates is True
    assert ms.is_mutating("POST", "/v1.0/me/sendMail")
    assert not ms.is_mutating("get", "/v1.0/me/messages")
    assert ms.reconcile_for("GET", "/v1.0/me/sendMail") is None
    rule = ms.reconcile_for("POST", "/v1.0/me/sendMail")
    assert rule is not None
    assert isinstance(rule.stamp, JsonBodyStamp)
    assert rule.stamp.pointer == "/message/singleValueExtendedProperties"
    assert rule.stamp.render_entry("k-1") == {
        "id": "String {00020329-0000-0000-C000-000000000046} Name x-revive-idempotency-key",
        "value": "k-1",
    }
    path, query = rule.lookup.render("k-1")
    assert path == "/v1.0/me/mailFolders/SentItems/messages"
    assert query == (
        (
            "$filter",
            "singleValueExtendedProperties/Any(ep: ep/id eq 'String "
            "{00020329-0000-0000-C000-000000000046} Name x-revive-idempotency-key' "
            "and ep/value eq 'k-1')",
        ),
    )
    assert (rule.lookup.attempts, rule.lookup.interval_s) == (3, 0.5)
    assert rule.lookup.found({"value": [{"id": "m1"}]})
    assert not rule.lookup.found({"value": []})
    assert not rule.lookup.found({"error": {}})


def test_provider_flags(policies: dict[str, Policy]) -> None:
    assert policies["xero"].idempotency_header == "Idempotency-Key"
    assert policies["slack"].inspect_success_bodies and policies["github"].inspect_success_bodies
    assert not policies["google"].inspect_success_bodies
    assert not policies["slack"].is_mutating("POST", "/api/conversations.history")
    assert policies["slack"].is_mutating("POST", "/api/chat.postMessage")


def test_header_stamp_and_defaults(write: Callable[..., Path]) -> None:
    policy = load_policy(write("""\
        mutating: {methods: [POST]}
        reconcile:
          - name: create
            method: POST
            path: '^/things$'
            stamp: {kind: header, name: X-Request-Key}
            lookup:
              path: /things
              query: {key: '{idempotency_key}'}
              found_when_nonempty: /items
    """))
    assert policy.mutating_methods == frozenset({"POST"})
    assert not policy.is_mutating("DELETE", "/things/1")
    rule = policy.reconcile_for("post", "/things")
    assert rule is not None and rule.stamp == HeaderStamp("X-Request-Key", "{idempotency_key}")
    # no defaults given: a 2xx with no rule is ok, a 401 refreshable, by status alone
    assert policy.classify("api_call", 200, {}, b"{}").failure_class is FailureClass.OK
    assert policy.classify("api_call", 401, {}, b"").rule == "default"


def test_default_mutating_methods(write: Callable[..., Path]) -> None:
    policy = load_policy(write(GOOD))
    assert policy.mutating_methods == frozenset({"POST", "PUT", "PATCH", "DELETE"})
    for method in ("GET", "HEAD", "OPTIONS"):
        assert not policy.is_mutating(method, "/x")


def test_status_forms(write: Callable[..., Path]) -> None:
    policy = load_policy(write("""\
        classify:
          api_call:
            - {id: a, when: {status: "400-403"}, class: dead_grant}
            - {id: b, when: {status: [404, 5xx]}, class: transient}
    """))
    got = [policy.classify("api_call", s, {}, None).rule for s in (400, 403, 404, 503, 405)]
    assert got == ["acme:a", "acme:a", "acme:b", "acme:b", "default"]


def test_code_in_and_literal_code(write: Callable[..., Path]) -> None:
    policy = load_policy(write("""\
        code: [{json: /err/num, format: "E{}"}]
        classify:
          token_refresh:
            - {id: dead, when: {code_in: [e7]}, class: dead_grant}
            - {id: lit, when: {body: boom}, class: transient, code: {literal: BOOM}}
    """))
    v = policy.classify("token_refresh", 400, {}, '{"err": {"num": 7}}')
    assert (v.failure_class, v.provider_code, v.rule) == (FailureClass.DEAD_GRANT, "E7", "acme:dead")
    v = policy.classify("token_refresh", 400, {}, "boom")
    assert (v.provider_code, v.rule) == ("BOOM", "acme:lit")


# -- bad files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule", "reason"),
    [
        pytest.param(
            """\
            classify:
              api_call:
                - {id: ok-rule, when: {status: 401}, class: refreshable}
                - {id: broken, when: {body: '(unclosed'}, class: transient}
            """,
            "classify.api_call[1] (broken)", "bad regex", id="bad-regex",
        ),
        pytest.param(
            """\
            classify:
              token_refresh:
                - {id: a, when: {status: 400}, class: dead_grant}
                - {id: b, when: {status: 400}, class: dead_grant}
                - {id: c, when: {status: 400}, class: dead_grant}
                - {id: weird, when: {status: 400}, class: zombie}
            """,
            "classify.token_refresh[3] (weird)", "class", id="unknown-class",
        ),
        pytest.param(
            """\
            classify:
              api_call:
                - {id: typo, when: {statsu: 401}, class: refreshable}
            """,
            "classify.api_call[0] (typo)", "unknown key 'statsu'", id="unknown-key-in-rule",
        ),
        pytest.param(
            "retries: {attempts: 3}\n", "retries", "unknown key 'retries'", id="unknown-top-key",
        ),
        pytest.param(
            """\
            classify:
              api_call:
                - {id: ptr, when: {json: {error/code: x}}, class: permanent}
            """,
            "classify.api_call[0] (ptr)", "must be empty or start with '/'", id="bad-pointer",
        ),
        pytest.param(
            """\
            classify:
              api_call:
                - {id: ptr, when: {status: 400}, class: permanent, code: {json: '/a/~2'}}
            """,
            "classify.api_call[0] (ptr)", "'~' not followed by 0 or 1", id="bad-pointer-escape",
        ),
        pytest.param(
            """\
            classify:
              api_call:
                - {id: st, when: {status: "4xx-5xx"}, class: permanent}
            """,
            "classify.api_call[0] (st)", "bad status", id="bad-status",
        ),
        pytest.param(
            """\
            classify:
              api_call:
                - {id: src, when: {status: 400}, class: permanent, code: {json: /a, body: b}}
            """,
            "classify.api_call[0] (src)", "exactly one of", id="two-code-kinds",
        ),
        pytest.param(
            """\
            classify:
              api_call:
                - {id: same, when: {status: 400}, class: permanent}
                - {id: same, when: {status: 401}, class: permanent}
            """,
            "policy", "duplicate rule id 'same'", id="duplicate-id",
        ),
        pytest.param(
            """\
            classify:
              api_call:
                - {when: {status: 400}, class: permanent}
            """,
            "classify.api_call[0]", "id", id="missing-id",
        ),
        pytest.param(
            """\
            reconcile:
              - name: r
                method: POST
                path: '^/x$'
                stamp: {kind: header, name: X-Key}
                lookup: {path: /x, found_when_nonempty: /items}
            """,
            "reconcile[0]", "{idempotency_key}", id="lookup-without-key",
        ),
        pytest.param(
            "classify:\n  api_call:\n    - {id: a, class: ok\n", "yaml", "line", id="yaml-syntax",
        ),
        pytest.param("- just\n- a list\n", "yaml", "mapping", id="not-a-mapping"),
    ],
)
def test_bad_file_names_file_rule_and_reason(
    write: Callable[..., Path], text: str, rule: str, reason: str
) -> None:
    path = write(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    assert err.file == str(path)
    assert err.rule == rule
    assert reason in err.reason
    assert str(path) in str(err)


def test_yaml_error_reports_the_line(write: Callable[..., Path]) -> None:
    path = write("retry:\n  attempts: 3\nclassify: [\n  {id: a\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.rule == "yaml"
    assert "line " in info.value.reason


def test_missing_defaults_file(tmp_path: Path) -> None:
    (tmp_path / "acme.yaml").write_text(GOOD)
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    assert info.value.file.endswith("oauth2.yaml")


def test_bad_provider_file_fails_the_whole_load(tmp_path: Path) -> None:
    (tmp_path / "oauth2.yaml").write_text((POLICY_DIR / "oauth2.yaml").read_text())
    (tmp_path / "acme.yaml").write_text("classify: {api_call: [{id: x, class: nope}]}\n")
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    assert info.value.file == str(tmp_path / "acme.yaml")
    assert info.value.rule == "classify.api_call[0] (x)"


def test_policies_are_frozen(policies: dict[str, Policy]) -> None:
    with pytest.raises(AttributeError):
        policies["google"].name = "other"  # type: ignore[misc]


def test_corpus_shape_is_json_lines() -> None:
    """Guards the fixture the corpus tests rely on (one object per line, the graded fields)."""
    for line in (ROOT / "tests" / "corpus" / "providers.jsonl").read_text("utf-8").splitlines():
        case = json.loads(line)
        assert {"id", "provider", "phase", "status", "headers", "body", "expected_class"} <= set(case)


def test_exported_names() -> None:
    import revive.classify as pkg

    assert all(hasattr(pkg, name) for name in pkg.__all__)
    for name in ("FailureClass", "Phase", "Verdict", "RetryPolicy", "ProbeSpec", "ReconcileRule",
                 "Policy", "load_policy", "load_policies"):
        assert name in pkg.__all__
