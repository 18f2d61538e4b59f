"""``revive serve --config FILE``: the sidecar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from revive.app import create_app, start_site
from revive.cli.runtime import run, say, wait_for_signal
from revive.config import load_settings
from revive.errors import ConfigError, PolicyError
from revive.logs import configure_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("serve", help="run the sidecar")
    parser.add_argument("--config", type=Path, help="YAML settings file (REVIVE_* env overrides it)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        app = create_app(settings)
    except (ConfigError, PolicyError) as exc:
        print(f"revive: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    async def main() -> int:
        runner, url = await start_site(app, settings.host, settings.port)
        say(f"revive sidecar listening on {url}")
        await wait_for_signal(runner.cleanup)
        return 0

    return run(main)
