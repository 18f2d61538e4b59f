"""Every public package lists its API in ``__all__`` and every listed name exists."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "revive.classify", "revive.sources", "revive.tokens", "revive.recovery", "revive.store",
    "revive.proxy.upstream",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_resolve(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    for attr in exported:
        assert hasattr(module, attr), f"{name}.{attr}"
