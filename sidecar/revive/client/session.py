"""What ``execute`` and ``reconcile`` receive: HTTP clients bound to the sidecar's proxy.

:class:`ActionContext` carries an aiohttp ``ClientSession`` (and, on demand, an
``httpx.AsyncClient``) whose base URL is ``{sidecar}/proxy/{connection_id}/`` and which adds
to every request it sends to the sidecar:

- ``Authorization: Bearer <run capability>`` — renewed through ``POST /v1/capabilities/renew``
  when it is within :data:`RENEW_MARGIN_S` of its expiry (re-minted for the same epoch if it
  already expired), so long actions never present a stale one;
- ``Revive-Action``, ``Revive-Checkpoint`` and ``Idempotency-Key`` — unless the request sets
  its own.

Requests to any other origin (an absolute URL, a redirect) pass untouched: the capability
never leaves for another host. Sidecar problems that change the run's course are raised as
typed exceptions from the request itself — :class:`RecoveryRequired` (424),
:class:`Fenced`, :class:`ReconcileRequired`, :class:`InFlight` (409),
:class:`OutcomeUnknown` (502), :class:`CapabilityInvalid` (401) — and also remembered, so
:func:`revive.client.protect_action` raises them even when an SDK swallowed the exception.
Provider answers (including a provider's own 4xx/5xx) are relayed unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from revive.client.errors import (
    CapabilityInvalid,
    Fenced,
    InFlight,
    OutcomeUnknown,
    ReconcileRequired,
    RecoveryRequired,
    SidecarProblem,
    problem_error,
)
from revive.client.sidecar import Redeemed, RunCapability, SidecarClient, is_problem

if TYPE_CHECKING:
    import httpx

__all__ = ["RENEW_MARGIN_S", "ActionContext", "CapabilityHolder", "ProblemWatch"]

RENEW_MARGIN_S = 60.0
"""A capability this close to its ``exp`` (seconds) is renewed before the next request."""

REPLAYED_HEADER = "Revive-Replayed"

_RAISED: tuple[type[SidecarProblem], ...] = (
    RecoveryRequired, Fenced, ReconcileRequired, InFlight, OutcomeUnknown, CapabilityInvalid,
)
_RAISED_TYPES = frozenset(cls.problem_type for cls in _RAISED)


@dataclass(eq=False)
class CapabilityHolder:
    """The run capability of one protected action, renewed as its expiry approaches.

    Args:
        api: the sidecar's worker routes.
        token: the current run capability.
        expires_at: its ``exp`` in unix seconds.
        epoch: the run epoch it names (renewal keeps it).
        run_id, connection_id, checkpoint_id, workflow: what to re-mint with when the
            capability expired before it could be renewed.
        clock: unix time, replaceable in tests.
    """

    api: SidecarClient
    token: str
    expires_at: int
    epoch: int
    run_id: str
    connection_id: str
    checkpoint_id: str
    workflow: str | None = None
    clock: Callable[[], float] = time.time
    renewals: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @classmethod
    def from_answer(
        cls, api: SidecarClient, answer: RunCapability | Redeemed, *, connection_id: str,
        checkpoint_id: str, workflow: str | None,
    ) -> CapabilityHolder:
        """A holder for a minted or redeemed capability."""
        return cls(api, answer.capability, answer.expires_at, answer.epoch, answer.run_id,
                   connection_id, checkpoint_id, workflow)

    async def current(self) -> str:
        """The capability to send now, renewed first when it is within the margin of expiry.

        Raises:
            Fenced: the run moved to a newer epoch (the sidecar refused renewal or minting).
            RecoveryRequired: the capability had expired and the run now has an open case.
        """
        if self.expires_at - self.clock() > RENEW_MARGIN_S:
            return self.token
        async with self._lock:
            if self.expires_at - self.clock() > RENEW_MARGIN_S:
                return self.token  # another request renewed it meanwhile
            try:
                answer = await self.api.renew(self.token)
            except CapabilityInvalid:
                # Expired before we got to it: the same epoch may mint again (fencing holds).
                answer = await self.api.mint(
                    self.run_id, connection_id=self.connection_id,
                    checkpoint_id=self.checkpoint_id, epoch=self.epoch, workflow=self.workflow,
                )
            self.token, self.expires_at, self.epoch = answer.capability, answer.expires_at, answer.epoch
            self.renewals += 1
            return self.token


@dataclass(eq=False)
class ProblemWatch:
    """What the bound clients saw: the first run-changing problem of each kind, and replays."""

    recovery: RecoveryRequired | None = None
    fenced: Fenced | None = None
    reconcile: ReconcileRequired | None = None
    replayed: bool = False

    def record(self, exc: SidecarProblem) -> None:
        """Remember ``exc`` if it is the first of its kind."""
        if isinstance(exc, RecoveryRequired) and self.recovery is None:
            self.recovery = exc
        elif isinstance(exc, Fenced) and self.fenced is None:
            self.fenced = exc
        elif isinstance(exc, ReconcileRequired) and self.reconcile is None:
            self.reconcile = exc

    def first(self) -> SidecarProblem | None:
        """The problem that decides the action's fate: recovery, then fenced, then reconcile."""
        return self.recovery or self.fenced or self.reconcile

    def reset(self) -> None:
        """Forget everything (before another attempt)."""
        self.recovery = self.fenced = self.reconcile = None
        self.replayed = False


@dataclass(eq=False)
class _Binding:
    """The sidecar-bound request rules shared by the aiohttp middleware and the httpx auth."""

    origin: URL
    prefix: str
    holder: CapabilityHolder
    defaults: dict[str, str]
    watch: ProblemWatch

    def targets_sidecar(self, url: URL) -> bool:
        if not url.absolute or url.origin() != self.origin:
            return False
        if not url.raw_path.startswith(self.prefix):
            raise ValueError(
                f"{url.path!r} is outside the proxy prefix {self.prefix!r}: pass a path "
                "relative to the bound base URL, without a leading '/' (e.g. 'v1.0/me')"
            )
        return True

    async def headers(self) -> dict[str, str]:
        """The headers to add (``Authorization`` always wins over the request's own)."""
        return {"Authorization": f"Bearer {await self.holder.current()}"}

    def observe(self, status: int, content_type: str | None, headers: Any) -> bool:
        """Note a replay; True when the answer may be a problem worth reading."""
        if str(headers.get(REPLAYED_HEADER, "")).lower() == "true":
            self.watch.replayed = True
        return status >= 400 and is_problem(content_type)

    def problem(self, status: int, body: Any) -> SidecarProblem | None:
        """The typed problem to raise for an answer, or None to relay it as it is."""
        if not isinstance(body, dict) or body.get("type") not in _RAISED_TYPES:
            return None  # e.g. a provider's own problem+json: the caller's business
        exc = problem_error(status, body)
        self.watch.record(exc)
        return exc


def _middleware(binding: _Binding) -> aiohttp.ClientMiddlewareType:
    async def bind(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        if not binding.targets_sidecar(req.url):
            return await handler(req)
        for name, value in binding.defaults.items():
            req.headers.setdefault(name, value)
        req.headers.update(await binding.headers())
        resp = await handler(req)
        if binding.observe(resp.status, resp.headers.get("Content-Type"), resp.headers):
            await resp.read()  # buffered: still readable by the caller if relayed
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            exc = binding.problem(resp.status, body)
            if exc is not None:
                resp.release()
                raise exc
        return resp

    return bind


@dataclass(eq=False)
class ActionContext:
    """What ``execute(ctx)`` and ``reconcile(ctx)`` receive; the worker holds no credential.

    Attributes:
        session: an aiohttp session with base URL ``{sidecar}/proxy/{connection_id}/`` that
            sends the run capability, ``Revive-Action``, ``Revive-Checkpoint`` and
            ``Idempotency-Key`` on every request to the sidecar. Use relative paths:
            ``ctx.session.post("v1.0/me/sendMail", json=...)``. Closed when
            ``protect_action`` returns.
        idempotency_key: the action's ledger key, the same across retries and resumes of
            this run's action (see :func:`revive.client.derive_idempotency_key`); also sent
            as ``Idempotency-Key``. Give it to a provider that deduplicates on its own.
        run_id, checkpoint_id, connection_id, action_key: what the action was protected with.
        proxy_url: the base URL of the bound clients (ends with ``/``).

    One protected action is one side effect: every mutating request it sends carries the same
    idempotency key, so a second, different mutating request through the same context is
    refused by the ledger (422 ``idempotency-mismatch``). Protect each side effect separately.
    """

    session: aiohttp.ClientSession
    idempotency_key: str
    run_id: str
    checkpoint_id: str
    connection_id: str
    action_key: str
    proxy_url: str
    _holder: CapabilityHolder = field(repr=False)
    _binding: _Binding = field(repr=False)
    _httpx: list[httpx.AsyncClient] = field(default_factory=list, repr=False)

    @property
    def epoch(self) -> int:
        """The run epoch this context acts under (the new one after a redemption)."""
        return self._holder.epoch

    @property
    def capability_expires_at(self) -> int:
        """When the current run capability expires, in unix seconds (renewal moves it)."""
        return self._holder.expires_at

    @property
    def watch(self) -> ProblemWatch:
        """What the bound clients have seen so far (problems, replays)."""
        return self._binding.watch

    async def capability(self) -> str:
        """The current run capability, renewed if due.

        For an SDK that insists on a bearer token of its own: pass it as the token and point
        the SDK at :attr:`proxy_url`. Prefer :attr:`session` or :meth:`httpx_client`, which
        renew it and add the ``Revive-*`` headers by themselves.

        Raises:
            Fenced: the run moved to a newer epoch.
        """
        return await self._holder.current()

    def httpx_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` bound like :attr:`session` (for SDKs built on httpx).

        Args:
            **kwargs: passed to ``httpx.AsyncClient`` (e.g. ``timeout``); ``base_url`` and
                ``auth`` are set here and may not be given.

        Returns:
            the client; it is closed when ``protect_action`` returns (closing it earlier, or
            using it as ``async with``, is fine).

        Raises:
            ImportError: httpx is not installed (``pip install httpx``).
            TypeError: ``base_url`` or ``auth`` was given.
        """
        from revive.client._httpx import bound_client

        for reserved in ("base_url", "auth"):
            if reserved in kwargs:
                raise TypeError(f"httpx_client() sets {reserved} itself")
        client = bound_client(self.proxy_url, self._binding, **kwargs)
        self._httpx.append(client)
        return client

    @classmethod
    def open(
        cls, *, sidecar_url: str, http: aiohttp.ClientSession, holder: CapabilityHolder,
        idempotency_key: str, action_key: str, checkpoint_id: str,
    ) -> ActionContext:
        """Bind clients to ``{sidecar_url}/proxy/{connection}/``; close with :meth:`aclose`.

        The aiohttp session shares ``http``'s connection pool (it does not own it) and keeps
        aiohttp's default timeout (the sidecar may retry upstream with backoff); pass
        ``timeout=`` per request to shorten it.
        """
        base = URL(sidecar_url.rstrip("/") + "/")
        proxy = base.join(URL(f"proxy/{_segment(holder.connection_id)}/"))
        binding = _Binding(
            origin=proxy.origin(), prefix=proxy.raw_path, holder=holder,
            defaults={"Revive-Action": action_key, "Revive-Checkpoint": checkpoint_id,
                      "Idempotency-Key": idempotency_key},
            watch=ProblemWatch(),
        )
        session = aiohttp.ClientSession(
            base_url=proxy, connector=http.connector, connector_owner=False,
            middlewares=(_middleware(binding),),
        )
        return cls(session, idempotency_key, holder.run_id, checkpoint_id,
                   holder.connection_id, action_key, str(proxy), holder, binding)

    async def aclose(self) -> None:
        """Close the bound clients (the shared connection pool stays open)."""
        for client in self._httpx:
            await client.aclose()
        self._httpx.clear()
        await self.session.close()


def _segment(value: str) -> str:
    return quote(value, safe="")
