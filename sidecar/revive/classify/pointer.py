"""RFC 6901 JSON pointers, split once at load and resolved without allocation on the hot path."""

from __future__ import annotations

from typing import Any

_MISSING: Any = object()


def compile_pointer(pointer: str) -> tuple[str, ...]:
    """Split ``pointer`` into unescaped reference tokens.

    Raises:
        ValueError: the pointer is not ``""`` and does not start with ``/``, or has a ``~``
            not followed by ``0`` or ``1``.
    """
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise ValueError(f"JSON pointer {pointer!r} must be empty or start with '/'")
    tokens = []
    for raw in pointer[1:].split("/"):
        rest = raw.replace("~0", "").replace("~1", "")
        if "~" in rest:
            raise ValueError(f"JSON pointer {pointer!r} has a '~' not followed by 0 or 1")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tuple(tokens)


def resolve(document: Any, tokens: tuple[str, ...]) -> Any:
    """The value at ``tokens`` in ``document``, or ``MISSING``; never raises."""
    value = document
    for token in tokens:
        if isinstance(value, dict):
            value = value.get(token, _MISSING)
            if value is _MISSING:
                return _MISSING
        elif isinstance(value, list):
            # ASCII digits only, no leading zero, bounded: int() must not raise here
            if not (token.isascii() and token.isdigit()) or len(token) > 18:
                return _MISSING
            if len(token) > 1 and token[0] == "0":
                return _MISSING
            index = int(token)
            if index >= len(value):
                return _MISSING
            value = value[index]
        else:
            return _MISSING
    return value


MISSING: Any = _MISSING
"""Sentinel for "no value at this pointer" (distinct from JSON null)."""
