"""Layered, validated configuration shared by every Lodestar service.

Layers, lowest first: model defaults < ``<config_dir>/lodestar.yaml`` <
``<config_dir>/modules/<module>.yaml`` < ``LODESTAR_*`` environment variables < command-line
flags. Every leaf value remembers the layer that supplied it, so that a validation error can say
which file, variable or flag to fix.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, to_jsonable_python

from lodestar.common.errors import ConfigurationError
from lodestar.common.ratelimit import RateLimitSettings

ENV_PREFIX = "LODESTAR_"
CONFIG_DIR_ENV = "LODESTAR_CONFIG_DIR"
DEFAULT_LAYER = "default"
REDACTED = "***"

_SECRET_NAME = re.compile(r"token|password|secret|url", re.IGNORECASE)
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MAX_VALUE_CHARS = 200

Key = tuple[str, ...]


class TlsSettings(BaseModel):
    """TLS for a gRPC server (and its clients)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = Field(
        default=None,
        description="When set, mutual TLS: clients must present a certificate signed by this CA.",
    )
    server_name_override: str | None = Field(
        default=None, description="Client side: the name expected in the server certificate."
    )

    @model_validator(mode="after")
    def _enabled_needs_key_pair(self) -> Self:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("TLS is enabled but cert_file and key_file are not both set")
        return self


class DatabaseSettings(BaseModel):
    """The PostgreSQL connection pool of a service."""

    model_config = ConfigDict(extra="forbid")

    url: SecretStr | None = None
    schema_name: str = ""
    pool_min_size: int = Field(default=1, ge=1)
    pool_max_size: int = Field(default=10, ge=1)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    #: Prepared statements cached per connection; 0 behind a transaction-pooling PgBouncer
    #: older than 1.21, which cannot keep a statement across transactions.
    statement_cache_size: int = Field(default=100, ge=0)

    @field_validator("schema_name")
    @classmethod
    def _valid_schema_name(cls, value: str) -> str:
        if value and not _SCHEMA_NAME.fullmatch(value):
            raise ValueError(
                "must be a lower-case PostgreSQL identifier matching ^[a-z_][a-z0-9_]{0,62}$"
            )
        return value

    @model_validator(mode="after")
    def _pool_bounds(self) -> Self:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError(
                f"pool_min_size ({self.pool_min_size}) exceeds pool_max_size ({self.pool_max_size})"
            )
        return self


class ServiceSettings(BaseModel):
    """Settings every service has; a service subclasses this to add its own."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535, description="0 picks a free port.")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(
        default=9464, ge=-1, le=65535, description="-1 disables metrics, 0 picks a free port."
    )
    health_port: int = Field(
        default=-1,
        ge=-1,
        le=65535,
        description="Plaintext health-only port for kubelet probes when gRPC uses TLS; -1 off.",
    )
    core_endpoint: str = "127.0.0.1:50051"
    token: SecretStr | None = Field(
        default=None, description="This service's credential for calling core."
    )
    credentials_file: Path | None = Field(
        default=None, description="YAML file of the tokens this service accepts."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    shutdown_grace_seconds: float = Field(default=10.0, gt=0)
    max_connection_age_seconds: float = Field(default=300.0, gt=0)
    keepalive_time_seconds: float = Field(default=30.0, gt=0)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    spool_dir: Path = Path(".lodestar/spool")
    tls: TlsSettings = Field(default_factory=TlsSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    rate_limits: RateLimitSettings = Field(
        default_factory=RateLimitSettings,
        description="Per-principal token buckets, by role and by principal name.",
    )
    migrate_on_start: bool = Field(
        default=True, description="Apply the service's pending migrations when it starts."
    )

    #: Schema used when the configuration names none.
    default_schema: ClassVar[str] = ""

    @model_validator(mode="after")
    def _schema_default(self) -> Self:
        if not self.database.schema_name and self.default_schema:
            self.database.schema_name = self.default_schema
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


S = TypeVar("S", bound=ServiceSettings)


class _Layers:
    """Deep-merged raw values plus, for every leaf, the layer that supplied it."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[Key, str] = {}

    def apply(self, values: Mapping[str, Any], layer: str, prefix: Key = ()) -> None:
        """Merge ``values`` over what earlier layers supplied."""
        target = self._container(prefix)
        for key, value in values.items():
            path = (*prefix, key)
            if isinstance(value, Mapping) and isinstance(target.get(key), dict):
                self.apply(value, layer, path)
                continue
            self._forget(path)
            if isinstance(value, Mapping):
                target[key] = {}
                self.apply(value, layer, path)
            else:
                target[key] = value
                self.origin[path] = layer

    def set(self, path: Key, value: Any, layer: str) -> None:
        """Set one (possibly nested) key."""
        nested: Any = value
        for part in reversed(path[1:]):
            nested = {part: nested}
        self.apply({path[0]: nested}, layer, ())

    def layers_under(self, path: Key) -> list[str]:
        """The distinct layers that supplied ``path`` or anything below it."""
        if path in self.origin:
            return [self.origin[path]]
        found = [layer for key, layer in self.origin.items() if key[: len(path)] == path]
        return list(dict.fromkeys(found))

    def _container(self, prefix: Key) -> dict[str, Any]:
        node = self.data
        for part in prefix:
            node = node[part]
        return node

    def _forget(self, path: Key) -> None:
        for key in [k for k in self.origin if k[: len(path)] == path]:
            del self.origin[key]


def load_settings(
    settings_cls: type[S],
    module: str,
    *,
    config_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> S:
    """Load ``settings_cls`` for ``module`` from every layer.

    Raises ConfigurationError naming each bad field, its value and the layer that supplied it.
    """
    environ = os.environ if env is None else env
    directory = config_dir if config_dir is not None else _default_config_dir(environ)
    layers = _Layers()
    problems: list[str] = []
    for path in (directory / "lodestar.yaml", directory / "modules" / f"{module}.yaml"):
        problems += _apply_yaml(layers, settings_cls, path)
    _apply_env(layers, settings_cls, environ)
    problems += _apply_cli(layers, settings_cls, cli or {})
    if problems:
        raise ConfigurationError(f"invalid configuration for {module}: " + "; ".join(problems))
    try:
        return settings_cls.model_validate(layers.data)
    except ValidationError as exc:
        described = [_describe(err, layers, settings_cls) for err in exc.errors()]
        message = f"invalid configuration for {module}: " + "; ".join(described)
        raise ConfigurationError(message) from None


def redacted_dump(settings: BaseModel) -> dict[str, Any]:
    """The settings as a plain dict that is safe to log: secrets become ``'***'``."""
    out: dict[str, Any] = {}
    for name in type(settings).model_fields:
        out[name] = _redacted_value(name, getattr(settings, name))
    return out


def _redacted_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, BaseModel):
        return redacted_dump(value)
    if isinstance(value, SecretStr) or _SECRET_NAME.search(name):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): _redacted_value(str(k), v) for k, v in value.items()}
    return to_jsonable_python(value)


def _default_config_dir(environ: Mapping[str, str]) -> Path:
    for key, value in environ.items():
        if key.upper() == CONFIG_DIR_ENV and value:
            return Path(value)
    return Path("config")


# --- reading the layers -------------------------------------------------------------------------


def _apply_yaml(layers: _Layers, model: type[BaseModel], path: Path) -> list[str]:
    if not path.is_file():
        return []
    label = str(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        return [f"{label} could not be read as YAML: {_one_line(str(exc))}"]
    if loaded is None:
        return []
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        return [f"{label} must contain a mapping of setting names to values"]
    unknown = list(_unknown_keys(model, loaded))
    if unknown:
        return [f"unknown setting {'.'.join(key)!r} in {label}" for key in unknown]
    layers.apply(loaded, label)
    return []


def _apply_env(layers: _Layers, model: type[BaseModel], environ: Mapping[str, str]) -> None:
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_DIR_ENV:
            continue
        raw = upper[len(ENV_PREFIX) :].lower().split("__")
        resolved = _resolve(model, raw)
        if resolved is None:
            continue
        path, field = resolved
        layers.set(path, _env_value(environ[name], field), f"environment variable {name}")


#: Settings that service commands take as flags of their own; the rest come from ``--set``.
CLI_FLAGS = frozenset({"port", "host"})


def _apply_cli(layers: _Layers, model: type[BaseModel], cli: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for dotted, value in cli.items():
        parts = dotted.split(".")
        label = f"command-line flag --{dotted}" if dotted in CLI_FLAGS else f"--set {dotted}=…"
        resolved = _resolve(model, parts, exact_case=True)
        if resolved is None:
            problems.append(f"unknown setting {dotted!r} given as {label}")
            continue
        path, field = resolved
        sub = _submodel(field.annotation)
        if isinstance(value, Mapping) and sub is not None:
            unknown = list(_unknown_keys(sub, value))
            if unknown:
                problems += [
                    f"unknown setting {'.'.join((*path, *k))!r} in {label}" for k in unknown
                ]
                continue
        layers.set(path, value, label)
    return problems


def _env_value(raw: str, field: FieldInfo) -> Any:
    """Env values are strings; complex fields (lists, dicts, models) may be given as JSON."""
    if not _is_complex(field.annotation):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


# --- walking the model --------------------------------------------------------------------------


def _resolve(
    model: type[BaseModel], parts: list[str], *, exact_case: bool = False
) -> tuple[Key, FieldInfo] | None:
    """The canonical path and field for ``parts``, or None if it is not a field of ``model``."""
    current: type[BaseModel] | None = model
    path: list[str] = []
    field: FieldInfo | None = None
    for part in parts:
        if current is None:
            return None
        name = _field_name(current, part, exact_case=exact_case)
        if name is None:
            return None
        field = current.model_fields[name]
        path.append(name)
        current = _submodel(field.annotation)
    if field is None:
        return None
    return tuple(path), field


def _field_name(model: type[BaseModel], part: str, *, exact_case: bool) -> str | None:
    if part in model.model_fields:
        return part
    if exact_case:
        return None
    lowered = {name.lower(): name for name in model.model_fields}
    return lowered.get(part.lower())


def _unknown_keys(model: type[BaseModel], values: Mapping[Any, Any]) -> Iterator[Key]:
    """Keys in ``values`` (recursively) that are not fields of ``model``."""
    for key, value in values.items():
        if not isinstance(key, str) or key not in model.model_fields:
            yield (str(key),)
            continue
        sub = _submodel(model.model_fields[key].annotation)
        if sub is not None and isinstance(value, Mapping):
            for inner in _unknown_keys(sub, value):
                yield (key, *inner)


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The nested model type of a field, if it is one (``Model`` or ``Model | None``)."""
    models = [
        a for a in _union_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)
    ]
    return models[0] if len(models) == 1 else None


def _is_complex(annotation: Any) -> bool:
    for arg in _union_args(annotation):
        origin = typing.get_origin(arg) or arg
        if isinstance(origin, type) and issubclass(origin, list | dict | set | tuple | BaseModel):
            return True
    return False


def _is_secret_field(model: type[BaseModel], path: Key) -> bool:
    resolved = _resolve(model, list(path), exact_case=True)
    if resolved is None:
        return False
    return any(a is SecretStr for a in _union_args(resolved[1].annotation))


# --- describing errors --------------------------------------------------------------------------


def _describe(err: ErrorDetails, layers: _Layers, model: type[BaseModel]) -> str:
    path = tuple(str(part) for part in err["loc"])
    dotted = ".".join(path) or "<root>"
    reason = err["msg"]
    if err["type"] == "missing":
        return f"{dotted} is required but no layer sets it: {reason}"
    origins = layers.layers_under(path) or [DEFAULT_LAYER]
    value = _show_value(path, err.get("input"), model)
    return f"{dotted} = {value} (from {', '.join(origins)}): {reason}"


def _show_value(path: Key, value: Any, model: type[BaseModel]) -> str:
    if _needs_redaction(path, model):
        return repr(REDACTED)
    text = repr(_redact_nested(value))
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _needs_redaction(path: Key, model: type[BaseModel]) -> bool:
    if any(_SECRET_NAME.search(part) for part in path):
        return True
    return any(_is_secret_field(model, path[:i]) for i in range(1, len(path) + 1))


def _redact_nested(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _SECRET_NAME.search(str(k)) else _redact_nested(v)
            for k, v in value.items()
        }
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split())
