"""``revive serve --config FILE``: the sidecar."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web

from revive.api.auth import AdminAuth
from revive.app import create_app, resolve_policies, start_site
from revive.cli.runtime import run, say, wait_for_signal
from revive.config import load_settings
from revive.errors import ConfigError, PolicyError
from revive.lab.ui import create_lab_app
from revive.logs import configure_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("serve", help="run the sidecar")
    parser.add_argument("--config", type=Path, help="YAML settings file (REVIVE_* env overrides it)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        resolve_policies(settings)  # fail here, before anything starts, on a bad policy
    except (ConfigError, PolicyError) as exc:
        print(f"revive: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    async def main() -> int:
        # The operator's console (read-only lab) reads through the API with the admin token.
        await AdminAuth.load_or_create(settings.admin_token_path)
        token = (await asyncio.to_thread(settings.admin_token_path.read_text)).strip()

        def build() -> web.Application:
            console = create_lab_app(provider_url=None, admin_token=token, interactive=False)
            return create_app(settings, lab=console)

        app = await asyncio.to_thread(build)
        runner, url = await start_site(app, settings.host, settings.port)
        say(f"revive sidecar listening on {url}")
        await wait_for_signal(runner.cleanup)
        return 0

    return run(main)
