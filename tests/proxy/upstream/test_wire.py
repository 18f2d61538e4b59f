"""The request head is exactly the bytes a provider must see, and never carries an injection."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict
from yarl import URL

from revive.proxy.upstream.wire import (
    LAST_CHUNK,
    USER_AGENT,
    InvalidHeader,
    chunk,
    host_header,
    request_head,
)


def lines(head: bytes) -> list[str]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].decode().split("\r\n")


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://example.com/", "example.com"),
        ("http://example.com:80/", "example.com"),
        ("https://example.com:443/", "example.com"),
        ("http://example.com:8080/", "example.com:8080"),
        ("https://example.com:80/", "example.com:80"),
        ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
        ("http://[::1]:5000/", "[::1]:5000"),
        ("https://[2001:db8::1]/", "[2001:db8::1]"),
    ],
)
def test_host_names_the_port_only_when_not_the_default(url: str, host: str) -> None:
    assert host_header(URL(url)) == host


def test_get_head_has_request_line_host_and_defaults() -> None:
    """The target goes up exactly as encoded: the proxy relays the worker's raw path."""
    url = URL("http://h:81/a%20b/c%2Fd?x=1&y=%2F", encoded=True)
    assert lines(request_head("GET", url, {}, None, False)) == [
        "GET /a%20b/c%2Fd?x=1&y=%2F HTTP/1.1",
        "Host: h:81",
        f"User-Agent: {USER_AGENT}",
        "Accept: */*",
    ]


def test_a_url_without_path_asks_for_the_root() -> None:
    assert lines(request_head("GET", URL("http://h"), {}, None, False))[0] == "GET / HTTP/1.1"


def test_callers_user_agent_and_accept_are_kept_not_doubled() -> None:
    headers = CIMultiDict({"user-agent": "mine/1", "accept": "application/json"})
    got = lines(request_head("GET", URL("http://h/"), headers, None, False))
    assert [line for line in got if line.lower().startswith(("user-agent", "accept"))] == [
        "user-agent: mine/1",
        "accept: application/json",
    ]


def test_repeated_header_names_are_all_sent() -> None:
    headers = CIMultiDict([("X-A", "1"), ("X-A", "2")])
    got = lines(request_head("GET", URL("http://h/"), headers, None, False))
    assert [line for line in got if line.startswith("X-A")] == ["X-A: 1", "X-A: 2"]


@pytest.mark.parametrize(
    ("method", "length", "streamed", "framing"),
    [
        ("POST", 5, False, ["Content-Length: 5"]),
        ("POST", None, False, ["Content-Length: 0"]),
        ("PUT", None, False, ["Content-Length: 0"]),
        ("PATCH", None, False, ["Content-Length: 0"]),
        ("GET", None, False, []),
        ("DELETE", None, False, []),
        ("DELETE", 0, False, ["Content-Length: 0"]),
        ("POST", None, True, ["Transfer-Encoding: chunked"]),
    ],
)
def test_body_framing(method: str, length: int | None, streamed: bool, framing: list[str]) -> None:
    got = lines(request_head(method, URL("http://h/"), {}, length, streamed))
    assert [line for line in got if line.startswith(("Content-Length", "Transfer-"))] == framing


@pytest.mark.parametrize(
    "headers",
    [
        {"X-A": "v\r\nX-Injected: 1"},
        {"X-A": "v\nX-Injected: 1"},
        {"X-A": "v\rX-Injected: 1"},
        {"X-A": "v\0"},
        {"X-A\r\nX-Injected": "1"},
        {"X-A\0": "1"},
        {"X-A": "\r\n"},
    ],
)
def test_line_breaks_and_nul_in_a_header_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(InvalidHeader):
        request_head("GET", URL("http://h/"), headers, None, False)


def test_a_refused_header_is_a_value_error() -> None:
    """Callers that only know ``ValueError`` still catch it."""
    assert issubclass(InvalidHeader, ValueError)


def test_undecodable_worker_bytes_round_trip() -> None:
    """Header bytes the server side decoded with surrogateescape go up unchanged."""
    value = b"caf\xe9".decode("utf-8", "surrogateescape")
    head = request_head("GET", URL("http://h/"), {"X-Raw": value}, None, False)
    assert b"X-Raw: caf\xe9\r\n" in head


def test_chunk_framing() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"
