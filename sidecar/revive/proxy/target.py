"""Stage 1: turn ``/proxy/{connection}/{tail}`` into one upstream URL, or refuse.

The tail is joined onto the connection's ``base_url`` as a *path* (never by string
concatenation), and refused outright when it tries to be anything else: an absolute URL,
an authority (``//host``, ``user@host``), a traversal (``..``, however often it is
percent-encoded), or a control character. The result must still be on an allowed host.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote

from yarl import URL

from revive.errors import BadTarget, HostNotAllowed

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_DECODE_ROUNDS = 4


def split_raw_path(raw_path: str) -> tuple[str, str, str]:
    """Split a raw request target into (connection id, raw tail, raw query), undecoded."""
    path, _, query = raw_path.partition("?")
    if not path.startswith("/proxy/"):
        raise BadTarget("not a proxy path")
    connection, _, tail = path[len("/proxy/") :].partition("/")
    return unquote(connection), tail, query


def _decoded_forms(tail: str) -> list[str]:
    forms = [tail]
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            return forms
        forms.append(decoded)
    raise BadTarget("path is percent-encoded too many times")


def check_tail(tail: str) -> None:
    """Refuse tails that could leave the base URL's host or path.

    Raises:
        BadTarget: with a reason that names the trick, never echoing a credential.
    """
    for form in _decoded_forms(tail):
        if _FORBIDDEN.search(form):
            raise BadTarget("control character or backslash in the path")
        if form.startswith("/"):
            raise BadTarget("the path may not start with '/' (authority form)")
        if _SCHEME.match(form):
            raise BadTarget("absolute URLs are not allowed in the path")
        first = form.split("/", 1)[0]
        if "@" in first:
            raise BadTarget("userinfo ('user@host') is not allowed at the start of the path")
        if any(seg in (".", "..") for seg in form.split("/")):
            raise BadTarget("'.' and '..' path segments are not allowed")


@lru_cache(maxsize=4096)
def upstream_url(base: URL, tail: str, query: str) -> URL:
    """Join ``tail`` (raw, percent-encoded as the worker sent it) and ``query`` onto ``base``.

    Cached: workers poll the same few paths, and a refusal (an exception) is never cached.
    """
    check_tail(tail)
    base_path = base.raw_path.rstrip("/")
    return URL.build(
        scheme=base.scheme,
        host=base.raw_host or "",
        port=base.explicit_port,
        path=f"{base_path}/{tail}",
        query_string=query,
        encoded=True,
    )


def check_redirect(location: str, current: URL, allowed_hosts: frozenset[str]) -> URL:
    """Resolve a redirect target and insist it stays on an allowed http(s) host.

    Raises:
        HostNotAllowed: for any other scheme or host (``file:``, metadata IPs, elsewhere).
    """
    try:
        resolved = current.join(URL(location))
    except ValueError as exc:
        raise HostNotAllowed("the upstream redirected to an unparseable location") from exc
    host = (resolved.host or "").lower().rstrip(".")
    if resolved.scheme not in ("http", "https") or host not in allowed_hosts:
        raise HostNotAllowed(
            "the upstream redirected outside the allow-list; the redirect was not followed",
            redirect_host=host or None,
        )
    return resolved
