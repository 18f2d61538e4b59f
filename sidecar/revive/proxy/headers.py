"""Stage: decide which headers cross the sidecar, in each direction.

Going up, the worker's own credentials and Revive's control headers stop here and the
provider credential is injected; going down, hop-by-hop headers stop. ``traceparent`` and
every ordinary header pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)
# Never forwarded upstream: the worker's credential slot (it carries a run capability),
# Revive's own control headers, and proxy headers a worker could use to lie about origin.
_STRIP_UP = HOP_BY_HOP | {
    "host", "authorization", "cookie", "content-length", "forwarded", "x-forwarded-for",
    "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-real-ip",
    "revive-action", "revive-checkpoint", "idempotency-key",
}
_STRIP_DOWN = HOP_BY_HOP | {"content-length", "set-cookie"}


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("Connection", "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def upstream_headers(incoming: CIMultiDictProxy[str], token: str) -> CIMultiDict[str]:
    """Headers for the upstream request, with ``Authorization`` set to the provider token."""
    drop = _STRIP_UP | _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop and not name.lower().startswith("revive-"):
            out.add(name, value)
    out["Authorization"] = f"Bearer {token}"
    if "Accept-Encoding" not in out:
        # The client library would otherwise ask for gzip on the worker's behalf, and we
        # relay the provider's bytes undecoded: a worker that asked for nothing gets identity.
        out["Accept-Encoding"] = "identity"
    return out


def downstream_headers(upstream: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Headers for the answer to the worker: everything but hop-by-hop and cookies."""
    drop = _STRIP_DOWN | _connection_tokens(upstream)
    return [(k, v) for k, v in upstream.items() if k.lower() not in drop]
