"""Turn a ``postgresql://`` store URL into asyncpg connect arguments, without blocking the loop.

asyncpg parses its connect arguments again for every new connection, and that parse reads
``~/.pgpass`` and stats ``~/.postgresql/*`` (client certificates, root certificates) with
synchronous file calls: on the event loop, each time the pool opens a connection (DESIGN §9
forbids it; the blockbuster guard catches it). So the store resolves the password and the TLS
context once, in a worker thread, and hands asyncpg only finished values (a password callable
and an ``SSLContext`` or ``False``), which makes asyncpg skip its own file lookups.

The URL may also carry two options of ours, removed before asyncpg sees the rest:
``schema=NAME`` (the store's tables live there; created when missing) and ``pool_size=N``.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from revive.errors import ConfigError

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
"""A schema name needing no quoting rules beyond double quotes (it is spliced into DDL)."""

DEFAULT_POOL_SIZE = 10


@dataclass(frozen=True, slots=True)
class PgTarget:
    """What the store URL names: asyncpg's DSN (our options removed), schema and pool size."""

    dsn: str
    schema: str | None
    pool_size: int


def _refuse(url: str, reason: str) -> ConfigError:
    shown = urlsplit(url)._replace(netloc=urlsplit(url).hostname or "").geturl()  # no password
    return ConfigError("store", "store", f"{reason} in {shown!r}")


def parse_url(url: str, schema: str | None = None, pool_size: int | None = None) -> PgTarget:
    """Split our options off a ``postgresql://`` (or ``postgres://``) URL.

    Args:
        url: the store URL.
        schema: overrides the URL's ``schema=``.
        pool_size: overrides the URL's ``pool_size=``.

    Raises:
        ConfigError: another scheme, a bad schema name or pool size.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise _refuse(url, "expected a postgresql:// URL")
    query, ours = [], {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("schema", "pool_size"):
            ours[key] = value
        else:
            query.append((key, value))
    schema = schema if schema is not None else ours.get("schema")
    if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
        raise _refuse(url, f"schema must match {_SCHEMA_NAME.pattern}")
    size_text = str(pool_size) if pool_size is not None else ours.get("pool_size")
    size = DEFAULT_POOL_SIZE
    if size_text is not None:
        if not size_text.isdigit() or not 1 <= int(size_text) <= 1000:
            raise _refuse(url, "pool_size must be an integer from 1 to 1000")
        size = int(size_text)
    dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(query)))
    return PgTarget(dsn, schema, size)


@dataclass(frozen=True, slots=True)
class ConnectArgs:
    """Resolved credentials and TLS for every connection of the pool.

    Attributes:
        password: the password to send, or ``None`` (trust, peer, certificate auth).
        ssl: ``False`` for plain TCP, else the context to use.
        ssl_fallback: ``sslmode=prefer``: try ``ssl``, and use plain TCP if the server
            refuses TLS (decided once, at open).
    """

    password: str | None
    ssl: ssl.SSLContext | bool
    ssl_fallback: bool

    def kwargs(self) -> dict[str, Any]:
        """Arguments for ``asyncpg.create_pool`` that leave asyncpg nothing to look up."""
        password = self.password
        return {"password": lambda: password, "ssl": self.ssl}


def _pgpass_lookup(host: str, port: str, database: str, user: str) -> str | None:
    """The first matching line of the libpq password file (``PGPASSFILE`` or ``~/.pgpass``)."""
    path = Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    wanted = (host, port, database, user)
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.replace("\\:", ":").replace("\\\\", "\\")
                  for f in re.split(r"(?<!\\):", line, maxsplit=4)]
        if len(fields) == 5 and all(f in ("*", w) for f, w in zip(fields[:4], wanted)):
            return fields[4]
    return None


def _tls(mode: str, query: dict[str, str]) -> tuple[ssl.SSLContext | bool, bool]:
    """The TLS context libpq's ``sslmode`` asks for (file reads: worker thread only)."""
    if mode in ("disable", "allow"):  # "allow" prefers plain TCP: never needs TLS here
        return False, False
    if mode not in ("prefer", "require", "verify-ca", "verify-full"):
        raise ConfigError("store", "store", f"unknown sslmode {mode!r}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("prefer", "require"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        root = query.get("sslrootcert") or os.environ.get("PGSSLROOTCERT")
        context.load_verify_locations(cafile=root or str(Path.home() / ".postgresql/root.crt"))
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    cert = query.get("sslcert") or os.environ.get("PGSSLCERT")
    key = query.get("sslkey") or os.environ.get("PGSSLKEY")
    default_cert = Path.home() / ".postgresql/postgresql.crt"
    if not cert and default_cert.is_file():
        cert, key = str(default_cert), key or str(Path.home() / ".postgresql/postgresql.key")
    if cert:
        context.load_cert_chain(cert, keyfile=key or None)
    return context, mode == "prefer"


def _resolve(dsn: str) -> ConnectArgs:
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    password = unquote(parts.password) if parts.password else None
    if password is None:
        password = query.get("password") or os.environ.get("PGPASSWORD")
    if password is None:
        password = _pgpass_lookup(
            parts.hostname or "localhost", str(parts.port or 5432),
            unquote(parts.path.lstrip("/")) or "*",
            unquote(parts.username) if parts.username else os.environ.get("PGUSER", "*"),
        )
    mode = query.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer"
    context, fallback = _tls(mode, query)
    return ConnectArgs(password, context, fallback)


async def resolve(target: PgTarget) -> ConnectArgs:
    """Resolve password and TLS for ``target`` in a worker thread (they read files).

    Raises:
        ConfigError: an unknown ``sslmode``.
        OSError, ssl.SSLError: a named certificate cannot be read.
    """
    return await asyncio.to_thread(_resolve, target.dsn)
