"""Retry delays: bounded exponential backoff with full jitter, overridden by ``Retry-After``."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = first retry).

    A provider's own ``Retry-After`` wins over our schedule: it knows its limits. Without one,
    full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads a fleet's
    retries instead of synchronising them.
    """
    if retry_after is not None:
        return max(0.0, retry_after)
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    return (rng or random).uniform(0, ceiling)
