"""The admin token: created once, private, compared in constant time, never shown."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from revive.api.auth import AdminAuth
from revive.errors import ConfigError, Unauthorized

TOKEN = "a-perfectly-good-admin-token-42"


async def test_creates_a_private_token_file(tmp_path: Path) -> None:
    path = tmp_path / "data" / "admin-token"
    auth = await AdminAuth.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert len(token) >= 43  # token_urlsafe(32)
    auth.check(make_mocked_request("GET", "/", headers={"Authorization": f"Bearer {token}"}))
    assert [p.name for p in path.parent.iterdir()] == ["admin-token"]  # no temp file left


async def test_reads_the_same_token_back(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    await AdminAuth.load_or_create(path)
    token = path.read_text().strip()
    again = await AdminAuth.load_or_create(path)
    assert path.read_text().strip() == token
    again.check(make_mocked_request("GET", "/", headers={"Authorization": f"Bearer {token}"}))


async def test_uses_an_existing_token_and_tightens_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o644)
    auth = await AdminAuth.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    auth.check(make_mocked_request("GET", "/", headers={"Authorization": f"Bearer {TOKEN}"}))


@pytest.mark.parametrize("content", ["", "short", "has space inside it ok"])
async def test_unusable_token_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "admin-token"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        await AdminAuth.load_or_create(path)
    assert info.value.source == str(path)
    if content:
        assert content not in info.value.reason


async def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError):
        await AdminAuth.load_or_create(blocker / "admin-token")


def test_repr_hides_the_token() -> None:
    auth = AdminAuth(TOKEN)
    assert TOKEN not in repr(auth)
    assert TOKEN not in str(auth)


@pytest.mark.parametrize("token", ["", "too-short", "with whitespace in the middle"])
def test_rejects_weak_tokens(token: str) -> None:
    with pytest.raises(ValueError):
        AdminAuth(token)


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} "])
def test_check_accepts_the_token(header: str) -> None:
    AdminAuth(TOKEN).check(make_mocked_request("GET", "/", headers={"Authorization": header}))


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
     "Bearer \u00e9t\u00e9", f"{TOKEN}"],
)
def test_check_refuses(header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    with pytest.raises(Unauthorized) as info:
        AdminAuth(TOKEN).check(make_mocked_request("GET", "/", headers=headers))
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value.to_problem())
