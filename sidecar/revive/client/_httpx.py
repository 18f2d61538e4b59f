"""The httpx half of :class:`revive.client.ActionContext`; imported only when asked for.

httpx is optional for a worker: nothing imports this module until ``ctx.httpx_client()``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING, Any

import httpx
from yarl import URL

if TYPE_CHECKING:
    from revive.client.session import _Binding

__all__ = ["bound_client"]


class _ReviveAuth(httpx.Auth):
    """Adds the run capability and ``Revive-*`` headers; raises run-changing problems."""

    def __init__(self, binding: _Binding) -> None:
        self.binding = binding

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("revive binds only httpx.AsyncClient")
        yield request  # pragma: no cover - makes this a generator

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        binding = self.binding
        if not binding.targets_sidecar(URL(str(request.url))):
            yield request
            return
        for name, value in binding.defaults.items():
            request.headers.setdefault(name, value)
        request.headers.update(await binding.headers())
        response = yield request
        if binding.observe(response.status_code, response.headers.get("Content-Type"),
                           response.headers):
            await response.aread()
            try:
                body: Any = response.json()
            except ValueError:
                body = None
            exc = binding.problem(response.status_code, body)
            if exc is not None:
                raise exc


def bound_client(proxy_url: str, binding: _Binding, **kwargs: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` on ``proxy_url`` that sends through ``binding``."""
    return httpx.AsyncClient(base_url=proxy_url, auth=_ReviveAuth(binding), **kwargs)
