"""Settings for a sidecar wired to the fake provider: used by `revive lab` and the tests."""

from __future__ import annotations

import os
from pathlib import Path

from revive.config import ConnectionConfig, LimitsConfig, OAuth2SourceConfig, Settings
from revive.lab.provider import ProviderConfig

LAB_CONNECTION = "conn_microsoft_ops"


def default_policy_dir() -> Path:
    """``./policies`` when run from a checkout's root, else the checkout's own."""
    here = Path("policies")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[3] / "policies"


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value, encoding="utf-8")
    os.chmod(path, 0o600)
    return path


def lab_settings(
    data_dir: Path,
    provider_url: str,
    *,
    refresh_token: str,
    port: int = 0,
    policy_dir: Path | None = None,
    limits: LimitsConfig | None = None,
    provider: ProviderConfig | None = None,
) -> Settings:
    """A sidecar whose one connection is the fake provider's Microsoft account.

    The seed refresh token is written to a 0600 file that the oauth2 source seals into its
    encrypted grant store on first use; the plain file is what an operator would mount.
    """
    config = provider or ProviderConfig()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = write_secret(data_dir / "client-secret", config.client_secret)
    seed = write_secret(data_dir / "seed-refresh-token", refresh_token)
    tenant_url = f"{provider_url}/{config.tenant}/oauth2/v2.0"
    return Settings(
        listen=f"127.0.0.1:{port}",
        data_dir=data_dir,
        policy_dir=policy_dir or default_policy_dir(),
        limits=limits or LimitsConfig(),
        connections=[
            ConnectionConfig(
                id=LAB_CONNECTION,
                provider="microsoft",
                base_url=provider_url,
                allowed_hosts=["127.0.0.1"],
                source=OAuth2SourceConfig(
                    kind="oauth2",
                    token_url=f"{tenant_url}/token",
                    authorize_url=f"{tenant_url}/authorize",
                    client_id=config.client_id,
                    client_secret_file=secret,
                    scopes=["offline_access", "Mail.Send", "Calendars.Read"],
                    refresh_token_file=seed,
                ),
            )
        ],
    )
