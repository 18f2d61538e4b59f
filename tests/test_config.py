"""Settings: YAML + REVIVE_* env, and a bad field names the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from revive.config import load_settings
from revive.errors import ConfigError

GOOD = """
listen: 127.0.0.1:9999
data_dir: {data}
policy_dir: policies
connections:
  - id: conn_microsoft_ops
    provider: microsoft
    base_url: https://graph.microsoft.com
    allowed_hosts: [graph.microsoft.com]
    source:
      kind: oauth2
      token_url: https://login.microsoftonline.com/t/oauth2/v2.0/token
      client_id: abc
      scopes: [offline_access, Mail.Send]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "revive.yaml"
    path.write_text(text)
    return path


def test_good_file_loads(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, GOOD.format(data=tmp_path)))
    assert settings.port == 9999
    conn = settings.connection("conn_microsoft_ops")
    assert conn is not None and conn.source.kind == "oauth2"
    assert settings.store_url == f"sqlite:///{tmp_path / 'revive.db'}"


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVIVE_LISTEN", "127.0.0.1:7000")
    monkeypatch.setenv("REVIVE_STORE", "postgresql://postgres@127.0.0.1/test")
    settings = load_settings(_write(tmp_path, GOOD.format(data=tmp_path)))
    assert settings.port == 7000
    assert settings.store_url.startswith("postgresql://")


def test_allowed_hosts_default_to_base_host(tmp_path: Path) -> None:
    text = GOOD.format(data=tmp_path).replace("    allowed_hosts: [graph.microsoft.com]\n", "")
    conn = load_settings(_write(tmp_path, text)).connections[0]
    assert conn.allowed_hosts == ["graph.microsoft.com"]


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (("listen: 127.0.0.1:9999", "listen: nowhere"), "listen", "HOST:PORT"),
        (("kind: oauth2", "kind: carrier-pigeon"), "connections[0].source", "kind"),
        (("base_url: https://graph.microsoft.com", "base_url: ftp://graph.microsoft.com"),
         "connections[0].base_url", "http"),
        (("allowed_hosts: [graph.microsoft.com]", "allowed_hosts: [evil.example]"),
         "connections[0]", "not in allowed_hosts"),
        (("client_id: abc", "client_id: abc\n      client_secrte_file: x"),
         "connections[0].source.client_secrte_file", "Extra inputs"),
        (("id: conn_microsoft_ops", "id: 'bad id!'"), "connections[0].id", "pattern"),
    ],
)
def test_bad_field_names_file_field_reason(
    tmp_path: Path, change: tuple[str, str], field: str, reason: str
) -> None:
    path = _write(tmp_path, GOOD.format(data=tmp_path).replace(*change))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    err = info.value
    assert err.source == str(path)
    assert err.field == field
    assert reason in err.reason
    assert str(path) in str(err) and field in str(err)


def test_yaml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, "listen: [unclosed"))
    assert info.value.field == "(syntax)"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "absent.yaml")
    assert info.value.field == "(file)"


def test_duplicate_connection_ids_refused(tmp_path: Path) -> None:
    text = GOOD.format(data=tmp_path)
    block = text[text.index("  - id:"):]
    with pytest.raises(ConfigError, match="appears twice"):
        load_settings(_write(tmp_path, text + block))


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("{kind: nango, secret_key_file: /s, connection_id: c1, provider_config_key: ms}", "nango"),
        ("{kind: auth0, domain_url: 'https://t.eu.auth0.com', client_id: x, "
         "client_secret_file: /s, connection: google-oauth2, subject_token_file: /t}", "auth0"),
        ("{kind: vault, address: 'https://vault:8200', path: revive/ms, token_file: /t}", "vault"),
    ],
)
def test_identity_layer_sources_load(tmp_path: Path, source: str, kind: str) -> None:
    text = (
        f"data_dir: {tmp_path}\nconnections:\n  - id: c1\n    provider: microsoft\n"
        f"    base_url: https://graph.microsoft.com\n    source: {source}\n"
    )
    settings = load_settings(_write(tmp_path, text))
    assert settings.connections[0].source.kind == kind


def test_vault_source_without_its_auth_input_names_the_field(tmp_path: Path) -> None:
    text = (
        f"data_dir: {tmp_path}\nconnections:\n  - id: c1\n    provider: microsoft\n"
        "    base_url: https://graph.microsoft.com\n"
        "    source: {kind: vault, address: 'https://vault:8200', path: p, auth: kubernetes}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    assert info.value.field == "connections[0].source" and "kubernetes_role" in info.value.reason
