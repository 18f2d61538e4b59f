"""Print the Secrets the Revive manifests mount: signing keys and the admin token.

    .venv/bin/python deploy/k8s/make_secrets.py --keys-dir ./revive-keys | kubectl apply -n NS -f -

or, without a checkout, with the image itself (the keys then live only in the printed Secret):

    docker run --rm -i --entrypoint python IMAGE - < deploy/k8s/make_secrets.py | kubectl apply -f -

Keys are made by Revive's own keyring, so each file is named ``<20-digit time>-<kid>.pem``,
the only names the sidecar loads (a plain ``openssl genpkey -algorithm ed25519`` file would
need renaming to that shape). Every sidecar and revive-control copies the same keys and token
from these Secrets at start-up, so a capability minted by one verifies at any other.

Rotation: run again with the same ``--keys-dir`` and ``--rotate``, apply, restart the pods
(``kubectl rollout restart``): the new key signs, the old ones still verify. Once the old
capabilities have expired (15 minutes at most), delete the old file, apply, restart again.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from revive.tokens import Keyring

KEYS_SECRET = "revive-signing-keys"
ADMIN_SECRET = "revive-admin-token"


def _secret(name: str, namespace: str | None, files: dict[str, bytes]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "revive"}}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": {key: base64.b64encode(value).decode("ascii") for key, value in files.items()},
    }


async def build(
    keys_dir: Path, *, rotate: bool, admin_token: str | None, namespace: str | None
) -> list[dict[str, Any]]:
    """The two Secrets, loading (or creating) the keys in ``keys_dir``."""
    keyring = await Keyring.load_or_create(keys_dir)
    if rotate:
        await keyring.rotate()
    pems = {p.name: p.read_bytes() for p in sorted(keys_dir.glob("*.pem"))}
    token = admin_token or secrets.token_urlsafe(32)
    return [
        _secret(KEYS_SECRET, namespace, pems),
        _secret(ADMIN_SECRET, namespace, {"admin-token": token.encode("ascii") + b"\n"}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--namespace", "-n", help="metadata.namespace of the Secrets")
    parser.add_argument(
        "--keys-dir", type=Path,
        help="keep the keys here (created 0700); default: a temporary directory, discarded",
    )
    parser.add_argument("--rotate", action="store_true", help="add a new signing key")
    parser.add_argument(
        "--admin-token-file", type=Path, help="reuse this admin token instead of a new one"
    )
    args = parser.parse_args(argv)
    token = args.admin_token_file.read_text().strip() if args.admin_token_file else None
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = args.keys_dir or Path(tmp) / "keys"
        docs = asyncio.run(
            build(keys_dir, rotate=args.rotate, admin_token=token, namespace=args.namespace)
        )
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
