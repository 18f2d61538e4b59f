"""Shared fixtures: a clean environment, a blocking-call guard, and real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Tests never inherit an operator's REVIVE_* settings (REVIVE_REQUIRE_* are CI switches)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("REVIVE_")}
    for key in saved:
        if not key.startswith("REVIVE_REQUIRE_"):
            del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("REVIVE_")]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster | None]:
    """Fail any test in which the event loop makes a blocking call (DESIGN §9)."""
    with blockbuster_ctx("revive") as bb:
        yield bb
