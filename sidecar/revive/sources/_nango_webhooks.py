"""Verifying and reading the webhooks Nango POSTs to the sidecar (``POST /v1/webhooks/nango``).

Nango signs every webhook with ``X-Nango-Hmac-Sha256``: the lowercase hex HMAC-SHA256 of the raw
request body, keyed with the environment's webhook signing key (which, for older environments
and in Nango's own Node SDK, falls back to the secret key). A legacy ``X-Nango-Signature``
header (plain SHA-256 over key + body) is also sent; Nango's docs say it "should not be used",
and Nango's SDK refuses a request that carries only it, so it is ignored here too.

Sources (read 2026-11):
- https://nango.dev/docs/guides/platform/webhooks-from-nango (``Verifying webhooks from Nango``,
  ``Auth webhooks``: the ``auth`` payload, ``operation`` ∈ creation/override/refresh,
  ``success``, ``error.type``/``error.description``); repository copy
  ``NangoHQ/nango:docs/guides/platform/webhooks-from-nango.mdx``.
- ``NangoHQ/nango:packages/node-client/lib/index.unit.test.ts`` (``verifyIncomingWebhookRequest``:
  HMAC header only, case-insensitive header name, signing key falls back to the secret key).
- https://nango.dev/docs/guides/auth/token-refreshing (a connection that recovers after failed
  refreshes gets a follow-up ``auth`` webhook with ``"success": true``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

SIGNATURE_HEADER = "X-Nango-Hmac-Sha256"
"""The header Nango puts the body's HMAC-SHA256 (hex) in."""

LEGACY_SIGNATURE_HEADER = "X-Nango-Signature"
"""Nango's deprecated ``sha256(key + body)`` header: sent by Nango, never trusted here."""

AuthOperation = Literal["creation", "override", "refresh"]
_OPERATIONS: frozenset[str] = frozenset({"creation", "override", "refresh"})
_MAX_FIELD = 512  # bound every string taken from a webhook before it reaches logs or the store


def sign_nango_webhook(secret: bytes, body: bytes) -> str:
    """The ``X-Nango-Hmac-Sha256`` value Nango sends for ``body`` under ``secret``."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_nango_webhook(secret: bytes, body: bytes, headers: Mapping[str, str]) -> bool:
    """Whether ``headers`` carry Nango's valid signature of the raw ``body`` (constant time).

    Args:
        secret: the webhook signing key (``NangoSource.webhook_signing_key()``).
        body: the request body exactly as received, before any JSON parsing.
        headers: the request headers; the name is matched case-insensitively, so a plain
            ``dict`` works as well as aiohttp's ``CIMultiDictProxy``.

    Returns:
        ``False`` for an empty secret, a missing or malformed header, or a mismatch.
    """
    if not secret:
        return False
    given = _header(headers, SIGNATURE_HEADER)
    if given is None:
        return False
    given = given.strip().lower()
    if len(given) != 64:
        return False
    expected = sign_nango_webhook(secret, body)
    return hmac.compare_digest(given.encode("ascii", "replace"), expected.encode("ascii"))


@dataclass(frozen=True, slots=True)
class NangoAuthEvent:
    """One ``"type": "auth"`` webhook, reduced to what recovery needs.

    Attributes:
        connection_id: Nango's connection id (``connectionId``).
        provider_config_key: Nango's integration id (``providerConfigKey``).
        operation: ``creation`` (new connection), ``override`` (re-authorized) or ``refresh``
            (a refresh failed, or, with ``success``, the connection recovered).
        success: whether the operation succeeded.
        error_type: ``error.type`` when it failed (e.g. ``refresh_token_external_error``).
        error_description: ``error.description``, bounded; may quote the upstream's text.
        provider: Nango's provider key (``google``, ``microsoft``), if sent.
    """

    connection_id: str
    provider_config_key: str
    operation: AuthOperation
    success: bool
    error_type: str | None = None
    error_description: str | None = None
    provider: str | None = None

    @property
    def reconnected(self) -> bool:
        """The grant is usable again: a successful creation, override or recovery."""
        return self.success

    @property
    def at_risk(self) -> bool:
        """Nango reports a failure: mark the connection at risk, open nothing by itself."""
        return not self.success


def parse_auth_webhook(body: bytes | str) -> NangoAuthEvent | None:
    """Read an auth webhook; ``None`` for any other type or a malformed auth payload.

    Parse only after ``verify_nango_webhook`` accepted the body. Nango adds webhook types
    without notice, so an unknown ``type`` is ``None`` (acknowledge and ignore), never an error.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("type") != "auth":
        return None
    connection_id = _string(data.get("connectionId"))
    key = _string(data.get("providerConfigKey"))
    operation = data.get("operation")
    success = data.get("success")
    if connection_id is None or key is None or not isinstance(success, bool):
        return None
    if not isinstance(operation, str) or operation not in _OPERATIONS:
        return None
    error = data.get("error")
    error_type = error_description = None
    if isinstance(error, dict):
        error_type = _string(error.get("type"))
        error_description = _string(error.get("description"))
    return NangoAuthEvent(
        connection_id=connection_id,
        provider_config_key=key,
        operation=operation,  # type: ignore[arg-type]  # checked against _OPERATIONS above
        success=success,
        error_type=error_type,
        error_description=error_description,
        provider=_string(data.get("provider")),
    )


def _string(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value[:_MAX_FIELD]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None
