"""``revive policies check`` and ``revive classify``: the policy files, testable without a network.

``policies check`` loads every policy the way the sidecar does at start-up, so a bad file fails
in CI rather than in production. ``classify`` runs JSON lines (the corpus format) through the
classifier and writes one ``{"id", "class", "provider_code"}`` line per input, in order.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from revive.classify import Phase, Policy, load_policies
from revive.errors import PolicyError

DEFAULT_POLICY_DIR = "policies"
_PHASES = {p.value for p in Phase}


def register(subparsers: Any) -> None:
    """Add ``policies check`` and ``classify`` to the CLI's subparsers.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    """
    policies = subparsers.add_parser("policies", help="work with provider policy files")
    policies_sub = policies.add_subparsers(dest="policies_command", required=True)
    check = policies_sub.add_parser("check", help="load and validate every policy file")
    check.add_argument("--policy-dir", type=Path, default=Path(DEFAULT_POLICY_DIR))
    check.set_defaults(func=check_command)

    classify = subparsers.add_parser(
        "classify", help="classify provider answers read as JSON lines (FILE or - for stdin)"
    )
    classify.add_argument("--policy-dir", type=Path, default=Path(DEFAULT_POLICY_DIR))
    classify.add_argument("file", metavar="FILE")
    classify.set_defaults(func=classify_command)


def check_command(args: argparse.Namespace) -> int:
    """Load all policies; one summary line each. Exit 1 with ``file: rule: reason`` on error."""
    try:
        policies = load_policies(args.policy_dir)
    except PolicyError as exc:
        print(f"{exc.file}: {exc.rule}: {exc.reason}", file=sys.stderr)
        return 1
    for name, policy in sorted(policies.items()):
        counts = dict(policy.classifier.own_counts)
        print(
            f"{name}: {counts.get(Phase.API_CALL, 0)} api_call rules, "
            f"{counts.get(Phase.TOKEN_REFRESH, 0)} token_refresh rules, "
            f"{len(policy.reconcile)} reconcile ({policy.file})"
        )
    return 0


def classify_command(args: argparse.Namespace) -> int:
    """Classify each input line; malformed lines yield an error line and exit status 1."""
    try:
        policies = load_policies(args.policy_dir)
    except PolicyError as exc:
        print(f"{exc.file}: {exc.rule}: {exc.reason}", file=sys.stderr)
        return 1
    if args.file == "-":
        return classify_lines(policies, sys.stdin, sys.stdout)
    try:
        with open(args.file, encoding="utf-8") as stream:
            return classify_lines(policies, stream, sys.stdout)
    except OSError as exc:
        print(f"{args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def classify_lines(policies: dict[str, Policy], lines: Iterable[str], out: IO[str]) -> int:
    """Write one JSON line per non-blank input line; 1 if any line was malformed, else 0."""
    status = 0
    defaults = policies["oauth2"]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = _parse(line)
        except ValueError as exc:
            status = 1
            out.write(json.dumps({"id": None, "error": f"line {number}: {exc}"}) + "\n")
            continue
        policy = policies.get(record["provider"], defaults)
        verdict = policy.classify(
            record["phase"], record["status"], record["headers"], record["body"]
        )
        result = {
            "id": record["id"],
            "class": verdict.failure_class.value,
            "provider_code": verdict.provider_code,
        }
        out.write(json.dumps(result) + "\n")
    return status


def _parse(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    provider = data.get("provider")
    if not isinstance(provider, str) or not provider:
        raise ValueError("provider must be a non-empty string")
    phase = data.get("phase")
    if phase not in _PHASES:
        raise ValueError(f"phase must be one of {sorted(_PHASES)}")
    status = data.get("status")
    if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
        raise ValueError("status must be an integer or null")
    headers = data.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ValueError("headers must be an object of strings")
    body = data.get("body")
    if isinstance(body, (dict, list)):
        body = json.dumps(body)  # a body given already parsed
    elif body is not None and not isinstance(body, str):
        raise ValueError("body must be a string, JSON value or null")
    return {
        "id": data.get("id"),
        "provider": provider,
        "phase": phase,
        "status": status,
        "headers": headers,
        "body": body,
    }
