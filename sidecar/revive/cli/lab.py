"""``revive lab``: the fake provider, a sidecar wired to it and the lab UI at ``/lab/`` (with
the demo run ``run_7f2``), on this machine only.

``revive lab provider --port N`` runs the fake provider alone (DESIGN §11).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import aiohttp

from revive.api.auth import AdminAuth
from revive.app import create_app, start_site
from revive.cli.runtime import run, say, wait_for_signal
from revive.errors import ConfigError, PolicyError
from revive.lab.provider import start_provider
from revive.lab.settings import LAB_CONNECTION, lab_settings
from revive.lab.ui import create_lab_app
from revive.logs import configure_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "lab", help="start the recovery lab (fake provider + sidecar + demo run + lab UI)"
    )
    parser.add_argument("--port", type=int, default=8787, help="sidecar port (default 8787)")
    parser.add_argument("--provider-port", type=int, default=0, help="fake provider port")
    parser.add_argument("--policy-dir", type=Path, default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a new temp dir")
    parser.set_defaults(func=_lab)
    labsub = parser.add_subparsers(dest="lab_command")
    provider = labsub.add_parser("provider", help="run the fake provider alone")
    provider.add_argument("--host", default="127.0.0.1")
    provider.add_argument("--port", type=int, default=8790)
    provider.set_defaults(func=_provider)


def _lab(args: argparse.Namespace) -> int:
    owned = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="revive-lab-")) if owned else args.data_dir
    configure_logging("info")

    async def main() -> int:
        provider_runner, provider_url = await start_provider("127.0.0.1", args.provider_port)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{provider_url}/_lab/grants", json={}) as resp:
                    grant = await resp.json()
            settings = lab_settings(
                data_dir,
                provider_url,
                refresh_token=grant["refresh_token"],
                port=args.port,
                policy_dir=args.policy_dir,
            )
            try:
                # The lab UI resumes runs server-side with the admin token: make it now (the
                # sidecar loads the same file at start-up).
                await AdminAuth.load_or_create(settings.admin_token_path)
                admin_token = (await asyncio.to_thread(
                    settings.admin_token_path.read_text, encoding="utf-8"
                )).strip()
                app = create_app(settings, lab=create_lab_app(
                    provider_url=provider_url, admin_token=admin_token, interactive=True,
                ))
                runner, url = await start_site(app, settings.host, settings.port)
            except (ConfigError, PolicyError, OSError) as exc:
                print(f"revive lab: cannot start the sidecar: {exc}", file=sys.stderr)
                return 2
            say(f"fake provider (Microsoft Entra + Graph) on {provider_url}")
            say(f"  fault control:  {provider_url}/_lab/faults   mails: {provider_url}/_lab/mails")
            say(f"recovery lab:     {url}/lab/")
            say(f"revive sidecar on {url}")
            say(f"  worker route:   {url}/proxy/{LAB_CONNECTION}/v1.0/me")
            say(f"  data dir:       {data_dir}")
            say("Ctrl-C stops everything the lab started.")
            await wait_for_signal(runner.cleanup)
            return 0
        finally:
            await provider_runner.cleanup()
            if owned:
                shutil.rmtree(data_dir, ignore_errors=True)

    return run(main)


def _provider(args: argparse.Namespace) -> int:
    async def main() -> int:
        runner, url = await start_provider(args.host, args.port)
        say(f"fake provider on {url}")
        await wait_for_signal(runner.cleanup)
        return 0

    return run(main)
