"""One place that scrubs secrets out of text bound for logs, evidence or exception messages.

Redaction is by value (the exact secrets a component knows) and by shape (bearer headers,
JWTs, token-like JSON fields), so that a token the sidecar never registered is still caught.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[redacted]"

_SHAPES = [
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    re.compile(
        r"(?i)(\"?(?:access_token|refresh_token|id_token|client_secret|code_verifier|"
        r"password|assertion)\"?\s*[=:]\s*\"?)([^\"&\s,}]{4,})"
    ),
]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Return ``text`` with every known secret and every token-shaped string masked."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    text = _SHAPES[0].sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _SHAPES[1].sub(MASK, text)
    return _SHAPES[2].sub(lambda m: m.group(1) + MASK, text)
