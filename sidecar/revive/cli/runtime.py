"""Running servers from the command line: uvloop and signals."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main`` on uvloop where available (the sidecar's hot path wants it)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a default dependency on Linux/macOS
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


async def wait_for_signal(on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Block until SIGINT or SIGTERM, then run ``on_stop``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if on_stop is not None:
            await on_stop()


def say(line: str) -> None:
    print(line, flush=True, file=sys.stdout)
