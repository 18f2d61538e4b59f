"""``revive``: one console script, one module per command group."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from revive.cli import cases, lab, policies, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve.register(sub)
    lab.register(sub)
    policies.register(sub)
    cases.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
