"""Choose each connection's ``CredentialSource`` once, at start-up, from its config."""

from __future__ import annotations

from typing import assert_never

import aiohttp

from revive.config import (
    Auth0SourceConfig,
    ConnectionConfig,
    FileGrantStoreConfig,
    NangoSourceConfig,
    OAuth2SourceConfig,
    Settings,
    StaticSourceConfig,
    VaultGrantStoreConfig,
    VaultSourceConfig,
)
from revive.sources.auth0 import Auth0Source
from revive.sources.nango import NangoSource
from revive.sources.vault import VaultSource
from revive.sources.base import CredentialSource, RefreshClassifier
from revive.sources.grants import GrantBackend, GrantStore
from revive.sources.oauth2 import OAuth2Source
from revive.sources.static import StaticSource
from revive.sources.vault_grants import VaultGrantStore

__all__ = ["build_source"]


def build_source(
    conn: ConnectionConfig,
    settings: Settings,
    classifier: RefreshClassifier,
    http: aiohttp.ClientSession,
    *,
    grants: GrantStore | None = None,
) -> CredentialSource:
    """Build the source ``conn.source`` names.

    Args:
        conn: the connection; ``conn.source`` picks the implementation.
        settings: for ``data_dir`` (where oauth2 grants are kept).
        classifier: the connection's policy, used on token-endpoint answers.
        http: the shared client session for token endpoints.
        grants: a file grant store to share between connections; one under ``data_dir``
            otherwise. Ignored by connections whose ``grant_store`` is Vault.

    Returns:
        A source, already started (an oauth2 keep-alive task); the caller owns it and must
        ``close()`` it. Must be called with the event loop running.
    """
    source = conn.source
    # Class patterns rather than ``match source.kind`` so the type checker narrows the config.
    match source:
        case StaticSourceConfig(kind="static"):
            return StaticSource(conn.id, source.tokens_file)
        case OAuth2SourceConfig(kind="oauth2"):
            backend: GrantBackend
            match source.grant_store:
                case VaultGrantStoreConfig(kind="vault"):
                    backend = VaultGrantStore(source.grant_store, http, owner=conn.id)
                case FileGrantStoreConfig(kind="file"):
                    backend = grants if grants is not None else GrantStore(settings.data_dir)
                case _:
                    assert_never(source.grant_store)
            oauth2 = OAuth2Source(conn.id, source, backend, classifier, http)
            oauth2.start()
            return oauth2
        case NangoSourceConfig(kind="nango"):
            return NangoSource(conn.id, source, http)
        case Auth0SourceConfig(kind="auth0"):
            return Auth0Source(conn.id, source, http)
        case VaultSourceConfig(kind="vault"):
            return VaultSource(conn.id, source, http)
        case _:
            assert_never(source)
