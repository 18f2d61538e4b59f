"""Credential sources: turn a connection into a provider access token (DESIGN §4).

``build_source`` picks one per connection at start-up; the proxy only sees ``CredentialSource``.
"""

from revive.sources.base import (
    TOKEN_REFRESH,
    CredentialSource,
    GrantRisk,
    Lease,
    RefreshClassifier,
    RefreshVerdict,
    ReportsGrantRisk,
)
from revive.sources.connect import ConnectFlow, ConnectResult, ConsentDenied
from revive.sources.factory import build_source
from revive.sources.grants import Grant, GrantBackend, GrantConflict, GrantStore, StoredGrant
from revive.sources.keep_alive import GrantKeeper
from revive.sources.oauth2 import OAuth2Source
from revive.sources.static import StaticSource
from revive.sources.vault_grants import VaultGrantStore

__all__ = [
    "TOKEN_REFRESH",
    "ConnectFlow",
    "ConnectResult",
    "ConsentDenied",
    "CredentialSource",
    "Grant",
    "GrantBackend",
    "GrantConflict",
    "GrantKeeper",
    "GrantRisk",
    "GrantStore",
    "Lease",
    "OAuth2Source",
    "RefreshClassifier",
    "RefreshVerdict",
    "ReportsGrantRisk",
    "StaticSource",
    "StoredGrant",
    "VaultGrantStore",
    "build_source",
]
