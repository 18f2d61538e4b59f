"""The bytes of a request head: request line, ``Host``, the headers, and how the body is framed."""

from __future__ import annotations

from collections.abc import Mapping

from yarl import URL

USER_AGENT = "revive-sidecar"
"""Sent when the worker named no client: some APIs (GitHub's) refuse a request without one."""

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""Methods whose empty body is still announced (``Content-Length: 0``); servers may want 411."""

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # the server side decoded the worker's header bytes this way


class InvalidHeader(ValueError):
    """A header name or value would break the request's framing (a line break or NUL)."""


def host_header(url: URL) -> str:
    """``Host`` for ``url``: brackets around an IPv6 literal, the port only when not the default."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if url.explicit_port is not None and not url.is_default_port():
        host = f"{host}:{url.port}"
    return host


def request_head(
    method: str, url: URL, headers: Mapping[str, str], body_length: int | None, streamed: bool
) -> bytes:
    """Serialize the head of one request.

    Args:
        body_length: the length of a buffered body, or None when there is none.
        streamed: the body is a stream of unknown length, sent ``Transfer-Encoding: chunked``.

    Raises:
        InvalidHeader: a name or value holds CR, LF or NUL (header injection).
    """
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {host_header(url)}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if "User-Agent" not in headers:
        lines.append(f"User-Agent: {USER_AGENT}")
    if "Accept" not in headers:
        lines.append("Accept: */*")
    if streamed:
        lines.append("Transfer-Encoding: chunked")
    elif body_length is not None:
        lines.append(f"Content-Length: {body_length}")
    elif method in BODY_METHODS:
        lines.append("Content-Length: 0")
    text = "\r\n".join(lines)
    # One scan of the whole head instead of one per header: a stray line break or NUL in any
    # name or value shows up as more separators than the lines we joined.
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1 or "\0" in text:
        raise InvalidHeader("a header name or value holds a line break or NUL")
    return (text + "\r\n\r\n").encode(_ENCODING, _ERRORS)


def chunk(data: bytes) -> bytes:
    """One piece of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
