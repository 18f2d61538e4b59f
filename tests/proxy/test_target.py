"""Stage 1 refuses every path trick that could move a request off its upstream."""

from __future__ import annotations

import pytest
from yarl import URL

from revive.errors import BadTarget, HostNotAllowed
from revive.proxy.target import check_redirect, split_raw_path, upstream_url

BASE = URL("https://graph.microsoft.com")


@pytest.mark.parametrize(
    ("tail", "query", "expected"),
    [
        ("v1.0/me", "", "https://graph.microsoft.com/v1.0/me"),
        ("v1.0/me/events", "$top=5&$select=subject", "https://graph.microsoft.com/v1.0/me/events?$top=5&$select=subject"),
        ("v1.0/users/alice@contoso.com/messages", "", "https://graph.microsoft.com/v1.0/users/alice@contoso.com/messages"),
        ("files/a%20b.txt", "", "https://graph.microsoft.com/files/a%20b.txt"),
        ("", "", "https://graph.microsoft.com/"),
    ],
)
def test_tail_joins_onto_base(tail: str, query: str, expected: str) -> None:
    assert str(upstream_url(BASE, tail, query)) == expected


def test_base_path_is_kept() -> None:
    base = URL("https://api.example.com/v2/")
    assert str(upstream_url(base, "items/1", "")) == "https://api.example.com/v2/items/1"


@pytest.mark.parametrize(
    "tail",
    [
        "../etc/passwd",
        "v1.0/../../admin",
        "..%2fadmin",
        "v1.0/%2e%2e/%2e%2e/admin",
        "%252e%252e%252fadmin",  # double encoding
        "%25252e%25252e/x",  # triple encoding
        "http://evil.example/x",
        "https:%2f%2fevil.example",
        "//evil.example/x",
        "%2f%2fevil.example/x",
        "user@evil.example/x",
        "@evil.example/x",
        "v1.0/me%0d%0aX-Injected:%201",
        "v1.0/me%00",
        "v1.0\\..\\admin",
        "./v1.0/me",
    ],
)
def test_hostile_tails_are_refused(tail: str) -> None:
    with pytest.raises(BadTarget):
        upstream_url(BASE, tail, "")


def test_split_raw_path_keeps_tail_encoded() -> None:
    assert split_raw_path("/proxy/conn_a/v1.0/me%2Fx?a=%20b") == ("conn_a", "v1.0/me%2Fx", "a=%20b")


@pytest.mark.parametrize(
    "location",
    [
        "https://evil.example/steal",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "//evil.example/x",
    ],
)
def test_redirects_off_the_allow_list_are_refused(location: str) -> None:
    with pytest.raises(HostNotAllowed):
        check_redirect(location, URL("https://graph.microsoft.com/v1.0/me"), frozenset({"graph.microsoft.com"}))


def test_redirect_on_the_allow_list_resolves() -> None:
    got = check_redirect("/v1.0/me/photo", URL("https://graph.microsoft.com/v1.0/me"), frozenset({"graph.microsoft.com"}))
    assert str(got) == "https://graph.microsoft.com/v1.0/me/photo"
