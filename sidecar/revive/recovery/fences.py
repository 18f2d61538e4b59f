"""Fence checks for non-mutating requests, served from memory (DESIGN §4, issue #6 item 3).

A GET must not pay a database round trip, but a worker left over from before a recovery
must still be refused. The cache holds each run's epoch and each connection's generation;
this sidecar's own changes invalidate it at once (the recovery service calls ``forget_*``),
and a short TTL bounds how long another sidecar's change can go unseen. A mismatch is
always re-read from the store before it refuses, so a stale cache never fences a good
request; it can only, for at most ``ttl`` seconds, let a request through that another
sidecar has just fenced — which is why mutating requests check in the claim's transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from revive.errors import Fenced
from revive.store import Store

_MAX_ENTRIES = 65536


class FenceCache:
    """Per-sidecar cache of current epochs and generations."""

    def __init__(
        self, store: Store, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._epochs: dict[str, tuple[int, float]] = {}
        self._generations: dict[str, tuple[int, float]] = {}

    async def check(self, run_id: str, epoch: int, connection_id: str, generation: int) -> None:
        """Refuse a request whose epoch or generation is not the current one.

        Raises:
            Fenced: the run is unknown, or its epoch or the connection's generation moved.
        """
        now = self._clock()
        cached_epoch = self._epochs.get(run_id)
        cached_gen = self._generations.get(connection_id)
        if (
            cached_epoch is not None
            and cached_gen is not None
            and cached_epoch[1] > now
            and cached_gen[1] > now
            and cached_epoch[0] == epoch
            and cached_gen[0] == generation
        ):
            return
        run = await self._store.get_run(run_id)
        conn = await self._store.get_connection(connection_id)
        if run is None or conn is None:
            raise Fenced("the run or connection is unknown; mint a run capability first")
        if len(self._epochs) >= _MAX_ENTRIES:
            self._epochs.clear()
        self._epochs[run_id] = (run.epoch, now + self._ttl)
        self._generations[connection_id] = (conn.generation, now + self._ttl)
        if run.epoch != epoch or conn.generation != generation:
            raise Fenced(
                "this capability is from before a recovery; the run continues elsewhere",
                run_id=run_id,
            )

    def forget_run(self, run_id: str) -> None:
        self._epochs.pop(run_id, None)

    def forget_connection(self, connection_id: str) -> None:
        self._generations.pop(connection_id, None)
