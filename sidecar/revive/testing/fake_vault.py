"""A fake HashiCorp Vault (KV v2 + token and Kubernetes auth) over real HTTP, with switches.

Built from the public API documentation; request and answer shapes follow it:

* HTTP API overview, ``X-Vault-Token`` / ``X-Vault-Namespace`` headers, status codes (400
  invalid request, 403 permission denied, 404 not found, 412 standby not caught up, 429
  rate limited/standby, 5xx, 503 sealed) and the ``{"errors": [...]}`` error body:
  https://developer.hashicorp.com/vault/api-docs
* KV v2 read ``GET /v1/:mount/data/:path`` answering
  ``{"data": {"data": {...}, "metadata": {"version": n, ...}}, "lease_duration": 0, ...}``
  and create/update ``POST /v1/:mount/data/:path`` with ``{"options": {"cas": n}, "data": {}}``
  (check-and-set; ``cas`` 0 writes only a new key), answering ``{"data": {"version": n}}``:
  https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2
* Kubernetes auth ``POST /v1/auth/:mount/login`` ``{"role", "jwt"}`` answering
  ``{"auth": {"client_token", "accessor", "policies", "lease_duration", "renewable"}}``:
  https://developer.hashicorp.com/vault/api-docs/auth/kubernetes#login
* ``POST /v1/auth/token/renew-self`` (``{"increment"?}``) answering the same ``auth`` block:
  https://developer.hashicorp.com/vault/api-docs/auth/token#renew-a-token-self
* Check-and-set (``options.cas``, KV v2 API page above and ``-cas`` of
  https://developer.hashicorp.com/vault/docs/commands/kv/put): a write whose ``cas`` is not
  the latest version (soft-deleted versions count) is refused with 400
  ``{"errors": ["check-and-set parameter did not match the current version"]}``, the text
  shown in https://developer.hashicorp.com/vault/docs/secrets/kv/kv-v2/cookbook/patch-data.

Error texts are Vault's own ("permission denied", "Vault is sealed", "check-and-set parameter
did not match the current version"). The fake keeps a request log without header values.

    async with running_fake_vault() as vault:
        token = vault.issue_token()
        vault.put("secret", "conn/ms", {"access_token": "at-1"})
        vault.sealed = True
        vault.fail_writes.append(503)       # the next KV write fails, reads still work
        vault.writes                        # [VaultWrite(path, cas, status, version), ...]
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeVault", "VaultWrite", "running_fake_vault"]


@dataclass
class _Token:
    expires_at: float | None
    renewable: bool
    ttl: float
    policies: list[str] = field(default_factory=lambda: ["default"])


@dataclass
class _Version:
    data: dict[str, Any] | None
    created_time: str


@dataclass(frozen=True)
class VaultWrite:
    """One KV write as the fake answered it (the write log; no data, no header values).

    Attributes:
        path: ``/v1/{mount}/data/{path}``.
        cas: the ``options.cas`` sent, ``None`` for an unconditional write.
        status: the status answered (400 for a check-and-set mismatch).
        version: the version created, ``None`` when nothing was written.
    """

    path: str
    cas: int | None
    status: int
    version: int | None

    @property
    def cas_conflict(self) -> bool:
        """Whether Vault refused this write for a stale ``cas``."""
        return self.status == 400 and self.version is None and self.cas is not None


@dataclass
class FakeVault:
    """State and switches of one fake Vault server.

    Attributes:
        url: base address (``http://127.0.0.1:PORT``) once started.
        sealed: every ``/v1`` request answers 503 ``Vault is sealed``.
        fail_next: statuses to answer the next requests with (popped one per request).
        k8s_roles: Kubernetes auth role -> the service-account JWT it accepts.
        k8s_ttl / k8s_renewable: lease of tokens issued by the Kubernetes login.
        max_ttl: renew-self never extends a token past issue time + ``max_ttl``.
        namespace: if set, requests must carry this ``X-Vault-Namespace``.
        lease_duration: the top-level ``lease_duration`` on KV reads (KV v2 says 0).
        calls: ``(method, path, has_token)`` per request.
        writes: every KV write with its ``cas`` and outcome (:class:`VaultWrite`).
        fail_writes: statuses to answer the next KV writes with, not applying them (popped one
            per write; reads are unaffected), e.g. a Vault that became sealed mid-refresh.
        lose_write_answers: apply the next N KV writes, then answer 504 as a load balancer in
            front of a slow Vault does: the writer cannot know its write landed.
        clock: the fake's time, replaceable to expire tokens.
    """

    url: str = ""
    sealed: bool = False
    fail_next: list[int] = field(default_factory=list)
    k8s_mount: str = "kubernetes"
    k8s_roles: dict[str, str] = field(default_factory=dict)
    k8s_ttl: float = 3600.0
    k8s_renewable: bool = True
    max_ttl: float = 86400.0
    namespace: str | None = None
    lease_duration: int = 0
    calls: list[tuple[str, str, bool]] = field(default_factory=list)
    writes: list[VaultWrite] = field(default_factory=list)
    fail_writes: list[int] = field(default_factory=list)
    lose_write_answers: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    tokens: dict[str, _Token] = field(default_factory=dict)
    kv: dict[tuple[str, str], list[_Version]] = field(default_factory=dict)
    _issued_at: dict[str, float] = field(default_factory=dict)

    # -- control (direct, in-process) ---------------------------------------------------------

    def issue_token(self, ttl: float | None = None, renewable: bool = False) -> str:
        """Mint a token (``hvs.``-style); ``ttl`` None never expires."""
        token = "hvs." + secrets.token_urlsafe(24)
        now = self.clock()
        self.tokens[token] = _Token(
            expires_at=None if ttl is None else now + ttl, renewable=renewable, ttl=ttl or 0
        )
        self._issued_at[token] = now
        return token

    def revoke(self, token: str) -> None:
        self.tokens.pop(token, None)

    def put(self, mount: str, path: str, data: dict[str, Any]) -> int:
        """Write a new version unconditionally (an operator's ``vault kv put``)."""
        versions = self.kv.setdefault((mount, path), [])
        versions.append(_Version(dict(data), _iso(self.clock())))
        return len(versions)

    def delete_latest(self, mount: str, path: str) -> None:
        """Soft-delete the latest version (``vault kv delete``): reads answer 404."""
        self.kv[(mount, path)][-1].data = None

    def latest(self, mount: str, path: str) -> tuple[int, dict[str, Any] | None]:
        versions = self.kv.get((mount, path), [])
        return len(versions), versions[-1].data if versions else None

    # -- HTTP ----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/auth/token/renew-self", self._renew_self)
        app.router.add_post("/v1/auth/{mount:.+}/login", self._login)
        app.router.add_get("/v1/{mount:[^/]+}/data/{path:.+}", self._kv_read)
        app.router.add_post("/v1/{mount:[^/]+}/data/{path:.+}", self._kv_write)
        app.router.add_put("/v1/{mount:[^/]+}/data/{path:.+}", self._kv_write)
        return app

    def _gate(self, request: web.Request, *, auth: bool) -> web.Response | None:
        token = request.headers.get("X-Vault-Token")
        self.calls.append((request.method, request.path, token is not None))
        if self.sealed:
            return _errors(503, "Vault is sealed")
        if self.fail_next:
            status = self.fail_next.pop(0)
            return _errors(status, {503: "Vault is sealed"}.get(status, "internal error"))
        if self.namespace is not None and request.headers.get("X-Vault-Namespace") != (
            self.namespace
        ):
            return _errors(403, "permission denied")
        if auth:
            known = self.tokens.get(token or "")
            if known is None or (known.expires_at is not None and self.clock() >= known.expires_at):
                return _errors(403, "permission denied")
        return None

    async def _json(self, request: web.Request) -> dict[str, Any] | None:
        try:
            body = await request.json()
        except ValueError:
            return None
        if isinstance(body, dict):
            self.bodies.append({k: ("***" if k == "jwt" else v) for k, v in body.items()})
            return body
        return None

    async def _kv_read(self, request: web.Request) -> web.Response:
        if (denied := self._gate(request, auth=True)) is not None:
            return denied
        key = (request.match_info["mount"], request.match_info["path"])
        versions = self.kv.get(key)
        if not versions:
            return _errors(404)
        latest = versions[-1]
        metadata = {
            "created_time": latest.created_time,
            "custom_metadata": None,
            "deletion_time": "" if latest.data is not None else _iso(self.clock()),
            "destroyed": False,
            "version": len(versions),
        }
        if latest.data is None:
            # A soft-deleted latest version: 404 with data null and the metadata.
            return web.json_response(
                {"data": {"data": None, "metadata": metadata}}, status=404
            )
        return web.json_response(
            {
                "request_id": secrets.token_hex(8),
                "lease_id": "",
                "renewable": False,
                "lease_duration": self.lease_duration,
                "data": {"data": latest.data, "metadata": metadata},
                "wrap_info": None,
                "warnings": None,
                "auth": None,
            }
        )

    async def _kv_write(self, request: web.Request) -> web.Response:
        if (denied := self._gate(request, auth=True)) is not None:
            return denied
        body = await self._json(request)
        if body is None or not isinstance(body.get("data"), dict):
            return _errors(400, "no data provided")
        key = (request.match_info["mount"], request.match_info["path"])
        versions = self.kv.setdefault(key, [])
        options = body.get("options") or {}
        cas = options.get("cas") if isinstance(options, dict) else None
        cas = cas if isinstance(cas, int) else None
        if self.fail_writes:
            status = self.fail_writes.pop(0)
            self.writes.append(VaultWrite(request.path, cas, status, None))
            return _errors(status, {503: "Vault is sealed"}.get(status, "internal error"))
        if cas is not None and cas != len(versions):
            self.writes.append(VaultWrite(request.path, cas, 400, None))
            return _errors(400, "check-and-set parameter did not match the current version")
        versions.append(_Version(dict(body["data"]), _iso(self.clock())))
        if self.lose_write_answers:
            self.lose_write_answers -= 1
            self.writes.append(VaultWrite(request.path, cas, 504, len(versions)))
            return _errors(504, "gateway timeout")
        self.writes.append(VaultWrite(request.path, cas, 200, len(versions)))
        return web.json_response(
            {
                "data": {
                    "created_time": versions[-1].created_time,
                    "custom_metadata": None,
                    "deletion_time": "",
                    "destroyed": False,
                    "version": len(versions),
                }
            }
        )

    async def _login(self, request: web.Request) -> web.Response:
        if (denied := self._gate(request, auth=False)) is not None:
            return denied
        if request.match_info["mount"] != self.k8s_mount:
            return _errors(400, "unsupported path")
        body = await self._json(request)
        if body is None:
            return _errors(400, "missing role or jwt")
        role, jwt = body.get("role"), body.get("jwt")
        if not role or not jwt:
            return _errors(400, "missing role" if not role else "missing jwt")
        if role not in self.k8s_roles:
            return _errors(400, f'invalid role name "{role}"')
        if self.k8s_roles[role] != jwt:
            return _errors(403, "permission denied")
        token = self.issue_token(self.k8s_ttl, self.k8s_renewable)
        return web.json_response(self._auth_answer(token, {"role": role}))

    async def _renew_self(self, request: web.Request) -> web.Response:
        if (denied := self._gate(request, auth=True)) is not None:
            return denied
        token = request.headers["X-Vault-Token"]
        known = self.tokens[token]
        if not known.renewable:
            return _errors(400, "lease is not renewable")
        now = self.clock()
        ceiling = self._issued_at[token] + self.max_ttl
        known.expires_at = min(now + known.ttl, ceiling)
        return web.json_response(self._auth_answer(token, {}))

    def _auth_answer(self, token: str, metadata: dict[str, str]) -> dict[str, Any]:
        known = self.tokens[token]
        remaining = 0 if known.expires_at is None else max(0, known.expires_at - self.clock())
        return {
            "request_id": secrets.token_hex(8),
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": None,
            "wrap_info": None,
            "warnings": None,
            "auth": {
                "client_token": token,
                "accessor": secrets.token_urlsafe(12),
                "policies": known.policies,
                "token_policies": known.policies,
                "metadata": metadata,
                "lease_duration": int(remaining),
                "renewable": known.renewable,
                "entity_id": "",
                "token_type": "service",
                "orphan": True,
            },
        }


def _errors(status: int, *errors: str) -> web.Response:
    return web.json_response({"errors": list(errors)}, status=status)


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime(at))


@asynccontextmanager
async def running_fake_vault(vault: FakeVault | None = None) -> AsyncIterator[FakeVault]:
    """Serve ``vault`` (a new one by default) on 127.0.0.1, an ephemeral port."""
    state = vault or FakeVault()
    runner = web.AppRunner(state.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        state.url = f"http://{host}:{port}"
        yield state
    finally:
        await runner.cleanup()
