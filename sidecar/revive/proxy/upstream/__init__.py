"""The proxy's own HTTP/1.1 client for the hop to the provider (see ``client`` for why)."""

from revive.proxy.upstream.client import PoolStats, UpstreamClient
from revive.proxy.upstream.errors import BodyFailed, NoAnswer, NotSent, StaleConnection
from revive.proxy.upstream.response import UpstreamResponse
from revive.proxy.upstream.wire import InvalidHeader

__all__ = [
    "BodyFailed",
    "InvalidHeader",
    "NoAnswer",
    "NotSent",
    "PoolStats",
    "StaleConnection",
    "UpstreamClient",
    "UpstreamResponse",
]
