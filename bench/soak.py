"""The chaos soak (issue #9): N runs through ``protect_action`` under faults of every kind.

    .venv/bin/python bench/soak.py --runs 200 --seed 1
    .venv/bin/python bench/soak.py --store postgres      # two sidecars sharing PostgreSQL
    .venv/bin/python bench/soak.py --quick               # 20 runs

Prints a table, then one JSON line with the same numbers; exits 1 when an invariant fails
(a duplicate, a loss, a run without a case, a case not closed, an in_flight row left).
The engine is ``revive.testing.soak``; see bench/README.md, "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from revive.testing.postgres import POSTGRES_URL
from revive.testing.soak.driver import SoakConfig, run_soak
from revive.testing.soak.report import render_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--postgres-url", default=POSTGRES_URL,
                        help="server for --store postgres (a fresh schema is made and dropped)")
    parser.add_argument("--quick", action="store_true", help="20 runs")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep data, checkpoints and sidecar logs here (default: a temp dir)")
    parser.add_argument("--deadline", type=float, default=900.0,
                        help="seconds after which runs still going fail (the report still comes)")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    if args.runs < 1 or args.concurrency < 1:
        parser.error("--runs and --concurrency must be at least 1")
    config = SoakConfig(
        runs=20 if args.quick else args.runs, seed=args.seed, concurrency=args.concurrency,
        store=args.store, postgres_url=args.postgres_url, workdir=args.workdir,
        deadline_s=args.deadline,
    )
    # The fake provider's server logs a traceback each time a killed sidecar cuts a request
    # off mid-body: expected here, and noise on the console.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    report = asyncio.run(run_soak(config))
    if not args.json_only:
        print(render_table(report), flush=True)
    print(report.model_dump_json(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
