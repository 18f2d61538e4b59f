"""Classifier behaviour beyond the corpus: headers, retry hints, claims, hostile bodies."""

from __future__ import annotations

import base64
import json
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from multidict import CIMultiDict

from revive.classify import FailureClass, Phase, Policy, Verdict, load_policies
from revive.classify.classifier import Answer, parse_retry_after, retry_after

ROOT = Path(__file__).parents[2]
CLAIMS = {"access_token": {"nbf": {"essential": True, "value": "1657834417"}}}


@pytest.fixture(scope="module")
def policies() -> dict[str, Policy]:
    return load_policies(ROOT / "policies")


def _b64(obj: object, *, pad: bool = True, urlsafe: bool = False) -> str:
    raw = json.dumps(obj).encode()
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
    return text if pad else text.rstrip("=")


# -- Retry-After -------------------------------------------------------------------------------


def test_retry_after_seconds(policies: dict[str, Policy]) -> None:
    v = policies["microsoft"].classify("api_call", 429, {"Retry-After": "41"}, b"")
    assert v.failure_class is FailureClass.TRANSIENT
    assert v.retry_after == 41.0


def test_retry_after_http_date_is_relative_to_now(policies: dict[str, Policy]) -> None:
    when = formatdate(time.time() + 120, usegmt=True)
    v = policies["oauth2"].classify("api_call", 503, {"retry-after": when}, None)
    assert v.failure_class is FailureClass.TRANSIENT
    assert v.retry_after is not None and 110 <= v.retry_after <= 121


def test_retry_after_in_the_past_is_zero_never_negative() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None


def test_exhausted_github_limit_waits_until_reset(policies: dict[str, Policy]) -> None:
    reset = int(time.time()) + 300
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)}
    v = policies["github"].classify("api_call", 403, headers, '{"message":"Forbidden"}')
    assert v.failure_class is FailureClass.TRANSIENT
    assert v.retry_after is not None and 290 <= v.retry_after <= 301


def test_remaining_budget_gives_no_retry_hint() -> None:
    answer = Answer(200, {"x-ratelimit-remaining": "10", "x-ratelimit-reset": "9999999999"}, "")
    assert retry_after(answer) is None


def test_slack_body_retry_after(policies: dict[str, Policy]) -> None:
    v = policies["slack"].classify("api_call", 429, {}, b'{"ok":false,"error":"ratelimited","retry_after":7}')
    assert (v.failure_class, v.provider_code, v.retry_after) == (FailureClass.TRANSIENT, "ratelimited", 7.0)


# -- claims challenges ----------------------------------------------------------------------


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("urlsafe", [True, False])
def test_claims_decoded_with_or_without_padding(
    policies: dict[str, Policy], pad: bool, urlsafe: bool
) -> None:
    header = (
        'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/'
        f'authorize", error="insufficient_claims", claims="{_b64(CLAIMS, pad=pad, urlsafe=urlsafe)}"'
    )
    v = policies["microsoft"].classify(Phase.API_CALL, 401, {"WWW-Authenticate": header}, b"")
    assert v.failure_class is FailureClass.REFRESHABLE
    assert v.provider_code == "insufficient_claims"
    assert v.claims is not None and json.loads(v.claims) == CLAIMS


def test_undecodable_claims_stay_none_but_class_holds(policies: dict[str, Policy]) -> None:
    header = 'Bearer error="insufficient_claims", claims="!!!not-base64!!!"'
    v = policies["microsoft"].classify("api_call", 401, {"www-authenticate": header}, None)
    assert v.failure_class is FailureClass.REFRESHABLE
    assert v.claims is None


def test_claims_challenge_for_unknown_provider_via_defaults(policies: dict[str, Policy]) -> None:
    header = f'Bearer error="insufficient_claims", claims="{_b64(CLAIMS)}"'
    v = policies["oauth2"].classify("api_call", 401, {"WWW-Authenticate": header}, "")
    assert (v.failure_class, v.provider_code, v.rule) == (
        FailureClass.REFRESHABLE, "insufficient_claims", "oauth2:claims-challenge"
    )


# -- headers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["WWW-Authenticate", "www-authenticate", "Www-AUTHENTICATE"])
def test_header_names_are_case_insensitive(policies: dict[str, Policy], name: str) -> None:
    value = 'Bearer realm="https://accounts.google.com/", error="insufficient_scope"'
    v = policies["google"].classify("api_call", 403, {name: value}, "{}")
    assert (v.failure_class, v.provider_code) == (FailureClass.DEAD_GRANT, "insufficient_scope")


def test_multidict_headers(policies: dict[str, Policy]) -> None:
    headers = CIMultiDict([("Retry-After", "3"), ("X-RateLimit-Remaining", "0")])
    v = policies["github"].classify("api_call", 403, headers, b"{}")
    assert (v.failure_class, v.retry_after) == (FailureClass.TRANSIENT, 3.0)


# -- defaults for providers without a file ------------------------------------------------


def test_unknown_provider_invalid_grant_is_dead(policies: dict[str, Policy]) -> None:
    v = policies["oauth2"].classify(
        "token_refresh", 400, {}, b'{"error":"invalid_grant","error_description":"gone\\nmore"}'
    )
    assert v == Verdict(
        FailureClass.DEAD_GRANT, "invalid_grant", message="gone", rule="oauth2:dead-grant"
    )


def test_provider_rules_fall_back_to_defaults(policies: dict[str, Policy]) -> None:
    v = policies["box"].classify("token_refresh", 401, {}, '{"error":"invalid_client"}')
    assert (v.failure_class, v.rule) == (FailureClass.PERMANENT, "oauth2:client-config")


def test_entra_unknown_code_falls_back_but_reports_aadsts(policies: dict[str, Policy]) -> None:
    body = '{"error":"invalid_grant","error_description":"AADSTS123456: new thing","error_codes":[123456]}'
    v = policies["microsoft"].classify("token_refresh", 400, {}, body)
    assert (v.failure_class, v.provider_code) == (FailureClass.DEAD_GRANT, "AADSTS123456")


@pytest.mark.parametrize(
    ("phase", "status", "body", "expected"),
    [
        ("token_refresh", 400, '{"error":"invalid_client"}', FailureClass.PERMANENT),
        ("token_refresh", 503, '{"error":"temporarily_unavailable"}', FailureClass.TRANSIENT),
        ("token_refresh", 400, "<html><body>Bad gateway</body></html>", FailureClass.TRANSIENT),
        ("token_refresh", 200, '{"access_token":"x","token_type":"Bearer"}', FailureClass.OK),
        ("api_call", 401, "", FailureClass.REFRESHABLE),
        ("api_call", 404, '{"error":"nope"}', FailureClass.PERMANENT),
        ("api_call", 502, "", FailureClass.TRANSIENT),
        ("api_call", 204, None, FailureClass.OK),
    ],
)
def test_rfc_defaults(
    policies: dict[str, Policy], phase: str, status: int, body: str | None, expected: FailureClass
) -> None:
    assert policies["oauth2"].classify(phase, status, {}, body).failure_class is expected


# -- documented behaviour not in the corpus -----------------------------------------------


@pytest.mark.parametrize(
    ("provider", "phase", "status", "headers", "body", "expected", "code"),
    [
        ("google", "api_call", 403, {}, '{"error":{"errors":[{"domain":"usageLimits","reason":"dailyLimitExceeded"}],"code":403}}', "transient", "dailyLimitExceeded"),
        ("google", "api_call", 403, {}, '{"error":{"errors":[{"domain":"usageLimits","reason":"rateLimitExceeded"}],"code":403}}', "transient", "rateLimitExceeded"),
        ("google", "token_refresh", None, {}, '{"error":"internal_failure"}', "transient", "internal_failure"),
        ("github", "api_call", 429, {"retry-after": "60"}, '{"message":"whatever"}', "transient", None),
        ("slack", "api_call", 200, {}, '{"ok":false,"error":"missing_scope","needed":"chat:write"}', "dead_grant", "missing_scope"),
        ("slack", "api_call", 200, {}, '{"ok":false,"error":"not_authed"}', "permanent", "not_authed"),
        ("slack", "api_call", 200, {}, '{"ok":true,"channel":"C1"}', "ok", None),
        ("salesforce", "token_refresh", None, {}, '{"error":"unknown_error","error_description":"retry your request"}', "transient", "unknown_error"),
        ("dropbox", "api_call", 401, {"WWW-Authenticate": 'Bearer realm="Dropbox-API"'}, '{"error_summary":"missing_scope/..","error":{".tag":"missing_scope","required_scope":"files.content.write"}}', "dead_grant", "missing_scope"),
        ("zoom", "api_call", 401, {}, '{"code":4700,"message":"Invalid access token, does not contain scopes."}', "dead_grant", "4700"),
        ("shopify", "api_call", 403, {}, '{"errors":"This action requires merchant approval for read_orders scope."}', "dead_grant", None),
        ("notion", "api_call", 502, {}, "<html>Bad Gateway</html>", "transient", None),
        ("quickbooks", "api_call", 403, {}, '<IntuitResponse><Fault><Error code="3001"><Message>message=ThrottleExceeded; errorCode=003001; statusCode=403</Message></Error></Fault></IntuitResponse>', "transient", "3001"),
        ("atlassian", "token_refresh", 403, {}, '{"error":"unauthorized_client","error_description":"refresh_token is invalid"}', "dead_grant", "unauthorized_client"),
        ("hubspot", "token_refresh", 400, {}, '{"status":"BAD_REFRESH_TOKEN","message":"missing or invalid refresh token"}', "dead_grant", "BAD_REFRESH_TOKEN"),
        ("microsoft", "token_refresh", 400, {}, '{"error":"interaction_required","error_description":"AADSTS50076: Due to a configuration change","error_codes":[50076]}', "dead_grant", "AADSTS50076"),
        ("microsoft", "token_refresh", 401, {}, '{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys are expired.","error_codes":[7000222]}', "permanent", "AADSTS7000222"),
    ],
)
def test_documented_behaviour(
    policies: dict[str, Policy],
    provider: str,
    phase: str,
    status: int | None,
    headers: dict[str, str],
    body: str,
    expected: str,
    code: str | None,
) -> None:
    v = policies[provider].classify(phase, status, headers, body)
    assert v.failure_class == expected, v
    if code is not None:
        assert v.provider_code == code


def test_message_is_first_line_and_bounded(policies: dict[str, Policy]) -> None:
    long = "AADSTS700082: " + "x" * 1000
    body = json.dumps({"error": "invalid_grant", "error_description": f"{long}\r\nTrace ID: 1"})
    v = policies["microsoft"].classify("token_refresh", 400, {}, body)
    assert v.message is not None and v.message.startswith("AADSTS700082: ")
    assert len(v.message) == 300 and "Trace" not in v.message


# -- never raises ------------------------------------------------------------------------


HOSTILE_BODIES: list[object] = [
    None, b"", b"\xff\xfe\x00garbage", "<html><body>oops</body></html>", "<?xml version='1.0'?><a/>",
    "a=b&c=d", '{"error": "invalid_gr', "[1, 2, 3]", "42", "null", '"just a string"',
    "[" * 100_000, "x" * 5_000_000, '{"error": {"code": ["list"]}, "error_codes": [null]}',
    '[{"errorCode": 5}]', '{"ok": "false"}', bytearray(b'{"error":"invalid_grant"}'),
]


@pytest.mark.parametrize("policy_name", ["oauth2", "microsoft", "slack", "github", "quickbooks", "dropbox"])
@pytest.mark.parametrize("status", [None, 0, 200, 302, 401, 403, 429, 500, 999, -1])
@pytest.mark.parametrize("phase", ["api_call", "token_refresh", "nonsense"])
def test_never_raises(policies: dict[str, Policy], policy_name: str, status: int | None, phase: str) -> None:
    policy = policies[policy_name]
    for body in HOSTILE_BODIES:
        header_sets: list[dict[str, str]] = [
            {}, {"WWW-Authenticate": 'claims="%%%"'}, {"Retry-After": "Tue, 99 Foo"}
        ]
        for headers in header_sets:
            v = policy.classify(phase, status, headers, body)  # type: ignore[arg-type]
            assert isinstance(v, Verdict) and isinstance(v.failure_class, FailureClass)


def test_odd_header_containers_never_raise(policies: dict[str, Policy]) -> None:
    containers: list[object] = [None, [], "text", {"x": None}, {1: 2}]
    for headers in containers:
        v = policies["oauth2"].classify("api_call", 401, headers, b"")  # type: ignore[arg-type]
        assert v.failure_class is FailureClass.REFRESHABLE


def test_missing_status_without_signal_is_transient(policies: dict[str, Policy]) -> None:
    assert policies["oauth2"].classify("api_call", None, {}, None).failure_class is FailureClass.TRANSIENT
