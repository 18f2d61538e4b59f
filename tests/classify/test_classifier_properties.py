"""Properties of every shipped policy's classifier over hostile input (issue #9).

``test_classifier.py`` pins documented answers and a fixed list of hostile bodies; here
hypothesis throws arbitrary statuses, header containers and bodies at every policy in
``policies/``, in both phases and under made-up phase names. The classifier runs on every
upstream answer, so it must answer exactly one class, the same one every time, and never by
its last-resort ``except`` (rule ``<policy>:error``): that path discards what the rules found.

2xx and ``dead_grant``: opening a recovery case on a successful answer would disconnect a
user for nothing and, for a POST, record a committed side effect as ``not_committed``. A 2xx
may still be a dead grant where the provider puts its error in a 2xx *body* (Slack's
``{"ok":false}``, GitHub's token endpoint, DESIGN §2 ``inspect_success_bodies``), so the
properties say: never on headers alone, never without a body that is read, and never when
the body carries none of the fields any rule reads.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from revive.classify import FailureClass, Phase, Policy, Verdict, load_policies
from revive.classify.classifier import MAX_MESSAGE_CHARS, Answer, JsonSource
from revive.classify.pointer import MISSING

POLICY_DIR = Path(__file__).parents[2] / "policies"
POLICY_NAMES = sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))

# Reproducible in CI: the same examples on every run, nothing read from or written to
# .hypothesis/. Sized so the module runs in a few seconds on two cores.
PROPS = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@cache
def policies() -> dict[str, Policy]:
    """Loaded once per process: strategies and tests share one compiled set."""
    return load_policies(POLICY_DIR)


# -- statuses and phases ----------------------------------------------------------------------

MEANINGFUL = [200, 201, 202, 204, 299, 300, 302, 400, 401, 403, 404, 408, 409, 422, 429, 500,
              502, 503, 504, 599]
ODD = [None, 0, -1, 1, 99, 600, 999, 1000, 2**31, -(2**63), 10**30, True, False]
statuses = st.one_of(
    st.integers(100, 599), st.sampled_from(MEANINGFUL), st.sampled_from(ODD), st.integers()
)
SUCCESS = st.integers(200, 299)
phases = st.one_of(
    st.sampled_from(list(Phase)), st.sampled_from([p.value for p in Phase]), st.text(max_size=12)
)

# -- headers ------------------------------------------------------------------------------------

NAMES = ["WWW-Authenticate", "www-authenticate", "WWW-AUTHENTICATE", "Retry-After", "retry-after",
         "X-RateLimit-Remaining", "x-ratelimit-remaining", "X-RateLimit-Reset", "Content-Type",
         "x-ms-ags-diagnostic", "Ünïcode-Näme"]
_CLAIMS = b'{"access_token":{"nbf":{"essential":true,"value":"1657834417"}}}'
AUTH_FRAGMENTS = [
    "Bearer ", 'realm=""', "error=", 'error="', "insufficient_claims", "insufficient_scope",
    "invalid_token", '"', ", ", "claims=", 'claims="', base64.b64encode(_CLAIMS).decode(),
    base64.urlsafe_b64encode(_CLAIMS).decode().rstrip("="), base64.b64encode(b"\xff\xfe").decode(),
    base64.b64encode(b"[" * 50_000).decode(), "eyJ", "==", "%%%", 'error_description="', "\u2028",
]
RETRY_VALUES = [
    "", " ", "0", "-5", "1e400", "-1e400", "NaN", "Infinity", "0x10", "Tue, 99 Foo",
    "Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 01 Jan 0001 00:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 -0000",
    "Sun, 06 Nov 1994 08:49:37 +9999", "Sunday, 06-Nov-94 08:49:37 GMT",
]
CHALLENGES = [
    'Bearer error="insufficient_scope"', "Bearer error=invalid_token",
    'Bearer realm="x", error="insufficient_claims", claims="'
    + base64.b64encode(_CLAIMS).decode() + '"',
    'Bearer realm="api", error="invalid_token", error_description="The token expired"',
]
header_names = st.one_of(st.sampled_from(NAMES), st.text(max_size=20))
header_text = st.one_of(
    st.text(max_size=40),
    # well-formed challenges inside garbage, so the header-only rules do fire
    st.tuples(st.text(max_size=4), st.sampled_from(CHALLENGES), st.text(max_size=4)).map(
        "".join
    ),
    st.lists(st.one_of(st.sampled_from(AUTH_FRAGMENTS), st.text(max_size=8)), max_size=8).map(
        "".join
    ),
    st.sampled_from(RETRY_VALUES),
    st.integers().map(str),
    st.floats().map(str),
    # huge values: built by repetition, not drawn char by char
    st.tuples(st.sampled_from(["a", "é", 'Bearer error="', "9", " "]),
              st.integers(10_000, 100_000)).map(lambda t: t[0] * t[1]),
)
header_pairs = st.lists(st.tuples(header_names, header_text), max_size=8)
headers = st.one_of(
    st.dictionaries(header_names, st.one_of(header_text, st.integers(), st.binary(max_size=8),
                                            st.none()), max_size=6),
    header_pairs.map(CIMultiDict),  # duplicate keys, as aiohttp delivers them
    header_pairs.map(lambda pairs: CIMultiDictProxy(CIMultiDict(pairs))),
    st.sampled_from([None, [], "text", 42, b"bytes", [("Retry-After", "1")]]),
    # a challenge for sure, among other headers: header-only rules are rare in the mix above
    st.tuples(header_pairs, st.sampled_from(NAMES[:3]), st.sampled_from(CHALLENGES)).map(
        lambda t: CIMultiDict([*t[0], (t[1], t[2])])
    ),
)

# -- bodies -------------------------------------------------------------------------------------

KEYS = ["error", "error_description", "error_codes", "suberror", "error_subtype", "ok", "code",
        "status", "category", "message", "errors", "error_summary", "Detail", "retry_after",
        "warning", "reason", "access_token"]
CODES = ["invalid_grant", "invalid_token", "invalid_client", "interaction_required",
         "temporarily_unavailable", "token_revoked", "missing_scope", "ratelimited", "not_authed",
         "bad_refresh_token", "BAD_REFRESH_TOKEN", "MISSING_SCOPES", "invalid_rapt",
         "AADSTS700082: gone", "AADSTS7000222", "InvalidAuthenticationToken", "missing_scope/..",
         "AuthenticationUnsuccessful", "basic_action", 700082, 4700, 3200]
NUMBERS = st.one_of(
    st.integers(), st.floats(), st.sampled_from([10**400, -(10**400), 2**63, 1e308, -0.0])
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20), st.sampled_from(CODES)),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children,
                        max_size=5),
    ),
    max_leaves=20,
)
error_docs = st.fixed_dictionaries(
    {},
    optional={
        "error": st.one_of(st.sampled_from(CODES), json_values),
        "error_description": st.one_of(st.sampled_from(CODES), st.text(max_size=40)),
        "error_codes": st.lists(st.one_of(st.sampled_from([700082, 50173, 7000222]), NUMBERS,
                                          st.none()), max_size=3),
        "suberror": st.sampled_from(["basic_action", "consent_required", "nope"]),
        "ok": st.one_of(st.booleans(), st.sampled_from(["false", 0])),
        "retry_after": NUMBERS,
        "status": st.sampled_from(["BAD_REFRESH_TOKEN", 401]),
        "category": st.just("MISSING_SCOPES"),
        "code": st.one_of(st.sampled_from(CODES), NUMBERS),
    },
)


def _encodings(text: str) -> st.SearchStrategy[Any]:
    raw = text.encode("utf-8")
    return st.one_of(
        st.just(text), st.just(raw), st.just(bytearray(raw)), st.just(memoryview(raw)),
        st.just(text.encode("utf-16")),  # not UTF-8
        st.integers(0, len(text)).map(lambda n: text[:n]),  # truncated
        st.just("  \r\n" + text),
    )


docs = st.one_of(json_values, error_docs)
bodies = st.one_of(
    st.sampled_from([None, b"", "", b" ", "null", "{}", "[]"]),
    docs.map(lambda d: json.dumps(d)).flatmap(_encodings),
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"\xff\xfe" + b),
    st.text(max_size=200),
    st.tuples(st.sampled_from(["[", '{"a":', '{"error":[']), st.integers(1, 100_000)).map(
        lambda t: t[0] * t[1] + ("]" * t[1] if t[0] == "[" else "")  # deep, or deep and cut
    ),
    st.sampled_from(['{"error":"invalid_grant"', "<html><body>Bad gateway</body></html>",
                     '{"retry_after": 1e999}', '{"retry_after": -Infinity}', '{"ok": NaN}',
                     '{"error_codes": [' + "9" * 5000 + "]}"]),
)


def _body_text(body: Any) -> str:
    return Answer(200, None, body).text


def _same(a: Verdict, b: Verdict) -> bool:
    """Equal in everything but ``retry_after``, which an HTTP-date makes depend on the clock."""
    return (a.failure_class, a.provider_code, a.claims, a.message, a.rule) == (
        b.failure_class, b.provider_code, b.claims, b.message, b.rule
    )


def _check(policy: Policy, phase: Any, status: Any, hdrs: Any, body: Any) -> Verdict:
    """Classify and check what must hold for any answer; returns the verdict."""
    v = policy.classify(phase, status, hdrs, body)
    assert type(v) is Verdict
    assert type(v.failure_class) is FailureClass and v.failure_class in set(FailureClass)
    assert not v.rule.endswith(":error"), f"fell back to the last-resort path: {v}"
    owner = v.rule.split(":", 1)[0]
    assert v.rule == "default" or owner in {policy.name, "oauth2"}, v.rule
    assert _same(v, policy.classify(phase, status, hdrs, body)), "not deterministic"
    if v.retry_after is not None:
        assert 0.0 <= v.retry_after < float("inf")
    assert v.provider_code is None or (isinstance(v.provider_code, str) and v.provider_code)
    if v.message is not None:
        assert 0 < len(v.message) <= MAX_MESSAGE_CHARS and "\n" not in v.message
    if v.claims is not None:
        json.loads(v.claims)
    if v.failure_class is FailureClass.OK:
        assert (v.provider_code, v.retry_after, v.message) == (None, None, None)
    return v


@PROPS
@given(name=st.sampled_from(POLICY_NAMES), phase=phases, status=statuses, hdrs=headers,
       body=bodies)
def test_any_answer_gets_exactly_one_class_every_time(
    name: str, phase: Any, status: Any, hdrs: Any, body: Any
) -> None:
    policy = policies()[name]
    v = _check(policy, phase, status, hdrs, body)
    if isinstance(status, int) and not isinstance(status, bool) and 200 <= status < 300:
        api = str(phase) not in {Phase.TOKEN_REFRESH.value}
        if api and not policy.inspect_success_bodies:
            assert v.failure_class is FailureClass.OK  # streamed unread (DESIGN §6)
        if v.failure_class is FailureClass.DEAD_GRANT:
            assert not api or policy.inspect_success_bodies, v
        if v.failure_class in (FailureClass.DEAD_GRANT, FailureClass.REFRESHABLE):
            # both act on a success (open a case / refresh and re-send a POST): only a body
            # that says so may make them
            assert _body_text(body).strip(), f"a 2xx judged on headers alone: {v}"


@cache
def _fields_rules_read() -> frozenset[str]:
    """Top-level JSON keys any rule or code source of any policy looks at."""
    keys: set[str] = set()
    for policy in policies().values():
        c = policy.classifier
        for phase in Phase:
            for rule in c.rules(phase):
                keys.update(t[0] for t, _ in (*rule.json_equals, *rule.json_regex) if t)
                keys.update(s.tokens[0] for s in rule.code
                            if isinstance(s, JsonSource) and s.tokens)
        keys.update(s.tokens[0] for s in (*c.code, *c.message)
                    if isinstance(s, JsonSource) and s.tokens)
    return frozenset(keys)


bland_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
success_bodies = st.one_of(
    st.sampled_from([None, b"", "{}", '{"ok":true}', "[]",
                     '{"access_token":"at","token_type":"Bearer","expires_in":3599}']),
    st.dictionaries(bland_keys, st.one_of(st.integers(), bland_keys, st.booleans()),
                    max_size=5).map(json.dumps),
)


@PROPS
@given(name=st.sampled_from(POLICY_NAMES), phase=st.sampled_from(list(Phase)), status=SUCCESS,
       hdrs=headers, body=success_bodies)
def test_a_2xx_without_an_error_in_its_body_is_never_a_dead_grant(
    name: str, phase: Phase, status: int, hdrs: Any, body: Any
) -> None:
    doc = Answer(status, None, body).json
    if isinstance(doc, dict) and set(doc) & _fields_rules_read():
        return  # a key some rule reads: not a bland body (bland_keys rarely hits one)
    v = _check(policies()[name], phase, status, hdrs, body)
    assert v.failure_class is not FailureClass.DEAD_GRANT, v


@PROPS
@given(name=st.sampled_from(POLICY_NAMES), phase=st.sampled_from(list(Phase)), status=statuses,
       pairs=header_pairs, doc=docs, raw=st.binary(max_size=64), use_doc=st.booleans())
def test_the_representation_of_an_answer_does_not_matter(
    name: str, phase: Phase, status: Any, pairs: list[tuple[str, str]], doc: Any, raw: bytes,
    use_doc: bool,
) -> None:
    """Phase as enum or text, headers as dict or multidict, body as bytes, text or views."""
    policy = policies()[name]
    data = json.dumps(doc).encode() if use_doc else raw
    last: dict[str, str] = {}
    for key, value in pairs:  # a multidict's last value wins, as in the classifier
        last[key.lower()] = value
    first = _check(policy, phase, status, CIMultiDict(pairs), data)
    variants: list[tuple[Any, Any, Any]] = [
        (phase.value, last, data),
        (phase, {(k.upper() if k.isascii() else k): v for k, v in last.items()}, bytearray(data)),
        (phase, CIMultiDictProxy(CIMultiDict(pairs)), memoryview(data)),
        (phase, last, data.decode("utf-8", "replace")),
    ]
    for ph, hdrs, body in variants:
        assert _same(first, policy.classify(ph, status, hdrs, body))


def test_the_hostile_body_alphabet_reaches_the_json_paths() -> None:
    """Guard the strategies: some drawn bodies must parse to objects the rules can read."""
    parsed = [Answer(400, None, json.dumps({"error": c})).json for c in CODES]
    assert all(doc is not MISSING and "error" in doc for doc in parsed)
    assert {"error", "ok", "error_codes", "suberror"} <= _fields_rules_read()


# -- what these properties found, pinned ------------------------------------------------------


def test_a_huge_retry_after_in_the_body_keeps_the_class_the_rules_found() -> None:
    """float(10**400) overflowed inside the verdict and the last resort answered ``ok``."""
    body = '{"ok":false,"error":"invalid_auth","retry_after":1' + "0" * 400 + "}"
    v = _check(policies()["slack"], "token_refresh", 200, {}, body)
    assert (v.failure_class, v.provider_code, v.retry_after) == (
        FailureClass.DEAD_GRANT, "invalid_auth", None
    )


def test_a_challenge_on_a_read_2xx_is_not_an_error() -> None:
    """The oauth2 header rules had no status: a GitHub 200 with a challenge was a dead grant."""
    for challenge in CHALLENGES:
        v = _check(policies()["github"], "api_call", 200, {"WWW-Authenticate": challenge}, b"{}")
        assert (v.failure_class, v.rule) == (FailureClass.OK, "oauth2:success")
    v = _check(policies()["github"], "api_call", 403, {"WWW-Authenticate": CHALLENGES[0]}, b"")
    assert (v.failure_class, v.rule) == (FailureClass.DEAD_GRANT, "oauth2:insufficient-scope")
