"""What crosses the sidecar: the worker's credential never goes up, hop-by-hop never goes on."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from revive.proxy.headers import downstream_headers, upstream_headers


def _h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_upstream_swaps_credential_and_strips_control_headers() -> None:
    incoming = _h(
        ("Authorization", "Bearer worker-capability"),
        ("Host", "127.0.0.1:8787"),
        ("Revive-Action", "send-briefing"),
        ("Revive-Checkpoint", "chk-1"),
        ("Idempotency-Key", "k1"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "1"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Forwarded", "for=10.0.0.1"),
        ("Transfer-Encoding", "chunked"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
    )
    out = upstream_headers(incoming, "provider-token")
    assert out.getall("Authorization") == ["Bearer provider-token"]
    for gone in ("Host", "Revive-Action", "Revive-Checkpoint", "Idempotency-Key", "Connection",
                 "X-Secret-Hop", "X-Forwarded-For", "Forwarded", "Transfer-Encoding"):
        assert gone not in out
    assert out["traceparent"].startswith("00-0af7")
    assert out["Content-Type"] == "application/json"


def test_downstream_strips_hop_by_hop_and_cookies() -> None:
    out = downstream_headers(
        _h(("Content-Type", "application/json"), ("Transfer-Encoding", "chunked"),
           ("Set-Cookie", "session=abc"), ("Keep-Alive", "timeout=5"), ("request-id", "r1"))
    )
    assert out == [("Content-Type", "application/json"), ("request-id", "r1")]
