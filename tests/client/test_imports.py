"""The worker library imports nothing of the server and documents its public names."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys

import pytest

PROBE = (
    "import sys, revive.client; "
    "print(sorted(m for m in sys.modules if m.startswith('revive')))"
)
SERVER_ONLY = ("pyjwt", "jwt", "cryptography", "aiosqlite", "asyncpg", "prometheus_client",
               "yaml", "pydantic_settings", "uvloop")


async def test_revive_client_imports_nothing_server_side() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE + "; print(sorted(set(sys.modules) & set("
        + repr(SERVER_ONLY) + ")))",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    modules_line, server_line = out.decode().strip().splitlines()
    modules = eval(modules_line)  # a printed list of str
    assert modules, modules
    assert all(m == "revive" or m == "revive.client" or m.startswith("revive.client.")
               for m in modules), modules
    assert "revive.client._httpx" not in modules  # httpx stays optional
    assert eval(server_line) == []


@pytest.mark.parametrize("name", ["revive", "revive.client"])
def test_public_names_resolve_and_are_documented(name: str) -> None:
    module = importlib.import_module(name)
    for attr in module.__all__:
        value = getattr(module, attr)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name}.{attr} has no docstring"
