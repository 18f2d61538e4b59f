"""``revive cases list``: what a running sidecar's admin API says about cases and grants at risk.

An operator's view over HTTP (``GET /v1/cases``, ``GET /v1/connections/at-risk``), so it works
against any sidecar the operator can reach, whichever store it runs on. ``--at-risk`` lists
the connections whose grant works today but is expected to die (reconnect those before a run
fails on them) instead of the cases. Output is a table, or the API's JSON with ``--json``.

Exit codes: 0 on success, 1 when the sidecar answers an error (its problem is printed to
stderr), 2 when it cannot be reached or the admin token file cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from revive.cli.runtime import run
from revive.recovery.machine import CaseState

__all__ = ["register"]

DEFAULT_URL = "http://127.0.0.1:8787"
DEFAULT_TOKEN_FILE = Path(".revive/admin-token")
_TIMEOUT = aiohttp.ClientTimeout(total=30)
_STATES = tuple(state.value for state in CaseState)
_CASE_COLUMNS = ("case_id", "state", "run_id", "connection_id", "action_key", "provider_code",
                 "updated_at")
_RISK_COLUMNS = ("connection_id", "reason", "expires_at", "since", "origin", "detail")


class _Failed(Exception):
    """What to tell the operator, and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cases list`` to the CLI's subparsers."""
    cases = sub.add_parser("cases", help="recovery cases of a running sidecar")
    cases_sub = cases.add_subparsers(dest="cases_command", required=True)
    listing = cases_sub.add_parser("list", help="list cases, or connections at risk")
    listing.add_argument("--at-risk", action="store_true",
                         help="list connections whose grant is expected to die instead")
    listing.add_argument("--state", choices=_STATES, help="only cases in this state")
    listing.add_argument("--url", default=DEFAULT_URL, help=f"the sidecar (default {DEFAULT_URL})")
    listing.add_argument("--admin-token-file", type=Path, default=DEFAULT_TOKEN_FILE,
                         help=f"file holding the admin token (default {DEFAULT_TOKEN_FILE})")
    listing.add_argument("--json", action="store_true", help="print the API's JSON answer")
    listing.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    if args.at_risk and args.state:
        print("revive cases list: --state filters cases, not connections at risk",
              file=sys.stderr)
        return 2

    async def main() -> int:
        try:
            answer = await _fetch(args)
        except _Failed as exc:
            print(f"revive cases list: {exc}", file=sys.stderr)
            return exc.code
        if args.json:
            print(json.dumps(answer, indent=2, sort_keys=True))
        elif args.at_risk:
            print(_table(answer["connections"], _RISK_COLUMNS, "no connection is at risk"))
        else:
            print(_table(answer["cases"], _CASE_COLUMNS, "no cases"))
        return 0

    return run(main)


async def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    try:
        token = (await asyncio.to_thread(args.admin_token_file.read_text, encoding="utf-8"))
    except OSError as exc:
        raise _Failed(f"cannot read the admin token file {args.admin_token_file}: "
                      f"{exc.strerror or exc}", 2) from None
    path = "/v1/connections/at-risk" if args.at_risk else "/v1/cases"
    params = {"state": args.state} if args.state else {}
    url = args.url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {token.strip()}", "Accept": "application/json"}
    try:
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as http:
            async with http.get(url, params=params, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _Failed(f"cannot reach {args.url}: {type(exc).__name__}", 2) from None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if status != 200 or not isinstance(body, dict):
        raise _Failed(_problem(status, body), 1)
    return body


def _problem(status: int, body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        return f"{status} {body['type']}: {body.get('detail', '')}"
    return f"the sidecar answered {status}"


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...], empty: str) -> str:
    if not rows:
        return empty
    cells = [[_cell(column, row.get(column)) for column in columns] for row in rows]
    header = [c.upper() for c in columns]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *cells]]
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("updated_at", "expires_at", "since") and isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value).replace("\n", " ")[:120]
