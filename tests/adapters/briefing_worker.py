"""A Temporal worker for the run_7f2 briefing, in its own process (issue #4: a worker process
killed after the 424, a new worker process resumes the run).

    python tests/adapters/briefing_worker.py --address 127.0.0.1:7233 --namespace default \\
        --task-queue briefings --sidecar-url http://127.0.0.1:8080 --identity worker-1 \\
        [--kill-grant-before-first-send --provider-url http://127.0.0.1:9000]

Registers the same workflow and activities as the in-test workers (``briefing_workflow``).
Prints ``ready <identity>`` once it polls, then runs until SIGTERM/SIGINT (or SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import timedelta
from pathlib import Path

# The shared module lives next to this script; the workflow sandbox re-imports it by name.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import aiohttp
from temporalio.client import Client
from temporalio.worker import Worker

from briefing_workflow import BriefingActivities, NightlyBriefing


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--sidecar-url", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--provider-url", help="the fake provider, for the fault below")
    parser.add_argument(
        "--kill-grant-before-first-send", action="store_true",
        help="arm the provider's kill_grant fault right before the first send_briefing attempt",
    )
    parser.add_argument(
        "--sticky-timeout", type=float, default=10.0,
        help="sticky_queue_schedule_to_start_timeout, seconds",
    )
    args = parser.parse_args(argv)
    if args.kill_grant_before_first_send and not args.provider_url:
        parser.error("--kill-grant-before-first-send needs --provider-url")
    return args


async def _main(args: argparse.Namespace) -> None:
    async def before_send(n: int) -> None:
        if n == 1 and args.kill_grant_before_first_send:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
                http.post(f"{args.provider_url}/_lab/faults", json={"fault": "kill_grant"}) as resp,
            ):
                assert resp.status < 400, await resp.text()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    client = await Client.connect(args.address, namespace=args.namespace, identity=args.identity)
    acts = BriefingActivities(args.sidecar_url, before_send)
    async with Worker(
        client, task_queue=args.task_queue, workflows=[NightlyBriefing],
        activities=acts.activities, identity=args.identity,
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=args.sticky_timeout),
    ):
        print(f"ready {args.identity}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(_main(_parse(sys.argv[1:])))
