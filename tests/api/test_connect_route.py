"""``GET /v1/connections/{id}/connect``: where the provider sends the authorization code back.

The ``redirect_uri`` decides who receives the code, so it never comes from the request's
``Host`` header (a forged Host would hand the code to a stranger's server): it is the
connection's configured ``redirect_uri``, else the callback under ``public_url``, else the
callback on the address the request really arrived at.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp

from revive.lab.settings import LAB_CONNECTION
from revive.testing.provider import running_provider
from revive.testing.sidecar import running_sidecar
from revive.testing.story import Story, granted_lab_settings

CALLBACK = f"/v1/connections/{LAB_CONNECTION}/callback"


def _redirect_uri(location: str) -> str:
    return parse_qs(urlsplit(location).query)["redirect_uri"][0]


async def _connect(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str] | None = None
) -> str:
    async with http.get(
        f"{base}/v1/connections/{LAB_CONNECTION}/connect", headers=headers,
        allow_redirects=False,
    ) as resp:
        assert resp.status == 302, await resp.text()
        return _redirect_uri(resp.headers["Location"])


async def test_a_forged_host_header_does_not_choose_the_redirect_uri(story: Story) -> None:
    honest = await _connect(story.http, story.sidecar.url)
    forged = await _connect(story.http, story.sidecar.url, {
        "Host": "evil.example", "X-Forwarded-Host": "evil.example",
        "Forwarded": "host=evil.example",
    })
    assert honest == forged == story.sidecar.url + CALLBACK


async def test_the_callback_follows_public_url_then_the_connection_setting(
    tmp_path: Path,
) -> None:
    async with running_provider() as provider:
        base = await granted_lab_settings(provider, tmp_path / "data")
        public = base.model_copy(update={"public_url": "https://revive.example.test/"})
        conn = base.connections[0]
        pinned_source = conn.source.model_copy(
            update={"redirect_uri": "https://registered.example.test/cb"}
        )
        pinned = public.model_copy(
            update={"connections": [conn.model_copy(update={"source": pinned_source})]}
        )
        async with aiohttp.ClientSession() as http:
            async with running_sidecar(public) as sidecar:
                got = await _connect(http, sidecar.url, {"Host": "evil.example"})
                assert got == "https://revive.example.test" + CALLBACK
            async with running_sidecar(pinned) as sidecar:
                got = await _connect(http, sidecar.url)
                assert got == "https://registered.example.test/cb"
