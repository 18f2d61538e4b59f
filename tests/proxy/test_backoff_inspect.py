"""Backoff honours Retry-After; classification reads are bounded even for gzip bombs."""

from __future__ import annotations

import gzip
import random

from revive.proxy.backoff import backoff_delay
from revive.proxy.inspect import inflate_for_classifier


def test_retry_after_wins() -> None:
    assert backoff_delay(1, base=0.2, cap=5, retry_after=3.0) == 3.0


def test_full_jitter_is_bounded_by_cap() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, base=0.2, cap=1.0, retry_after=None, rng=rng) for n in range(1, 20)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert max(delays) > 0.2  # it really grows past the base


def test_gzip_bomb_is_inflated_only_to_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024))
    out = inflate_for_classifier(bomb, "gzip", 64 * 1024)
    assert len(out) == 64 * 1024


def test_plain_and_unknown_encodings() -> None:
    assert inflate_for_classifier(b"x" * 10, None, 4) == b"xxxx"
    assert inflate_for_classifier(b"garbage", "gzip", 100) == b""
    assert inflate_for_classifier(b"\x00\x01", "br", 100) == b""
