"""Reconcile (DESIGN §2, §7, §8 "ready"): stamp the key on the way out, look for it afterwards.

Providers such as Microsoft Graph keep no idempotency key: ``POST /me/sendMail`` answers 202
with no body and no message id, so after a timeout or a dead grant nobody knows whether the
mail went out. The policy's ``reconcile`` rule closes that gap in two halves:

- :func:`stamp_request` writes the action's idempotency key into the outgoing request where the
  provider keeps it (a ``singleValueExtendedProperties`` entry, or a header);
- :meth:`Reconciler.lookup` later asks the provider whether a side effect carrying that key
  exists (a Sent Items ``$filter``), polling because Sent Items fills asynchronously.

Only a clean "no" from every poll is ``not_committed``: declaring a sent mail unsent makes the
resumed run send it twice, so every doubt ends as ``undetermined`` and is left to the worker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from revive.classify.model import HeaderStamp, JsonBodyStamp, ReconcileRule
from revive.classify.pointer import MISSING, compile_pointer, resolve
from revive.sources.base import CredentialSource, Lease

__all__ = ["ReconcileResult", "Reconciler", "odata_escape", "stamp_request"]

Outcome = Literal["committed", "not_committed", "undetermined"]
Sleep = Callable[[float], Awaitable[object]]

_IDENTITY_FIELDS = ("id", "name")  # extended-property ids, internetMessageHeaders names
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_QUERY_SAFE = "/:@!$'()*,;-._~"  # '+', '&', '=' and ' ' are escaped: they mean something there
_TRANSIENT = frozenset({408, 425, 429})


def stamp_request(
    rule: ReconcileRule,
    body: bytes | None,
    headers: CIMultiDict[str],
    idempotency_key: str,
) -> bytes | None:
    """Write ``idempotency_key`` into an outgoing request so the provider keeps it.

    Pure: no I/O, ``headers`` is the only thing changed in place.

    - :class:`HeaderStamp`: sets the header (replacing any value already there); the body is
      returned as is.
    - :class:`JsonBodyStamp`: appends the rendered entry to the array at the stamp's pointer,
      creating missing objects along the pointer and the array itself, and returns the body
      re-serialised compactly (``Content-Length`` in ``headers`` is updated if present). An
      entry with the same ``id`` (or ``name``; compared case-insensitively, as MAPI and header
      names are) is replaced in place, so a retry that stamps an already stamped body does not
      stamp twice.

    When the body cannot carry the stamp (absent, not JSON, not a JSON object, or something
    other than an object/array in the way along the pointer) the very same ``body`` object is
    returned unchanged: the caller decides whether to forward an unstampable request (it then
    cannot be reconciled) or refuse it. ``result is body`` tells the two apart.
    """
    stamp = rule.stamp
    if isinstance(stamp, HeaderStamp):
        headers[stamp.name] = stamp.render_value(idempotency_key)
        return body
    if not isinstance(stamp, JsonBodyStamp) or body is None:
        return body
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(document, dict):
        return body
    target = _container_at(document, compile_pointer(stamp.pointer))
    if target is None:
        return body
    _upsert(target, stamp.render_entry(idempotency_key))
    stamped = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if "Content-Length" in headers:
        headers["Content-Length"] = str(len(stamped))
    return stamped


def _container_at(document: dict[str, Any], tokens: tuple[str, ...]) -> list[Any] | None:
    """The array at ``tokens``, created (with missing parent objects) if absent; None if blocked."""
    if not tokens:
        return None  # the document itself is an object, never the array
    node: Any = document
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        if isinstance(node, dict):
            child = node.get(token, MISSING)
            if child is MISSING or child is None:
                child = [] if last else {}
                node[token] = child
        elif isinstance(node, list):
            child = resolve(node, (token,))
            if child is MISSING:
                return None  # no index to create in an array: the body is not what we expect
        else:
            return None
        node = child
    return node if isinstance(node, list) else None


def _upsert(entries: list[Any], entry: Any) -> None:
    """Replace the entry with the same identity (later duplicates are dropped), or append it."""
    ident = _identity(entry)
    matches = [
        i
        for i, old in enumerate(entries)
        if (ident is not None and _identity(old) == ident) or (ident is None and old == entry)
    ]
    if not matches:
        entries.append(entry)
        return
    entries[matches[0]] = entry
    for i in reversed(matches[1:]):
        del entries[i]


def _identity(entry: Any) -> tuple[str, str] | None:
    if isinstance(entry, dict):
        for name in _IDENTITY_FIELDS:
            value = entry.get(name)
            if isinstance(value, str):
                return name, value.casefold()
    return None


def odata_escape(value: str) -> str:
    """Escape ``value`` for an OData string literal (``'`` doubled): lookup templates quote it."""
    return value.replace("'", "''")


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """What a lookup concluded, and why.

    Attributes:
        outcome: ``committed`` (the provider shows the side effect), ``not_committed`` (every
            poll answered 2xx and none showed it) or ``undetermined`` (anything else).
        evidence: JSON-ready record for the ledger and the case's transition: the rule, the
            request asked (method, path, query; the key is not a secret), every status seen
            (an int, or the exception class name when no answer came), the number of polls,
            whether the lease was refreshed, and a ``reason``. Never a token.
    """

    outcome: Outcome
    evidence: dict[str, Any] = field(default_factory=dict)


class Reconciler:
    """Asks the provider, with the connection's credentials, whether a stamped action happened.

    Holds no state between lookups; one instance can serve every connection.

    Args:
        sleep: awaited between polls (tests inject a fake to run instantly and count polls).
        request_timeout_s: total time allowed for one lookup request.
        max_body_bytes: a larger answer is treated as unreadable rather than buffered.
    """

    def __init__(
        self,
        *,
        sleep: Sleep = asyncio.sleep,
        request_timeout_s: float = 10.0,
        max_body_bytes: int = 1 << 20,
    ) -> None:
        self._sleep = sleep
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._max_body = max_body_bytes

    async def lookup(
        self,
        rule: ReconcileRule,
        base_url: URL,
        source: CredentialSource,
        http: aiohttp.ClientSession,
        idempotency_key: str,
    ) -> ReconcileResult:
        """Poll ``rule.lookup`` up to ``attempts`` times, ``interval_s`` apart.

        Found on any poll → ``committed`` at once. Every poll answered 2xx without it →
        ``not_committed``. A 401 costs one ``source.refresh`` and an immediate retry (once per
        lookup: a second 401 means these credentials cannot ask, ``undetermined``). Transient
        trouble (5xx, 408/425/429, connection errors, timeouts, an unreadable 2xx body) uses up
        the poll and rules out ``not_committed``; another 4xx ends the lookup ``undetermined``
        because asking again would get the same refusal.

        Raises:
            revive.errors.DeadGrant, CredentialUnavailable, CredentialMisconfigured: from
                ``source.lease()`` or the refresh after a 401, unchanged: the case machinery
                must know that reconcile itself hit a dead grant.
        """
        lk = rule.lookup
        path, query = lk.render(odata_escape(idempotency_key))
        url = _lookup_url(base_url, path, query)
        statuses: list[int | str] = []
        evidence: dict[str, Any] = {
            "rule": rule.name,
            "request": {"method": lk.method, "path": path, "query": dict(query)},
            "statuses": statuses,
            "polls": 0,
            "refreshed": False,
        }

        def result(outcome: Outcome, reason: str) -> ReconcileResult:
            return ReconcileResult(outcome, {**evidence, "reason": reason})

        lease = await source.lease()
        clean = True  # every poll so far got a readable 2xx answer
        for poll in range(1, max(1, lk.attempts) + 1):
            if poll > 1:
                await self._sleep(lk.interval_s)
            evidence["polls"] = poll
            status, answer = await self._ask(http, lk.method, url, lease)
            statuses.append(status)
            if status == 401 and not evidence["refreshed"]:
                evidence["refreshed"] = True
                lease = await source.refresh(lease)
                status, answer = await self._ask(http, lk.method, url, lease)
                statuses.append(status)
            if isinstance(status, int) and 200 <= status < 300:
                listing = MISSING if answer is MISSING else resolve(answer, lk.found_tokens)
                if not isinstance(listing, list):
                    clean = False  # a 2xx we cannot read proves nothing either way
                elif lk.found(answer):
                    return result("committed", "found")
            elif status == 401:
                return result("undetermined", "unauthorized_after_refresh")
            elif isinstance(status, str) or status >= 500 or status in _TRANSIENT:
                clean = False
            else:
                return result("undetermined", "lookup_refused")
        if clean:
            return result("not_committed", "not_found")
        return result("undetermined", "no_clean_answer")

    async def _ask(
        self, http: aiohttp.ClientSession, method: str, url: URL, lease: Lease
    ) -> tuple[int | str, Any]:
        """One lookup request: (status or exception class name, parsed JSON or ``MISSING``)."""
        headers = {"Authorization": f"Bearer {lease.access_token}", "Accept": "application/json"}
        try:
            async with http.request(
                method, url, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                if not 200 <= resp.status < 300:
                    return resp.status, MISSING
                raw = await self._read_bounded(resp)
                if raw is None:
                    return resp.status, MISSING
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__, MISSING
        try:
            return resp.status, json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return resp.status, MISSING

    async def _read_bounded(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The body, or None if it exceeds ``max_body_bytes`` (never buffered past the bound)."""
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            total += len(chunk)
            if total > self._max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


def _lookup_url(base_url: URL, path: str, query: tuple[tuple[str, str], ...]) -> URL:
    """``base_url`` + path + query, spaces as ``%20``: OData servers need not read ``+`` as one.

    The path is appended to any path prefix of ``base_url`` (a connection may point at
    ``https://host/prefix``); the lookup's own host is never taken from the template.
    """
    prefix = base_url.raw_path.rstrip("/")
    raw_path = prefix + "/" + quote(path.lstrip("/"), safe=_PATH_SAFE)
    raw_query = "&".join(
        f"{quote(k, safe=_QUERY_SAFE)}={quote(v, safe=_QUERY_SAFE)}" for k, v in query
    )
    origin = str(base_url.origin())
    return URL(origin + raw_path + ("?" + raw_query if raw_query else ""), encoded=True)
