"""How many mutating requests can the store's action ledger carry?

Every mutating request through the sidecar costs the store one ``claim`` and one ``finish``
(DESIGN §7), so this bench measures claim+finish *pairs* per second and the latency of one pair.
Each writer mints its run once (``mint_check``), then loops: ``claim`` a fresh idempotency key,
``finish`` it as ``committed`` with a small stored answer. Cases: 1 and 16 concurrent writers,
each on a fresh store in a temporary directory, after a short warm-up, for a fixed duration.

    .venv/bin/python bench/store.py [--quick] [--duration S] [--loop uvloop|asyncio] [--json-only]

Output: a table on stdout (pairs/s, p50/p99 of a pair in ms, commits and mean batch size when
the backend reports them), then, last on stdout, one JSON line::

    {"sqlite": {"c1": {"pairs_per_s": ..., "p50_ms": ..., "p99_ms": ...}, "c16": {...}},
     "postgres": null}

``postgres`` is measured the same way when ``--postgres-url`` (default: the machine's server,
``postgresql://postgres@127.0.0.1:5432/test``) answers, each case on a fresh schema dropped
afterwards; it stays ``null`` when the server is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sidecar"))

import asyncpg  # noqa: E402

from revive.store import ClaimRequest, SqliteStore, Store  # noqa: E402
from revive.store.postgres import PostgresStore  # noqa: E402

CONCURRENCY = {"c1": 1, "c16": 16}
OWNER = "bench-sidecar"
CONNECTION = "conn_bench"
RESPONSE = json.dumps({"id": "obj_000001", "status": "created", "amount": 1200})


def say(message: str) -> None:
    """Progress goes to stderr so stdout stays the table and the JSON line."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Result:
    pairs: int
    seconds: float
    p50_ms: float
    p99_ms: float
    commits: int | None
    operations: int | None

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, float]:
        return {
            "pairs_per_s": round(self.pairs_per_s, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@asynccontextmanager
async def open_sqlite(directory: Path) -> AsyncIterator[Store]:
    async with SqliteStore.open(directory / "revive.db") as store:
        yield store


def open_postgres(url: str) -> Callable[[Path], Any]:
    """An opener of a store on a fresh schema of ``url``, dropped when the store closes."""

    @asynccontextmanager
    async def opener(_: Path) -> AsyncIterator[Store]:
        schema = f"revive_bench_{uuid.uuid4().hex[:12]}"
        try:
            async with PostgresStore.open(url, schema=schema, pool_size=16) as store:
                yield store
        finally:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

    return opener


async def postgres_reachable(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        say(f"postgres: skipped, {url} unreachable ({type(exc).__name__}: {exc})")
        return False
    await conn.close()
    return True


async def writer(store: Store, index: int, deadline: float, latencies: list[float]) -> None:
    """One client: mint its run once, then claim → finish fresh keys until ``deadline``."""
    run_id = f"run_{index}_{uuid.uuid4().hex[:8]}"
    await store.mint_check(run_id, 1, "bench")
    prefix = uuid.uuid4().hex[:12]
    n = 0
    clock = time.perf_counter
    while clock() < deadline:
        n += 1
        key = f"{prefix}_{n}"
        started = clock()
        outcome = await store.claim(ClaimRequest(
            idempotency_key=key, run_id=run_id, action_key=f"act_{n}", checkpoint_id="chk",
            connection_id=CONNECTION, fingerprint="fp", owner=OWNER, epoch=1, generation=1,
        ))
        if outcome.kind != "claimed":
            raise RuntimeError(f"claim of a fresh key gave {outcome.kind}")
        await store.finish(key, OWNER, "committed", 201, RESPONSE)
        latencies.append(clock() - started)


async def measure(
    opener: Callable[[Path], Any], writers: int, duration: float, warmup: float
) -> Result:
    """Load a fresh store with ``writers`` concurrent clients; warm up first, then measure."""
    with tempfile.TemporaryDirectory(prefix="revive-bench-store-") as tmp:
        async with opener(Path(tmp)) as store:
            await store.ensure_connection(CONNECTION)
            if warmup > 0:
                await asyncio.gather(*(
                    writer(store, i, time.perf_counter() + warmup, []) for i in range(writers)
                ))
            stats = getattr(store, "stats", None)
            commits0 = getattr(stats, "commits", None)
            operations0 = getattr(stats, "operations", None)
            latencies: list[float] = []
            started = time.perf_counter()
            await asyncio.gather(*(
                writer(store, i, started + duration, latencies) for i in range(writers)
            ))
            elapsed = time.perf_counter() - started
            commits = operations = None
            if commits0 is not None and operations0 is not None:
                commits = getattr(stats, "commits") - commits0
                operations = getattr(stats, "operations") - operations0
    latencies.sort()
    return Result(
        pairs=len(latencies), seconds=elapsed,
        p50_ms=percentile(latencies, 50) * 1000, p99_ms=percentile(latencies, 99) * 1000,
        commits=commits, operations=operations,
    )


def table(results: dict[str, dict[str, Result]]) -> str:
    lines = [
        f"{'backend':<9} {'case':<5} {'pairs/s':>10} {'p50 ms':>9} {'p99 ms':>9}"
        f" {'commits':>9} {'ops/commit':>10}",
    ]
    for backend, cases in results.items():
        for case, r in cases.items():
            per_commit = (
                f"{r.operations / r.commits:10.1f}" if r.commits and r.operations else f"{'-':>10}"
            )
            commits = f"{r.commits:9d}" if r.commits is not None else f"{'-':>9}"
            lines.append(
                f"{backend:<9} {case:<5} {r.pairs_per_s:10.0f} {r.p50_ms:9.3f} {r.p99_ms:9.3f}"
                f" {commits} {per_commit}"
            )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, dict[str, Result]]:
    results: dict[str, dict[str, Result]] = {"sqlite": {}}
    for case, writers in CONCURRENCY.items():
        say(f"sqlite {case}: {writers} writer(s), {args.warmup:g} s warm-up,"
            f" {args.duration:g} s measured")
        results["sqlite"][case] = await measure(open_sqlite, writers, args.duration, args.warmup)
    if await postgres_reachable(args.postgres_url):
        results["postgres"] = {}
        for case, writers in CONCURRENCY.items():
            say(f"postgres {case}: {writers} writer(s), {args.warmup:g} s warm-up,"
                f" {args.duration:g} s measured")
            results["postgres"][case] = await measure(
                open_postgres(args.postgres_url), writers, args.duration, args.warmup
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short runs (noisier)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds measured per case (default 5, --quick 1.5)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of warm-up per case (default 1, --quick 0.3)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (default uvloop, as `revive serve` uses)")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test",
                        help="PostgreSQL server to measure (a fresh schema per case)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 1.5 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0

    loop_factory = None
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            say("uvloop is not installed; using the default asyncio loop")
        else:
            loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(run(args))
    except KeyboardInterrupt:
        return 130
    if not args.json_only:
        print(table(results))
    summary: dict[str, Any] = {
        backend: {case: r.as_json() for case, r in cases.items()}
        for backend, cases in results.items()
    }
    summary.setdefault("postgres", None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
