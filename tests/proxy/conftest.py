"""Fixtures of the hostile-input suites (``test_hostile*.py``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from revive.testing.hostile import gzip_bomb
from revive.testing.hostile_rig import Rig, running_rig

BOMB_BYTES = 2 << 30


@pytest.fixture(scope="session")
def bomb() -> bytes:
    """A gzip body of 2 MiB that inflates to 2 GiB; built once, it takes half a second."""
    return gzip_bomb(BOMB_BYTES)


@pytest.fixture
async def rig(
    tmp_path: Path, bomb: bytes, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Rig]:
    """The rig; afterwards, whatever the test sent, no secret was received or logged."""
    caplog.set_level(logging.DEBUG)
    async with running_rig(tmp_path, bomb) as running:
        yield running
    running.assert_nothing_leaked(caplog.text)
