"""``python -m revive.testing.soak worker SPEC.json``: one soak worker process."""

from __future__ import annotations

import sys

from revive.testing.soak.worker import worker_main

__all__: list[str] = []

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "worker":
        print("usage: python -m revive.testing.soak worker SPEC.json", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(worker_main(sys.argv[2:]))
