"""One way to talk to an OAuth token endpoint, shared by refresh and the connect flow.

Bounded reads, no redirects (a 307 would re-send a refresh token, code or secret to
wherever it points) and transport failures translated once, with the form never in text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import aiohttp

from revive.config import OAuth2SourceConfig
from revive.errors import CredentialUnavailable

MAX_ANSWER_BYTES = 256 * 1024


async def post_form(
    http: aiohttp.ClientSession, config: OAuth2SourceConfig, form: Mapping[str, str], host: str
) -> tuple[int, Mapping[str, str], bytes]:
    """POST ``form`` to ``config.token_url``; return status, headers and the bounded body.

    Raises:
        CredentialUnavailable: unreachable, timed out, or an answer over ``MAX_ANSWER_BYTES``.
    """
    return await post_bounded_form(
        http, config.token_url, form, timeout_seconds=config.token_timeout_seconds,
        what=f"token endpoint {host}",
    )


async def post_bounded_form(
    http: aiohttp.ClientSession, url: str, form: Mapping[str, str], *,
    timeout_seconds: float, what: str, code_prefix: str | None = None,
) -> tuple[int, Mapping[str, str], bytes]:
    """POST ``form`` to any token-issuing endpoint (OAuth, Auth0's token exchange).

    Args:
        what: how errors name the endpoint, e.g. ``token endpoint login.example``.
        code_prefix: when given, errors carry ``provider_code`` ``<prefix>_unreachable`` or
            ``<prefix>_answer_too_large``.

    Raises:
        CredentialUnavailable: unreachable, timed out, or an answer over ``MAX_ANSWER_BYTES``.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    try:
        async with http.post(
            url,
            data=dict(form),
            headers={"Accept": "application/json"},
            timeout=timeout,
            allow_redirects=False,
        ) as resp:
            body = bytearray()
            while len(body) <= MAX_ANSWER_BYTES:
                chunk = await resp.content.read(MAX_ANSWER_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise CredentialUnavailable(
                    f"{what} answered more than {MAX_ANSWER_BYTES} bytes",
                    provider_code=f"{code_prefix}_answer_too_large" if code_prefix else None,
                )
            return resp.status, resp.headers, bytes(body)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # aiohttp's text names host and port only; the form never enters it.
        raise CredentialUnavailable(
            f"{what} unreachable: {type(exc).__name__}",
            provider_code=f"{code_prefix}_unreachable" if code_prefix else None,
        ) from exc


def parse_answer(content_type: str, body: bytes) -> dict[str, Any]:
    """JSON, or the form encoding older GitHub-style endpoints still send."""
    text = body.decode("utf-8", errors="replace")
    if "x-www-form-urlencoded" in content_type.lower():
        return dict(parse_qsl(text))
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def number(value: object) -> float | None:
    """A positive finite number from a provider field; providers send "3599" as well."""
    if isinstance(value, bool):
        return None
    try:
        parsed = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return parsed if math.isfinite(parsed) and parsed > 0 else None
