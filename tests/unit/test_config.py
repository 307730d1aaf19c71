"""Layered configuration: precedence, attribution of errors to layers, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, Field, SecretStr

from lodestar.common.config import (
    DatabaseSettings,
    ServiceSettings,
    TlsSettings,
    load_settings,
    redacted_dump,
)
from lodestar.common.errors import ConfigurationError


class Limits(BaseModel):
    max_batch: int = 100
    api_secret: SecretStr | None = None


class CoreSettings(ServiceSettings):
    port: int = Field(default=7000, ge=0, le=65535)
    retention_days: int = Field(default=7, ge=1)
    tags: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return tmp_path / "config"


def load(cfg: Path, env: dict[str, str] | None = None, cli: dict[str, object] | None = None):
    return load_settings(CoreSettings, "core", config_dir=cfg, env=env or {}, cli=cli)


def error_of(cfg: Path, env=None, cli=None) -> str:
    with pytest.raises(ConfigurationError) as info:
        load(cfg, env, cli)
    return str(info.value)


# --- precedence ---------------------------------------------------------------------------------


def test_defaults_when_no_layer_sets_anything(cfg: Path) -> None:
    settings = load(cfg)
    assert settings.port == 7000
    assert settings.host == "127.0.0.1"
    assert settings.tls == TlsSettings()
    assert settings.database.pool_max_size == 10
    assert settings.spool_dir == Path(".lodestar/spool")


def test_each_layer_overrides_the_one_below(cfg: Path) -> None:
    write(cfg / "lodestar.yaml", "port: 1001\nhost: 0.0.0.0\nmetrics_port: 1\nlog_level: DEBUG\n")
    write(cfg / "modules/core.yaml", "port: 1002\nmetrics_port: 2\nretention_days: 30\n")
    settings = load(
        cfg,
        env={"LODESTAR_PORT": "1003", "LODESTAR_METRICS_PORT": "3"},
        cli={"port": 1004},
    )
    assert settings.port == 1004  # cli
    assert settings.metrics_port == 3  # env
    assert settings.retention_days == 30  # module yaml
    assert settings.host == "0.0.0.0"  # shared yaml
    assert settings.log_level == "DEBUG"
    assert settings.shutdown_grace_seconds == 10.0  # default


def test_other_modules_file_is_not_read(cfg: Path) -> None:
    write(cfg / "modules/usage.yaml", "port: 1\n")
    assert load(cfg).port == 7000


def test_nested_values_deep_merge_across_layers(cfg: Path) -> None:
    write(cfg / "lodestar.yaml", "database:\n  pool_max_size: 20\n  schema_name: shared\n")
    write(cfg / "modules/core.yaml", "database:\n  schema_name: core\n")
    settings = load(
        cfg,
        env={"LODESTAR_DATABASE__URL": "postgresql://core:pw@db/lodestar"},
        cli={"database.pool_min_size": 5},
    )
    db = settings.database
    assert db.pool_max_size == 20
    assert db.schema_name == "core"
    assert db.url is not None
    assert db.url.get_secret_value() == "postgresql://core:pw@db/lodestar"
    assert db.pool_min_size == 5


def test_env_is_case_insensitive_and_coerced(cfg: Path) -> None:
    settings = load(
        cfg,
        env={
            "lodestar_port": "9000",
            "LODESTAR_TLS__ENABLED": "true",
            "LODESTAR_TLS__CERT_FILE": "/certs/tls.crt",
            "Lodestar_Tls__Key_File": "/certs/tls.key",
            "LODESTAR_LOG_LEVEL": "warning",
            "LODESTAR_TOKEN": "s3cret",
        },
    )
    assert settings.port == 9000
    assert settings.tls.enabled is True
    assert settings.tls.key_file == Path("/certs/tls.key")
    assert settings.log_level == "WARNING"
    assert settings.token is not None
    assert settings.token.get_secret_value() == "s3cret"


def test_env_json_for_complex_fields(cfg: Path) -> None:
    settings = load(cfg, env={"LODESTAR_TAGS": '["a", "b"]'})
    assert settings.tags == ["a", "b"]


def test_unrelated_env_variables_are_ignored(cfg: Path) -> None:
    env = {
        "LODESTAR_CONFIG_DIR": "/nowhere",
        "LODESTAR_USAGE_BUDGET": "12",
        "LODESTAR_DATABASE__NOT_A_FIELD": "x",
        "LODESTAR_PORT__NESTED": "1",
        "PATH": "/usr/bin",
    }
    assert load(cfg, env=env).port == 7000


def test_config_dir_comes_from_env(tmp_path: Path) -> None:
    write(tmp_path / "elsewhere/modules/core.yaml", "port: 4242\n")
    env = {"LODESTAR_CONFIG_DIR": str(tmp_path / "elsewhere")}
    assert load_settings(CoreSettings, "core", env=env).port == 4242


def test_config_dir_defaults_to_cwd_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "config/lodestar.yaml", "port: 4343\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(CoreSettings, "core", env={}).port == 4343


def test_empty_yaml_file_is_fine(cfg: Path) -> None:
    write(cfg / "lodestar.yaml", "# nothing yet\n")
    assert load(cfg).port == 7000


def test_cli_accepts_nested_mapping(cfg: Path) -> None:
    settings = load(cfg, cli={"limits": {"max_batch": 7}})
    assert settings.limits.max_batch == 7


def test_subclass_defaults_and_base_fields(cfg: Path) -> None:
    settings = load_settings(ServiceSettings, "plain", config_dir=cfg, env={})
    assert settings.port == 50051
    assert settings.metrics_port == 9464
    assert settings.max_message_bytes == 4 * 1024 * 1024


# --- errors name field, value and layer ---------------------------------------------------------


def test_env_error_names_field_value_and_variable(cfg: Path) -> None:
    message = error_of(cfg, env={"LODESTAR_PORT": "abc"})
    assert message.startswith("invalid configuration for core: ")
    assert "port = 'abc' (from environment variable LODESTAR_PORT): " in message
    assert "Input should be a valid integer" in message


def test_yaml_error_names_the_file(cfg: Path) -> None:
    path = write(cfg / "modules/core.yaml", "retention_days: 0\n")
    message = error_of(cfg)
    assert f"retention_days = 0 (from {path})" in message
    assert "greater than or equal to 1" in message


def test_shared_yaml_error_names_the_shared_file(cfg: Path) -> None:
    path = write(cfg / "lodestar.yaml", "database:\n  pool_max_size: 0\n")
    message = error_of(cfg)
    assert f"database.pool_max_size = 0 (from {path})" in message


def test_cli_error_names_the_flag(cfg: Path) -> None:
    message = error_of(cfg, cli={"port": 70000})
    assert "port = 70000 (from command-line flag --port)" in message
    assert "less than or equal to 65535" in message


def test_every_error_is_reported(cfg: Path) -> None:
    write(cfg / "modules/core.yaml", "log_format: xml\n")
    message = error_of(cfg, env={"LODESTAR_SHUTDOWN_GRACE_SECONDS": "-1"}, cli={"port": "x"})
    assert "log_format = 'xml' (from " in message
    assert "shutdown_grace_seconds = '-1' (from environment variable" in message
    assert "port = 'x' (from command-line flag --port)" in message


def test_later_layer_takes_the_blame_for_an_overridden_value(cfg: Path) -> None:
    write(cfg / "modules/core.yaml", "port: 1\n")
    message = error_of(cfg, env={"LODESTAR_PORT": "-5"})
    assert "(from environment variable LODESTAR_PORT)" in message
    assert "core.yaml" not in message


def test_unknown_yaml_key_is_rejected_naming_the_file(cfg: Path) -> None:
    path = write(cfg / "modules/core.yaml", "prot: 1\ndatabase:\n  urll: x\n")
    message = error_of(cfg)
    assert f"unknown setting 'prot' in {path}" in message
    assert f"unknown setting 'database.urll' in {path}" in message


def test_unknown_cli_key_is_rejected(cfg: Path) -> None:
    message = error_of(cfg, cli={"databse.url": "x"})
    assert "unknown setting 'databse.url'" in message
    assert "--set databse.url=" in message


def test_unknown_key_in_cli_mapping_is_rejected(cfg: Path) -> None:
    assert "unknown setting 'limits.nope'" in error_of(cfg, cli={"limits": {"nope": 1}})


def test_yaml_that_does_not_parse_names_the_file(cfg: Path) -> None:
    path = write(cfg / "lodestar.yaml", "port: [1,\n")
    message = error_of(cfg)
    assert str(path) in message
    assert "YAML" in message


def test_yaml_that_is_not_a_mapping_names_the_file(cfg: Path) -> None:
    path = write(cfg / "modules/core.yaml", "- port\n- 1\n")
    assert f"{path} must contain a mapping" in error_of(cfg)


def test_secret_values_are_redacted_in_errors(cfg: Path) -> None:
    write(cfg / "modules/core.yaml", "token: [hunter2]\nlimits:\n  api_secret: [topsecret]\n")
    message = error_of(cfg, env={"LODESTAR_DATABASE__URL": "12"}, cli={"database.url": ["pw9"]})
    assert "hunter2" not in message
    assert "topsecret" not in message
    assert "pw9" not in message
    assert "token = '***'" in message
    assert "limits.api_secret = '***'" in message
    assert "database.url = '***' (from --set database.url=…)" in message


def test_model_level_error_redacts_nested_secrets(cfg: Path) -> None:
    write(cfg / "modules/core.yaml", "database:\n  url: postgresql://u:pw@h/db\n")
    message = error_of(cfg, cli={"database.pool_min_size": 50})
    assert "pool_min_size (50) exceeds pool_max_size (10)" in message
    assert "pw@h" not in message
    assert "--set database.pool_min_size=…" in message


def test_missing_required_field_is_reported(cfg: Path) -> None:
    class Needs(ServiceSettings):
        region: str

    with pytest.raises(ConfigurationError, match=r"region is required but no layer sets it"):
        load_settings(Needs, "needs", config_dir=cfg, env={})


def test_configuration_error_maps_to_failed_precondition(cfg: Path) -> None:
    import grpc

    with pytest.raises(ConfigurationError) as info:
        load(cfg, cli={"port": -1})
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


# --- validation rules ---------------------------------------------------------------------------


def test_tls_enabled_requires_cert_and_key(cfg: Path) -> None:
    message = error_of(cfg, env={"LODESTAR_TLS__ENABLED": "1", "LODESTAR_TLS__CERT_FILE": "/c"})
    assert "tls = " in message
    assert "cert_file and key_file" in message
    assert "environment variable LODESTAR_TLS__ENABLED" in message


def test_tls_model_validation_directly() -> None:
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TlsSettings(enabled=True, key_file=Path("k"))
    ok = TlsSettings(
        enabled=True, cert_file=Path("c"), key_file=Path("k"), client_ca_file=Path("a")
    )
    assert ok.client_ca_file == Path("a")


@pytest.mark.parametrize("name", ["core", "_x", "a" * 63, ""])
def test_valid_schema_names(name: str) -> None:
    assert DatabaseSettings(schema_name=name).schema_name == name


@pytest.mark.parametrize("name", ["Core", "1core", "a-b", "a" * 64, "core;drop"])
def test_invalid_schema_names(name: str) -> None:
    with pytest.raises(ValueError, match="PostgreSQL identifier"):
        DatabaseSettings(schema_name=name)


def test_metrics_port_minus_one_disables_and_below_is_invalid(cfg: Path) -> None:
    assert load(cfg, cli={"metrics_port": -1}).metrics_port == -1
    assert "metrics_port = -2" in error_of(cfg, cli={"metrics_port": -2})


def test_extra_fields_are_forbidden_in_code() -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        ServiceSettings(nope=1)  # type: ignore[call-arg]


# --- redacted dump ------------------------------------------------------------------------------


def test_redacted_dump_hides_secrets_and_is_plain(cfg: Path) -> None:
    settings = load(
        cfg,
        env={
            "LODESTAR_TOKEN": "tok-123",
            "LODESTAR_DATABASE__URL": "postgresql://u:pw@h/db",
            "LODESTAR_LIMITS__API_SECRET": "s",
        },
    )
    dump = redacted_dump(settings)
    text = repr(dump)
    assert "tok-123" not in text
    assert "pw@h" not in text
    assert dump["token"] == "***"
    assert dump["database"]["url"] == "***"
    assert dump["limits"] == {"max_batch": 100, "api_secret": "***"}
    assert dump["spool_dir"] == ".lodestar/spool"
    assert dump["credentials_file"] is None
    assert dump["port"] == 7000
