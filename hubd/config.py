"""Typed configuration from ``hubd.yaml``, validated at start.

An unknown key, a wrong type or a missing required value stops the daemon with one message naming the
key: a typo in a config file must never silently fall back to a default.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


@dataclass(frozen=True)
class BrokerConfig:
    """Where hubd's MQTT traffic goes. Without ``url`` hubd starts its own local Mosquitto."""

    url: str | None = None
    embedded_port: int = 1883
    embedded_bind: str = "127.0.0.1"
    client_id: str = "hubd"
    username: str | None = None
    password_file: str | None = None
    shared_group: str | None = None
    session_expiry_s: int = 7 * 24 * 3600
    # Messages in hand at once (decoded, waiting for their commit): enough for a commit to gather thousands of
    # one-reading messages under load (store/writer.py); memory is bounded by bytes below. bench/README.md.
    receive_maximum: int = 10000
    # And bytes of them: a message of 10,000 readings takes ~10 times its 1.8 MB decoded (bench/README.md).
    max_bytes_in_hand: int = 8 * 1024 * 1024
    keepalive_s: int = 30


@dataclass(frozen=True)
class SqliteConfig:
    path: str | None = None
    synchronous: Literal["full", "normal"] = "full"


@dataclass(frozen=True)
class StoreConfig:
    backend: Literal["sqlite"] = "sqlite"
    sqlite: SqliteConfig = field(default_factory=SqliteConfig)
    batch_max_readings: int = 20000
    queue_max_messages: int = 20000


@dataclass(frozen=True)
class RateLimitConfig:
    failures: int = 5
    window_s: float = 300.0


@dataclass(frozen=True)
class AuthConfig:
    initial_password_hash: str | None = None
    registration_mode: Literal["allowlist", "open"] = "allowlist"
    bcrypt_rounds: int = 10
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)


@dataclass(frozen=True)
class LimitsConfig:
    max_payload_bytes: int = 4 * 1024 * 1024
    max_readings_per_message: int = 10000
    max_future_s: float = 300.0


@dataclass(frozen=True)
class QueryConfig:
    max_limit: int = 10000
    default_limit: int = 1000
    max_der_ids: int = 1000


@dataclass(frozen=True)
class AuditConfig:
    path: str | None = None
    fsync: bool = False


@dataclass(frozen=True)
class FormatsConfig:
    """Where vendor format definitions live and how often the running hub looks for changes."""

    user_dir: str | None = None  # null: <data_dir>/formats
    shipped_dir: str | None = None  # null: the formats/ folder that comes with hubd
    poll_s: float = 2.0


@dataclass(frozen=True)
class LogConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(frozen=True)
class Config:
    """The whole configuration; every section optional, so an empty file is the embedded default."""

    data_dir: str = "var"
    topic_prefix: str = "hub/v1"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    formats: FormatsConfig = field(default_factory=FormatsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def registry_path(self) -> Path:
        return self.data_path / "hub.sqlite3"

    @property
    def readings_path(self) -> Path:
        return Path(self.store.sqlite.path) if self.store.sqlite.path else self.data_path / "readings.sqlite3"

    @property
    def audit_path(self) -> Path:
        return Path(self.audit.path) if self.audit.path else self.data_path / "audit.jsonl"

    @property
    def formats_user_path(self) -> Path:
        return Path(self.formats.user_dir).expanduser() if self.formats.user_dir else self.data_path / "formats"

    @property
    def formats_shipped_path(self) -> Path:
        if self.formats.shipped_dir:
            return Path(self.formats.shipped_dir).expanduser()
        return Path(__file__).resolve().parent / "formats"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name, spec in known.items():
        where = f"{prefix}.{name}" if prefix else name
        if name in data:
            values[name] = _convert(data[name], hints[name], where)
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(f"{where}: required")
    return cls(**values)


def _valid_broker_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a port that is no number or out of range
    except ValueError:
        return False
    return bool(parts.hostname) and parts.path in ("", "/") and not parts.query and not parts.fragment and port != 0


def _check(config: Config) -> None:
    """Rules a type cannot say."""
    positive = {
        "broker.embedded_port": config.broker.embedded_port,
        "broker.receive_maximum": config.broker.receive_maximum,
        "broker.max_bytes_in_hand": config.broker.max_bytes_in_hand,
        "store.batch_max_readings": config.store.batch_max_readings,
        "store.queue_max_messages": config.store.queue_max_messages,
        "limits.max_payload_bytes": config.limits.max_payload_bytes,
        "limits.max_readings_per_message": config.limits.max_readings_per_message,
        "query.max_limit": config.query.max_limit,
        "query.default_limit": config.query.default_limit,
        "query.max_der_ids": config.query.max_der_ids,
        "auth.rate_limit.failures": config.auth.rate_limit.failures,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 4 <= config.auth.bcrypt_rounds <= 16:
        raise ConfigError(f"auth.bcrypt_rounds: must be 4 … 16, got {config.auth.bcrypt_rounds}")
    if config.broker.receive_maximum > 65535:
        raise ConfigError("broker.receive_maximum: must be at most 65535")
    hashed = config.auth.initial_password_hash
    if hashed is not None and not hashed.startswith(("$2a$", "$2b$", "$2y$")):
        raise ConfigError(
            "auth.initial_password_hash: must be a bcrypt hash (make one with `hubd hash-password`), "
            "never the password itself"
        )
    # The URL is logged and audited: it may hold no user or password, and is never echoed in an error.
    url = config.broker.url
    if url is not None:
        if "@" in url:
            raise ConfigError(
                "broker.url: no user or password in the URL; use broker.username and broker.password_file"
            )
        if not url.startswith(("mqtt://", "mqtts://")):
            raise ConfigError("broker.url: must start with mqtt:// or mqtts://")
        if not _valid_broker_url(url):
            raise ConfigError("broker.url: must be mqtt[s]://host[:port] with a port number 1 … 65535")
    if not 0.1 <= config.formats.poll_s <= 3600:
        raise ConfigError(f"formats.poll_s: must be 0.1 … 3600 seconds, got {config.formats.poll_s}")
    if config.topic_prefix.endswith("/") or "#" in config.topic_prefix or "+" in config.topic_prefix:
        raise ConfigError(
            f"topic_prefix: must be a plain topic without wildcards or a trailing /, got {config.topic_prefix!r}"
        )


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a parsed YAML document into a Config."""
    try:
        config: Config = _build(Config, data, "")
        _check(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``path``, else ``$HUBD_CONFIG``, else the embedded default (no file at all)."""
    chosen = path or os.environ.get("HUBD_CONFIG")
    if not chosen:
        return parse_config({}, "embedded default")
    file = Path(chosen)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML ({exc})") from None
    config = parse_config(data, str(file))

    # Relative paths are relative to the config file, not to wherever hubd was started from.
    def anchored(path: str) -> str:
        return path if Path(path).expanduser().is_absolute() else str((file.parent / path).resolve())

    config = replace(config, data_dir=anchored(config.data_dir))
    if config.store.sqlite.path:
        config = replace(
            config,
            store=replace(config.store, sqlite=replace(config.store.sqlite, path=anchored(config.store.sqlite.path))),
        )
    if config.audit.path:
        config = replace(config, audit=replace(config.audit, path=anchored(config.audit.path)))
    if config.formats.user_dir:
        config = replace(config, formats=replace(config.formats, user_dir=anchored(config.formats.user_dir)))
    if config.formats.shipped_dir:
        config = replace(config, formats=replace(config.formats, shipped_dir=anchored(config.formats.shipped_dir)))
    return config
