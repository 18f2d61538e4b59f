"""Stage: read just enough of an answer to classify it, bounded in bytes *and* inflation.

Error answers are small; a hostile or broken upstream may still send a huge or gzip-bomb
body. We read at most ``limit`` bytes off the wire and inflate at most ``limit`` bytes for
the classifier, while the worker still gets the provider's original (compressed) bytes.
"""

from __future__ import annotations

import zlib

from revive.proxy.upstream import UpstreamResponse


async def read_prefix(resp: UpstreamResponse, limit: int) -> tuple[bytes, bool]:
    """Read the body until its end or past ``limit`` bytes; return it and whether it ended.

    Past the limit, what was read is at most one network read longer than ``limit``.

    Raises:
        NoAnswer: the answer broke off.
    """
    if resp.content_length is not None and resp.content_length <= limit:
        return await resp.read(), True
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await resp.readany()
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def inflate_for_classifier(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body the classifier sees: decompressed when needed, never more than ``limit``."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return raw[:limit]
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if encoding != "deflate" else 15  # 47: auto-detect gzip/zlib headers
        try:
            return zlib.decompressobj(wbits).decompress(raw, limit)
        except zlib.error:
            try:  # raw deflate, as some servers send for "deflate"
                return zlib.decompressobj(-15).decompress(raw, limit)
            except zlib.error:
                return b""
    return b""  # br/zstd/unknown: classify on status and headers alone
