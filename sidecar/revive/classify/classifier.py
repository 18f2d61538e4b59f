"""The hot path: match one upstream answer against precompiled rules, first match wins.

Rules and code sources are built by the loader; this module only evaluates them. The answer's
body is decoded and JSON-parsed lazily and at most once, so a rule that fails on status never
pays for parsing. ``Classifier.classify`` never raises: anything unexpected degrades to a
status-based verdict (rule ``"<policy>:error"``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from revive.classify.model import FailureClass, Phase, Verdict
from revive.classify.pointer import MISSING, resolve

MAX_JSON_BYTES = 1 << 20
"""Bodies above this are not JSON-parsed (error bodies are small; huge 2xx bodies are data)."""
MAX_REGEX_CHARS = 64 << 10
"""Body regexes see at most this many leading characters, bounding worst-case regex cost."""
MAX_MESSAGE_CHARS = 300

_PHASES: dict[str, Phase] = {p.value: p for p in Phase}
_CLAIMS = re.compile(r'\bclaims\s*=\s*"?([A-Za-z0-9+/_=-]+)')


class Answer:
    """One upstream answer with lazily derived views (text, JSON, lower-cased headers)."""

    __slots__ = ("status", "headers", "_body", "_text", "_json")

    def __init__(self, status: int | None, headers: Any, body: Any) -> None:
        self.status = status if isinstance(status, int) and not isinstance(status, bool) else None
        self.headers = _lower_headers(headers)
        self._body = body
        self._text: str | None = None
        self._json: Any = _UNPARSED

    @property
    def text(self) -> str:
        """The body as text (UTF-8, invalid bytes replaced); ``""`` when absent."""
        if self._text is None:
            body = self._body
            if body is None:
                self._text = ""
            elif isinstance(body, str):
                self._text = body
            elif isinstance(body, (bytes, bytearray, memoryview)):
                self._text = bytes(body).decode("utf-8", "replace")
            else:
                self._text = str(body)
        return self._text

    @property
    def regex_text(self) -> str:
        """The leading part of the body that body regexes may scan."""
        text = self.text
        return text if len(text) <= MAX_REGEX_CHARS else text[:MAX_REGEX_CHARS]

    @property
    def json(self) -> Any:
        """The parsed body, or ``MISSING`` when it is not (complete) JSON."""
        if self._json is _UNPARSED:
            self._json = MISSING
            text = self.text
            if 0 < len(text) <= MAX_JSON_BYTES and text.lstrip()[:1] in _JSON_STARTS:
                try:
                    self._json = json.loads(text)
                except (ValueError, RecursionError):
                    pass
        return self._json


_UNPARSED: Any = object()
_JSON_STARTS = frozenset('{["-0123456789tfn')


def _lower_headers(headers: Any) -> dict[str, str]:
    if not headers:
        return {}
    try:
        items = headers.items()
    except AttributeError:
        return {}
    out: dict[str, str] = {}
    for key, value in items:
        out[str(key).lower()] = value if isinstance(value, str) else str(value)
    return out


# -- code and message sources -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JsonSource:
    """A scalar at a JSON pointer, optionally filtered by ``match`` and shaped by ``format``."""

    tokens: tuple[str, ...]
    match: re.Pattern[str] | None = None
    format: str | None = None  # "{}" is replaced by the value, e.g. "AADSTS{}"

    def extract(self, answer: Answer) -> str | None:
        doc = answer.json
        if doc is MISSING:
            return None
        value = resolve(doc, self.tokens)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return None
        text = str(value)
        if self.match is not None:
            m = self.match.search(text)
            if m is None:
                return None
            text = m.group(1) if m.re.groups else m.group(0)
        if not text:
            return None
        return self.format.replace("{}", text) if self.format else text


@dataclass(frozen=True, slots=True)
class BodySource:
    """A regex on the body text: group 1 if the pattern has groups, else the whole match."""

    pattern: re.Pattern[str]

    def extract(self, answer: Answer) -> str | None:
        m = self.pattern.search(answer.regex_text)
        if m is None:
            return None
        return (m.group(1) if self.pattern.groups else m.group(0)) or None


@dataclass(frozen=True, slots=True)
class HeaderSource:
    """A header value, or a regex group on it (e.g. ``error="..."`` in WWW-Authenticate)."""

    name: str  # lower-case
    pattern: re.Pattern[str] | None = None

    def extract(self, answer: Answer) -> str | None:
        value = answer.headers.get(self.name)
        if value is None or self.pattern is None:
            return value or None
        m = self.pattern.search(value)
        if m is None:
            return None
        return (m.group(1) if self.pattern.groups else m.group(0)) or None


@dataclass(frozen=True, slots=True)
class LiteralSource:
    """A fixed code, for answers whose provider gives none but the rule knows the meaning."""

    value: str

    def extract(self, answer: Answer) -> str | None:
        return self.value


Source = JsonSource | BodySource | HeaderSource | LiteralSource


def first_of(sources: tuple[Source, ...], answer: Answer) -> str | None:
    """The first value any source yields."""
    for source in sources:
        value = source.extract(answer)
        if value is not None:
            return value
    return None


# -- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule; every given condition must hold. Cheap conditions are checked first."""

    policy: str
    id: str
    failure_class: FailureClass
    statuses: frozenset[int] | None = None
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()
    json_equals: tuple[tuple[tuple[str, ...], tuple[Any, ...]], ...] = ()
    json_regex: tuple[tuple[tuple[str, ...], re.Pattern[str]], ...] = ()
    body: re.Pattern[str] | None = None
    code_in: frozenset[str] | None = None  # upper-cased
    own_code: tuple[Source, ...] = ()  # as written in the rule
    code: tuple[Source, ...] = ()  # effective: own, then the policy's, then the defaults'

    @property
    def name(self) -> str:
        return f"{self.policy}:{self.id}"

    def matches(self, answer: Answer) -> bool:
        if self.statuses is not None and answer.status not in self.statuses:
            return False
        for name, pattern in self.headers:
            value = answer.headers.get(name)
            if value is None or pattern.search(value) is None:
                return False
        if self.json_equals or self.json_regex:
            doc = answer.json
            if doc is MISSING:
                return False
            for tokens, expected in self.json_equals:
                if not _json_in(resolve(doc, tokens), expected):
                    return False
            for tokens, pattern in self.json_regex:
                value = resolve(doc, tokens)
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    return False
                if pattern.search(str(value)) is None:
                    return False
        if self.body is not None and self.body.search(answer.regex_text) is None:
            return False
        if self.code_in is not None:
            code = first_of(self.code, answer)
            if code is None or code.upper() not in self.code_in:
                return False
        return True


def _json_in(value: Any, expected: tuple[Any, ...]) -> bool:
    if value is MISSING:
        return False
    for e in expected:
        # bool is an int in Python; JSON keeps them apart, and so do we
        if e == value and (type(e) is type(value) or (_is_num(e) and _is_num(value))):
            return True
    return False


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# -- the classifier --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Classifier:
    """Ordered rules per phase (own first, then defaults) plus message sources."""

    policy: str
    api_call: tuple[Rule, ...]
    token_refresh: tuple[Rule, ...]
    message: tuple[Source, ...] = ()
    code: tuple[Source, ...] = ()  # the policy's default code sources (then the defaults')
    own_counts: tuple[tuple[Phase, int], ...] = ()  # rules the policy file itself declares
    # False: a 2xx API answer is ok without reading rules or body (the proxy streams it).
    # The token endpoint's answers are always read: the sidecar needs the token anyway.
    inspect_success_bodies: bool = True

    def rules(self, phase: Phase) -> tuple[Rule, ...]:
        return self.token_refresh if phase is Phase.TOKEN_REFRESH else self.api_call

    def classify(self, phase: Phase | str, status: int | None, headers: Any, body: Any) -> Verdict:
        """Classify one answer; see ``Policy.classify``. Never raises."""
        try:
            return self._classify(phase, status, headers, body)
        except Exception:  # noqa: BLE001 -- the hot path must always answer
            return Verdict(_by_status(status), rule=f"{self.policy}:error")

    def _classify(self, phase: Phase | str, status: int | None, headers: Any, body: Any) -> Verdict:
        ph = phase if isinstance(phase, Phase) else _PHASES.get(str(phase), Phase.API_CALL)
        if (
            not self.inspect_success_bodies
            and ph is Phase.API_CALL
            and isinstance(status, int)
            and 200 <= status < 300
        ):
            return Verdict(FailureClass.OK, rule=f"{self.policy}:success")
        answer = Answer(status, headers, body)
        for rule in self.rules(ph):
            if rule.matches(answer):
                if rule.failure_class is FailureClass.OK:
                    return Verdict(FailureClass.OK, rule=rule.name)
                return self._verdict(rule.failure_class, rule.code, rule.name, answer)
        cls = _by_status(answer.status)
        if cls is FailureClass.OK:
            return Verdict(cls)
        return self._verdict(cls, (), "default", answer)

    def _verdict(
        self, cls: FailureClass, code: tuple[Source, ...], rule: str, answer: Answer
    ) -> Verdict:
        return Verdict(
            failure_class=cls,
            provider_code=first_of(code, answer),
            retry_after=retry_after(answer),
            claims=claims(answer.headers.get("www-authenticate")),
            message=_first_line(first_of(self.message, answer)),
            rule=rule,
        )


def _by_status(status: Any) -> FailureClass:
    """Last resort when no rule matched (the oauth2 defaults normally catch everything)."""
    if not isinstance(status, int) or isinstance(status, bool):
        return FailureClass.TRANSIENT  # no answer at all
    if 200 <= status < 300:
        return FailureClass.OK
    if status == 401:
        return FailureClass.REFRESHABLE
    if status in (408, 429) or status >= 500:
        return FailureClass.TRANSIENT
    return FailureClass.PERMANENT


def _first_line(message: str | None) -> str | None:
    if not message:
        return None
    line = message.strip().splitlines()[0].strip() if message.strip() else ""
    return line[:MAX_MESSAGE_CHARS] or None


def retry_after(answer: Answer, now: float | None = None) -> float | None:
    """Seconds to wait before retrying, from headers or a Slack-style body; never negative."""
    headers = answer.headers
    value = headers.get("retry-after")
    if value is not None:
        parsed = parse_retry_after(value, now)
        if parsed is not None:
            return parsed
    if headers.get("x-ratelimit-remaining", "").strip() == "0":
        reset = _parse_reset(headers.get("x-ratelimit-reset"), now)
        if reset is not None:
            return reset
    doc = answer.json
    if isinstance(doc, dict):
        body_value = doc.get("retry_after")
        if isinstance(body_value, (int, float)) and not isinstance(body_value, bool):
            # A huge JSON int overflows float(); escaping, it would send the whole verdict
            # down the last-resort path and lose the class the rules found.
            try:
                seconds = float(body_value)
            except OverflowError:
                return None
            if seconds == seconds and seconds != float("inf"):  # not NaN / inf
                return max(0.0, seconds)
    return None


def parse_retry_after(value: str, now: float | None = None) -> float | None:
    """``Retry-After`` as delta-seconds or an HTTP-date (relative to ``now``), never negative."""
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds and seconds != float("inf") else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _parse_reset(value: str | None, now: float | None) -> float | None:
    if not value:
        return None
    try:
        reset = float(value.strip())
    except ValueError:
        return None
    if reset != reset or reset == float("inf"):
        return None
    if reset < 1e9:  # a delta in seconds, not an epoch (some APIs send it that way)
        return max(0.0, reset)
    current = time.time() if now is None else now
    return max(0.0, reset - current)


def claims(www_authenticate: str | None) -> str | None:
    """The decoded claims JSON of a claims challenge, or None if absent or undecodable."""
    if not www_authenticate or "claims" not in www_authenticate:
        return None
    m = _CLAIMS.search(www_authenticate)
    if m is None:
        return None
    raw = m.group(1).rstrip("=").replace("-", "+").replace("_", "/")
    try:
        decoded = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True).decode("utf-8")
        json.loads(decoded)
    except (binascii.Error, ValueError, RecursionError):
        return None
    return decoded
