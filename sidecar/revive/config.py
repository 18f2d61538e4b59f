"""Typed settings, parsed once at start-up from a YAML file overridden by ``REVIVE_*`` env.

A wrong field fails start-up with the file, the field and the reason (``ConfigError``), so an
operator never finds out about a typo from a 3 a.m. page.
"""

from __future__ import annotations

import ipaddress
import socket
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from yarl import URL

from revive.errors import ConfigError

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(value: str) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an absolute http(s) URL")
    if url.user or url.password:
        raise ValueError("must not carry credentials")
    if url.fragment:
        raise ValueError("must not carry a fragment")
    return value


def _base_url(value: str, example: str = "") -> str:
    """An identity layer's base URL: absolute http(s), nothing but scheme, host and path."""
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"must be an absolute http(s) URL{example}")
    if url.user or url.password or url.fragment or url.query_string:
        raise ValueError("must be a bare base URL (no credentials, query or fragment)")
    return value


class StaticSourceConfig(_Model):
    """Tokens from a file (JSON or YAML ``{access_token, expires_at?}``): tests and the lab."""

    kind: Literal["static"]
    tokens_file: Path


class VaultAccessConfig(BaseModel):
    """Where one KV v2 secret lives in HashiCorp Vault and how the sidecar logs in to read it.

    Shared by the ``vault`` source (reads a token someone else keeps there) and the oauth2
    ``grant_store: {kind: vault}`` (the refresher keeps its own grant there).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str
    mount: str = "secret"
    path: str
    auth: Literal["token", "kubernetes"] = "token"
    token_file: Path | None = None
    kubernetes_role: str | None = None
    kubernetes_jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    kubernetes_mount: str = "kubernetes"
    namespace: str | None = None
    """Vault Enterprise namespace, sent as ``X-Vault-Namespace``."""
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        return _base_url(value)

    @field_validator("mount", "path", "kubernetes_mount")
    @classmethod
    def _check_segment(cls, value: str) -> str:
        value = value.strip("/")
        if not value or any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError("must be a non-empty Vault path without empty, '.' or '..' parts")
        return value

    @model_validator(mode="after")
    def _check_auth(self) -> Self:
        if self.auth == "token" and self.token_file is None:
            raise ValueError("auth 'token' needs token_file")
        if self.auth == "kubernetes" and not self.kubernetes_role:
            raise ValueError("auth 'kubernetes' needs kubernetes_role")
        return self


class FileGrantStoreConfig(_Model):
    """The default: the grant is a Fernet-encrypted file under ``data_dir`` (one host)."""

    kind: Literal["file"] = "file"


class VaultGrantStoreConfig(VaultAccessConfig):
    """The grant lives in Vault KV v2 so that several sidecars share one rotating grant.

    Every write is check-and-set against the version read, so two sidecars cannot overwrite
    each other's rotation (``revive.sources.vault_grants``).
    """

    kind: Literal["vault"]
    settle_seconds: float = Field(default=3.0, ge=0, le=60)
    """After the provider rejects a refresh token that Vault still holds, keep re-reading
    this long: another sidecar may have redeemed it and not yet written its successor."""


GrantStoreConfig = Annotated[
    FileGrantStoreConfig | VaultGrantStoreConfig, Field(discriminator="kind")
]


class KeepAliveConfig(_Model):
    """Refresh grants before the provider drops them for disuse (Entra: 90 days, AADSTS700082).

    Durations take seconds, ``30d``/``12h``-style text or ISO 8601 (``P30D``).
    """

    enabled: bool = False
    idle_refresh_after: timedelta = timedelta(days=30)
    """A grant not redeemed for this long is refreshed by the background task."""
    grant_lifetime: timedelta = timedelta(days=90)
    """How long the provider keeps an unused refresh token (Entra: 90 days)."""
    warn_before: timedelta = timedelta(days=14)
    """The grant is reported at risk this long before ``grant_lifetime`` runs out."""
    check_every: timedelta = timedelta(hours=1)
    """How often the background task looks (jittered)."""
    jitter: float = Field(default=0.2, ge=0, le=0.5)
    """Each wait is ``check_every`` times a random factor in ``1 ± jitter``."""
    failures_before_risk: int = Field(default=3, ge=1, le=100)
    """Keep-alive refreshes failing this many times in a row report ``refresh-failing``."""

    @model_validator(mode="after")
    def _check_durations(self) -> KeepAliveConfig:
        for name in ("idle_refresh_after", "grant_lifetime", "check_every"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        if self.warn_before < timedelta(0):
            raise ValueError("warn_before must not be negative")
        if self.idle_refresh_after >= self.grant_lifetime:
            raise ValueError("idle_refresh_after must be shorter than grant_lifetime")
        if self.warn_before >= self.grant_lifetime:
            raise ValueError("warn_before must be shorter than grant_lifetime")
        return self


class OAuth2SourceConfig(_Model):
    """The built-in refresher: the sidecar itself holds the (encrypted) refresh token."""

    kind: Literal["oauth2"]
    token_url: str
    authorize_url: str | None = None
    client_id: str
    client_secret_file: Path | None = None
    scopes: list[str] = Field(default_factory=list)
    refresh_token_file: Path | None = None
    """Plain refresh token used once to seed the encrypted grant file when none exists yet."""
    redirect_uri: str | None = None
    refresh_skew_seconds: float = Field(default=120.0, ge=0, le=3600)
    token_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    grant_store: GrantStoreConfig = FileGrantStoreConfig()
    """Where the refresh token lives: encrypted under ``data_dir`` or in Vault KV v2."""
    keep_alive: KeepAliveConfig = KeepAliveConfig()

    _check_token_url = field_validator("token_url")(_http_url)

    @field_validator("authorize_url", "redirect_uri")
    @classmethod
    def _optional_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)


class NangoSourceConfig(BaseModel):
    """Settings of a connection whose grant lives in Nango.

    Attributes:
        kind: always ``nango``.
        base_url: Nango's API (``https://api.nango.dev`` or a self-hosted server).
        secret_key_file: file holding the environment's secret (API) key.
        connection_id: Nango's connection id.
        provider_config_key: Nango's integration id (the "unique key").
        webhook_secret_file: file holding the webhook signing key; defaults to the secret key
            (Nango's SDK does the same, but newer environments have a distinct signing key).
        timeout_seconds: total time allowed for one call to Nango.
        refresh_skew_seconds: a cached token this close to expiry is fetched again.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["nango"]
    base_url: str = "https://api.nango.dev"
    secret_key_file: Path
    connection_id: str = Field(min_length=1)
    provider_config_key: str = Field(min_length=1)
    webhook_secret_file: Path | None = None
    timeout_seconds: float = Field(default=10.0, gt=0)
    refresh_skew_seconds: float = Field(default=60.0, ge=0)

class Auth0SourceConfig(BaseModel):
    """Auth0 Token Vault: exchange the user's Auth0 refresh token for ``connection``'s token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["auth0"]
    domain_url: str
    """``https://TENANT.REGION.auth0.com`` (or a custom domain)."""
    client_id: str
    client_secret_file: Path
    connection: str
    """The Auth0 connection name, e.g. ``google-oauth2``."""
    subject_token_file: Path
    """The user's Auth0 refresh token (or access token), read at each exchange."""
    subject_token_type: str = "urn:ietf:params:oauth:token-type:refresh_token"
    login_hint: str | None = None
    refresh_skew_seconds: float = Field(default=60.0, ge=0, le=3600)
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @field_validator("domain_url")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        return _base_url(value, " such as https://TENANT.auth0.com")

    @property
    def token_url(self) -> str:
        return self.domain_url.rstrip("/") + "/oauth/token"

class VaultSourceConfig(VaultAccessConfig):
    """A token kept in HashiCorp Vault's KV v2 engine at ``{mount}/data/{path}``, key ``field``."""

    kind: Literal["vault"]
    field: str = "access_token"


SourceConfig = Annotated[
    StaticSourceConfig | OAuth2SourceConfig | NangoSourceConfig | Auth0SourceConfig
    | VaultSourceConfig,
    Field(discriminator="kind"),
]


class ConnectionConfig(_Model):
    """One upstream account: who the provider is, where it lives, who holds the grant."""

    id: str = Field(pattern=_ID)
    provider: str = Field(pattern=_ID)
    base_url: str
    allowed_hosts: list[str] = Field(default_factory=list)
    source: SourceConfig

    _check_base_url = field_validator("base_url")(_http_url)

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not host or "/" in host or "@" in host:
                raise ValueError(f"{host!r} is not a host name")
        return [h.lower().rstrip(".") for h in hosts]

    @model_validator(mode="after")
    def _base_host_allowed(self) -> ConnectionConfig:
        host = (URL(self.base_url).host or "").lower()
        if not self.allowed_hosts:
            object.__setattr__(self, "allowed_hosts", [host])
        elif host not in self.allowed_hosts:
            raise ValueError(f"base_url host {host!r} is not in allowed_hosts")
        return self

    @property
    def upstream(self) -> URL:
        return URL(self.base_url)


class WebhookNotifierConfig(_Model):
    """Signed POSTs when a case opens (with the reconnect link) and when it is ready."""

    kind: Literal["webhook"]
    url: str
    secret_file: Path
    attempts: int = Field(default=5, ge=1, le=20)

    _check_url = field_validator("url")(_http_url)


class LimitsConfig(_Model):
    """Bounds on every request so one bad worker cannot exhaust the sidecar."""

    max_request_bytes: int = Field(default=10 * 1024 * 1024, ge=0)
    replay_buffer_bytes: int = Field(default=1024 * 1024, ge=0)
    """Bodies up to this size are buffered so they can be replayed after a refresh or retry."""
    replay_store_bytes: int = Field(default=256 * 1024, ge=0)
    """How much of a mutating request's answer the ledger keeps for replay."""
    classify_read_bytes: int = Field(default=64 * 1024, ge=1024)
    """How much of an error answer is read (and decompressed) to classify it."""
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    """Time to open a connection to a provider (TCP and TLS); past it nothing was sent."""
    upstream_timeout_seconds: float = Field(default=60.0, gt=0)
    """How long a provider may stay silent while its answer is awaited: between bytes, not in
    total, so a long download that keeps arriving is never cut off."""
    request_body_timeout_seconds: float = Field(default=30.0, gt=0)
    """Time a worker has to deliver its whole request body: a client dribbling bytes
    (slowloris) would otherwise hold a handler, and a streamed upstream request, forever."""
    max_upstream_connections: int = Field(default=256, ge=1)
    """Connections to providers open at once, over all connections; more requests wait."""


class Settings(BaseSettings):
    """Everything the sidecar reads at start-up (DESIGN §1)."""

    model_config = SettingsConfigDict(
        env_prefix="REVIVE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    listen: str = "127.0.0.1:8787"
    data_dir: Path = Path(".revive")
    store: str | None = None
    admin_token_file: Path | None = None
    policy_dir: Path = Path("policies")
    connections: list[ConnectionConfig] = Field(default_factory=list)
    limits: LimitsConfig = LimitsConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    notifier: WebhookNotifierConfig | None = None
    public_url: str | None = None
    """Where a human reaches this sidecar, for reconnect links (default: http://LISTEN)."""
    sidecar_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    """Owner of this sidecar's ledger claims; stable across restarts so it sweeps its own."""
    workers_from_any_address: bool = False
    """Worker routes answer only on loopback unless this is set."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
                raise ValueError(f"{host!r} is not a host") from None
        return value

    @model_validator(mode="after")
    def _unique_connections(self) -> Settings:
        seen: set[str] = set()
        for conn in self.connections:
            if conn.id in seen:
                raise ValueError(f"connection id {conn.id!r} appears twice")
            seen.add(conn.id)
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.data_dir / 'revive.db'}"

    @property
    def reconnect_url(self) -> str:
        base = (self.public_url or f"http://{self.listen}").rstrip("/")
        return base + "/v1/connections/{connection_id}/connect"

    @property
    def admin_token_path(self) -> Path:
        return self.admin_token_file or self.data_dir / "admin-token"

    def connection(self, connection_id: str) -> ConnectionConfig | None:
        for conn in self.connections:
            if conn.id == connection_id:
                return conn
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Env overrides the YAML file (passed as init kwargs), as DESIGN §1 asks.
        return env_settings, init_settings


_SOURCE_KINDS = ("static", "oauth2", "nango", "auth0", "vault", "file")
_TAGGED = ("source", "grant_store")


def _field_name(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _SOURCE_KINDS and parts and parts[-1].lstrip(".") in _TAGGED:
            continue  # the discriminator tag adds nothing for a reader
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(root)"


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (YAML) and ``REVIVE_*`` env into validated settings.

    Raises:
        ConfigError: naming the file, the field and the reason.
    """
    source = str(path) if path else "environment"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, "(file)", exc.strerror or str(exc)) from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(source, "(syntax)", str(exc).replace("\n", " ")) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(source, "(root)", "must be a mapping")
        data = loaded or {}
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(source, _field_name(tuple(err["loc"])), err["msg"]) from None
