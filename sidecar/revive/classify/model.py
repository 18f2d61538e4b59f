"""The frozen policy model: what a loaded ``policies/<provider>.yaml`` becomes.

Everything here is built once by :mod:`revive.classify.loader` and then only read, so the hot
path (``Policy.classify`` on every upstream answer) never parses, compiles or allocates beyond
the one ``Verdict`` it returns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the classifier imports this module; only type-check the other way round
    from revive.classify.classifier import Classifier

KEY_PLACEHOLDER = "{idempotency_key}"
"""The one placeholder reconcile templates may use; replaced literally, never ``str.format``-ed
(Graph filters are full of braces)."""


class FailureClass(StrEnum):
    """What the sidecar does with an upstream answer (DESIGN §3)."""

    OK = "ok"
    REFRESHABLE = "refreshable"  # access token bad, grant alive: refresh once, retry once
    TRANSIENT = "transient"  # back off and retry (mutating only when provably safe)
    DEAD_GRANT = "dead_grant"  # only a human reconnect helps: open a recovery case
    PERMANENT = "permanent"  # pass the answer through


class Phase(StrEnum):
    """Which exchange produced the answer: rules differ between the API and the token endpoint."""

    API_CALL = "api_call"
    TOKEN_REFRESH = "token_refresh"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One classification of one upstream answer.

    Attributes:
        failure_class: what to do.
        provider_code: the most specific code the provider gave (``AADSTS700082``), if any.
        retry_after: seconds to wait (``Retry-After`` seconds or HTTP-date, an exhausted
            ``x-ratelimit-reset``, or a body ``retry_after``), never negative; None if absent.
        claims: decoded claims JSON of a ``WWW-Authenticate`` claims challenge (CAE), if any.
        message: the provider's human message, first line only, at most 300 characters.
        rule: ``"<policy>:<rule id>"`` that decided, kept as evidence.
    """

    failure_class: FailureClass
    provider_code: str | None = None
    retry_after: float | None = None
    claims: str | None = None
    message: str | None = None
    rule: str = "default"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the proxy retries transient answers for this provider."""

    attempts: int = 3
    base_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    honour_retry_after: bool = True
    max_retry_after_s: float = 30.0


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """A cheap authenticated request that proves a new grant works."""

    method: str
    path: str
    expect_status: tuple[int, ...] = (200,)


@dataclass(frozen=True, slots=True)
class JsonBodyStamp:
    """Append ``entry`` (with the key filled in) to the JSON array at ``pointer`` in the body.

    Missing intermediate objects and the array itself are created by whoever applies the stamp.
    """

    pointer: str
    entry: Any  # JSON value; strings may contain KEY_PLACEHOLDER

    def render_entry(self, idempotency_key: str) -> Any:
        """The entry to append, with every placeholder replaced by ``idempotency_key``."""
        return _render(self.entry, idempotency_key)


@dataclass(frozen=True, slots=True)
class HeaderStamp:
    """Send the key in request header ``name`` (``value`` is a template)."""

    name: str
    value: str = KEY_PLACEHOLDER

    def render_value(self, idempotency_key: str) -> str:
        """The header value for ``idempotency_key``."""
        return self.value.replace(KEY_PLACEHOLDER, idempotency_key)


Stamp = JsonBodyStamp | HeaderStamp


@dataclass(frozen=True, slots=True)
class Lookup:
    """A request that asks the provider whether a side effect carrying the key exists.

    The caller is responsible for escaping the key for the target syntax (e.g. OData quotes);
    the sidecar's own keys are URL- and quote-safe.
    """

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    found_pointer: str  # JSON pointer to an array that is non-empty when the effect exists
    attempts: int = 3
    interval_s: float = 0.5
    found_tokens: tuple[str, ...] = ()  # found_pointer, pre-split at load

    def render(self, idempotency_key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Path and query parameters for ``idempotency_key``."""
        return (
            self.path.replace(KEY_PLACEHOLDER, idempotency_key),
            tuple((k, v.replace(KEY_PLACEHOLDER, idempotency_key)) for k, v in self.query),
        )

    def found(self, answer: Any) -> bool:
        """Whether a parsed lookup answer shows the side effect (non-empty array at pointer)."""
        from revive.classify.pointer import resolve  # tiny module, no cycle; cold path

        value = resolve(answer, self.found_tokens)
        return isinstance(value, list) and len(value) > 0


@dataclass(frozen=True, slots=True)
class ReconcileRule:
    """How to tell, for one action path, whether an unknown outcome was committed (DESIGN §2)."""

    name: str
    method: str
    path: re.Pattern[str]
    stamp: Stamp
    lookup: Lookup
    committed_status: int = 200
    """What a replay answers for an action found committed by reconcile, whose own answer
    was never seen (Graph sendMail: 202 Accepted)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """One provider's loaded policy: classification, retry, side-effect and recovery facts.

    ``classifier`` holds the compiled rules (own rules first, then the oauth2 defaults);
    ``mutating_exceptions`` lists (method, path) pairs that are reads although their method is
    mutating (Slack reads are POSTs).
    """

    name: str
    file: str
    retry: RetryPolicy
    mutating_methods: frozenset[str]
    idempotency_header: str | None
    inspect_success_bodies: bool
    refresh_token_rotates: bool
    reconcile: tuple[ReconcileRule, ...]
    probe: ProbeSpec | None
    classifier: Classifier
    mutating_exceptions: tuple[tuple[str, re.Pattern[str]], ...] = ()

    def is_mutating(self, method: str, path: str) -> bool:
        """Whether a request may have a side effect, so it needs an action key and a ledger row."""
        m = method.upper()
        if m not in self.mutating_methods:
            return False
        return not any(em == m and rx.search(path) for em, rx in self.mutating_exceptions)

    def classify(
        self,
        phase: Phase | str,
        status: int | None,
        headers: Mapping[str, str],
        body: bytes | str | None,
    ) -> Verdict:
        """Classify one upstream answer. Never raises; always returns exactly one Verdict."""
        return self.classifier.classify(phase, status, headers, body)

    def reconcile_for(self, method: str, path: str) -> ReconcileRule | None:
        """The reconcile rule covering this request, if any (first match wins)."""
        m = method.upper()
        for rule in self.reconcile:
            if rule.method == m and rule.path.search(path):
                return rule
        return None


def _render(value: Any, key: str) -> Any:
    if isinstance(value, str):
        return value.replace(KEY_PLACEHOLDER, key)
    if isinstance(value, list):
        return [_render(v, key) for v in value]
    if isinstance(value, dict):
        return {k: _render(v, key) for k, v in value.items()}
    return value
