"""A scriptable OAuth 2.0 token endpoint, for what the fake Microsoft provider does not do.

``revive.lab.provider`` revokes a refresh token the moment it is rotated, the strictest
provider behaviour. Entra itself leaves the old refresh token valid until its own expiry
("Refresh tokens in the Microsoft identity platform",
https://learn.microsoft.com/entra/identity-platform/refresh-tokens), so two sidecars that
redeem the same token both succeed and then race to store their successors: ``lenient``
imitates that. ``down`` answers 503 ``temporarily_unavailable`` (RFC 6749 §5.2) to exercise
transient failures. Answers follow RFC 6749 §5.1/§5.2; ``forms`` logs every request.

    async with running_token_endpoint(FakeTokenEndpoint(valid={"rt-0"})) as endpoint:
        endpoint.url  # http://127.0.0.1:PORT/token
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["CLIENT_ID", "CLIENT_SECRET", "FakeTokenEndpoint", "running_token_endpoint"]

CLIENT_ID = "client-1"
CLIENT_SECRET = "secret-canary-7c21d0"


@dataclass
class FakeTokenEndpoint:
    """State and switches of one token endpoint.

    Attributes:
        url: ``http://127.0.0.1:PORT/token`` once started.
        valid: refresh tokens it accepts.
        rotate: answer each redemption with a new refresh token.
        lenient: keep a rotated-away refresh token valid (Entra); else revoke it.
        down: answer 503 ``temporarily_unavailable`` to everything.
        forms: every form received (refresh tokens included: test-only state).
        issued: access tokens issued so far.
    """

    url: str = ""
    valid: set[str] = field(default_factory=set)
    rotate: bool = True
    lenient: bool = False
    down: bool = False
    forms: list[dict[str, str]] = field(default_factory=list)
    issued: int = 0

    def __repr__(self) -> str:
        return f"<FakeTokenEndpoint url={self.url!r} issued={self.issued} down={self.down}>"

    @property
    def refreshes(self) -> list[str]:
        """The refresh tokens presented, in order."""
        return [f.get("refresh_token", "") for f in self.forms]

    async def handle(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.forms.append(form)
        if self.down:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return web.json_response({"error": "invalid_client"}, status=401)
        token = form.get("refresh_token", "")
        if form.get("grant_type") != "refresh_token" or token not in self.valid:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "refresh token not valid"},
                status=400,
            )
        self.issued += 1
        body: dict[str, object] = {
            "access_token": f"at-{self.issued:04d}",
            "token_type": "Bearer",
            "expires_in": 3600,
        }
        if self.rotate:
            new = f"rt-{self.issued:04d}"
            self.valid = (self.valid | {new}) if self.lenient else {new}
            body["refresh_token"] = new
        return web.json_response(body)


@asynccontextmanager
async def running_token_endpoint(
    endpoint: FakeTokenEndpoint | None = None,
) -> AsyncIterator[FakeTokenEndpoint]:
    """Serve ``endpoint`` at ``/token`` on 127.0.0.1, an ephemeral port; stop it on exit."""
    state = endpoint or FakeTokenEndpoint()
    app = web.Application()
    app.router.add_post("/token", state.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        state.url = f"http://{host}:{port}/token"
        yield state
    finally:
        await runner.cleanup()
