"""Typed configuration from ``hubd.yaml``, validated at start.

An unknown key, a wrong type or a value out of range stops the daemon with one line naming the key: a typo in a
config file must never silently fall back to a default. Each section is a frozen msgspec struct, so msgspec
checks the types (a bool is not an int, a string is not a number, an int is taken for a float) and the ranges
written beside them with ``Meta``; ``_explain`` turns its error into the dotted key and the value given, and
``_check`` holds the few rules a type cannot say.

A part that needs settings of its own brings a section struct and becomes a field named after it: a store
backend's section is a field of ``StoreConfig`` named after the backend (``sqlite: SqliteConfig``), the
backend's name joining ``StoreConfig.backend``; a source kind's section is likewise a field of ``Config`` named
after the kind. Validation, error messages and defaults follow from the fields; nothing else needs to change.

A key renamed in a release keeps working for a while: ``RENAMED`` maps its old dotted name to the new one, and
a file that still uses the old name is read as if it used the new one, with a warning naming the new key.
"""

from __future__ import annotations

import copy
import os
import re
from datetime import date, datetime
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, get_args, get_origin
from urllib.parse import urlsplit

import msgspec
import yaml
from loguru import logger
from msgspec.structs import replace

from hubd.model import HubError, parse_time

if TYPE_CHECKING:
    import click

# Old dotted key → new dotted key, for keys renamed in a release (a whole section may be renamed too).
RENAMED: dict[str, str] = {}

# Checked by msgspec as the file is read, and named in the error by _explain.
Positive = Annotated[int, msgspec.Meta(gt=0)]
# A two-byte integer that cannot be 0: a TCP port, an MQTT Receive Maximum.
TwoBytes = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What every section is: read-only once loaded, and an unknown key in it is an error, not ignored.

    msgspec passes these settings on to subclasses; each still says ``frozen=True`` so that mypy knows it too.
    """


class BrokerTlsConfig(Section, frozen=True):
    """TLS to the broker (``mqtts://``) beyond the system's CA store: a private CA, a client certificate."""

    ca_file: str | None = None  # trust this CA (PEM) instead of the system's
    cert_file: str | None = None  # present this client certificate (PEM) ...
    key_file: str | None = None  # ... with this key (PEM; default: in cert_file)


class BrokerConfig(Section, frozen=True):
    """Where hubd's MQTT traffic goes. Without ``url`` hubd starts its own local Mosquitto."""

    url: str | None = None
    embedded_port: TwoBytes = 1883
    embedded_bind: str = "127.0.0.1"
    client_id: str = "hubd"
    username: str | None = None
    password_file: str | None = None
    shared_group: str | None = None
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] = 7 * 24 * 3600  # four bytes in CONNECT
    # Messages in hand at once (decoded, waiting for their commit): enough for a commit to gather thousands of
    # one-reading messages under load (store/writer.py); memory is bounded by bytes below. bench/README.md.
    receive_maximum: TwoBytes = 10000
    # And bytes of them: a message of 10,000 readings takes ~10 times its 1.8 MB decoded (bench/README.md).
    max_bytes_in_hand: Positive = 8 * 1024 * 1024
    keepalive_s: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 30  # two bytes in CONNECT
    # Access control at the broker (docs/operations.md, "Access at the broker"): "dynsec" keeps Mosquitto's
    # dynamic-security plugin in step with the registry; it needs username, password_file, admin_password_file.
    access_control: Literal["none", "dynsec", "emqx"] = "none"
    emqx_secret_file: str | None = None  # emqx: EMQX sends "Authorization: Bearer <this>" (hubd.auth.emqx)
    plugin_file: str | None = None  # the plugin's JSON file; default <data_dir>/mosquitto/dynamic-security.json
    admin_username: str = "hubd-admin"
    admin_password_file: str | None = None
    claim_username: str = "claim"  # first contact; its password: the initial password, from claim_password_file
    claim_password_file: str | None = None
    tls: BrokerTlsConfig = BrokerTlsConfig()


class SqliteConfig(Section, frozen=True):
    """The SQLite backend's own settings: the section ``store.sqlite``."""

    path: str | None = None
    synchronous: Literal["full", "normal"] = "full"


class InfluxConfig(Section, frozen=True):
    """The InfluxDB backend's own settings: the section ``store.influxdb`` (docs/operations.md, InfluxDB)."""

    url: str = "http://127.0.0.1:8086"
    database: str = "hubd"
    retention_policy: str | None = None  # None: the database's default
    username: str | None = None
    password_file: str | None = None  # 1.x: the user's password; never in the config itself
    token_file: str | None = None  # 2.x/3.x: an API token, sent as "Authorization: Token ..."
    measurement: str = "readings"
    write_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    query_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    batch_size: Positive = 5000  # points per /write request
    spool_path: str | None = None  # default: <data_dir>/influx-spool.sqlite3
    spool_max_readings: Positive = 5_000_000  # past this, intake waits for the replay (back-pressure)
    retry_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0  # first pause between replay attempts (doubles to 30 s)


class StoreConfig(Section, frozen=True):
    """The readings store. A backend's own settings are a field named after it, as ``sqlite`` here."""

    backend: Literal["sqlite", "influxdb"] = "sqlite"
    sqlite: SqliteConfig = SqliteConfig()
    influxdb: InfluxConfig = InfluxConfig()
    batch_max_readings: Positive = 20000
    queue_max_messages: Positive = 20000


class RateLimitConfig(Section, frozen=True):
    """Registration's failure limits (docs/protocol.md, Registration), and the data path's budget of bcrypt
    checks per DER (docs/protocol.md, Power data)."""

    failures: Positive = 5  # per requester: any failed registration
    global_failures: Positive = 20  # the whole hub: wrong initial passwords, whoever sent them
    window_s: float = 300.0
    # past global_failures, each further wrong initial password pauses all registrations: twice as long each time
    global_backoff_s: float = 60.0
    global_backoff_max_s: float = 3600.0
    der_checks: Positive = 5  # per DER: bcrypt checks of passwords memory does not know, on the data path
    der_window_s: float = 60.0
    source_checks: Positive = 100  # per source id: the same checks, whatever DERs its messages name
    source_window_s: float = 60.0


class AuthConfig(Section, frozen=True):
    initial_password_hash: str | None = None
    registration_mode: Literal["allowlist", "open"] = "allowlist"
    bcrypt_rounds: Annotated[int, msgspec.Meta(ge=4, le=16)] = 10
    rate_limit: RateLimitConfig = RateLimitConfig()


class LimitsConfig(Section, frozen=True):
    max_payload_bytes: Positive = 4 * 1024 * 1024
    max_readings_per_message: Positive = 10000
    max_future_s: float = 300.0
    # The first bytes of a quarantined payload that are kept (with its size and SHA-256): enough to see what was
    # sent; a payload kept whole let 14 messages grow hub.sqlite3 by 495 MiB. At most SQLite's largest blob.
    quarantine_max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1_000_000_000)] = 64 * 1024


class QueryConfig(Section, frozen=True):
    max_limit: Positive = 10000
    default_limit: Positive = 1000
    max_der_ids: Positive = 1000


class WeatherFetchConfig(Section, frozen=True):
    """A weather forecast fetched on a schedule from an Open-Meteo-shaped API, stored for one place."""

    place: str  # the DER area (location.area) the weather is for
    url: str  # the whole request URL, with latitude, longitude and hourly=temperature_2m,shortwave_radiation,...
    every_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 3600.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 30.0


class MarketConfig(Section, frozen=True):
    """Market data beside the readings: price areas, completeness, fetched weather (docs/protocol.md, Settlement)."""

    # A DER's location.area -> its JEPX price area (hokkaido ... kyushu); an area named like a JEPX area needs none.
    price_areas: dict[str, str] = {}
    register_max_gap_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 900.0  # readings further apart: a gap
    weather: list[WeatherFetchConfig] = []


class AuditConfig(Section, frozen=True):
    path: str | None = None
    fsync: bool = False


class FormatsConfig(Section, frozen=True):
    """Where vendor format definitions live and how often the running hub looks for changes."""

    user_dir: str | None = None  # null: <data_dir>/formats
    shipped_dir: str | None = None  # null: the formats/ folder that comes with hubd
    poll_s: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 2.0


class NtpConfig(Section, frozen=True):
    """The hub's own clock, measured against NTP servers (``host`` or ``host:port``); none: not measured."""

    servers: list[str] = []
    poll_s: Annotated[float, msgspec.Meta(ge=0.1, le=86400)] = 64.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    tolerance_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5  # |offset| beyond it: unsynchronised, an alarm
    max_age_s: Annotated[float, msgspec.Meta(gt=0)] = 1024.0  # no good answer for longer: unsynchronised, an alarm


class EdgeClockConfig(Section, frozen=True):
    """The clocks of the sources that send data over MQTT: checked, corrected, judged (docs/protocol.md, Time)."""

    check: bool = True  # send hub/v1/time/check/<source_id> at all
    interval_s: Annotated[float, msgspec.Meta(ge=1)] = 3600.0  # between two checks of one source
    samples: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4  # round trips per check
    answer_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    tolerance_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0  # |offset| beyond it: set, flag
    set_clock: bool = True  # send hub/v1/time/set/<source_id> when a check finds the clock off
    passive_window_s: Annotated[float, msgspec.Meta(ge=1)] = 600.0  # received_at - measured_at minimum over this
    bad_clock: Literal["flag", "refuse"] = "flag"  # readings from a clock known to be off: stored flagged, or refused


class TimeConfig(Section, frozen=True):
    """The section ``time``: the hub's clock (``ntp``) and the sources' clocks (``edges``)."""

    ntp: NtpConfig = NtpConfig()
    edges: EdgeClockConfig = EdgeClockConfig()


class DriversConfig(Section, frozen=True):
    """Where the operator's own device profiles live: register maps in ``<user_dir>/modbus/*.yaml``."""

    user_dir: str | None = None  # null: <data_dir>/drivers


class ModbusSourceConfig(Section, frozen=True, tag_field="kind", tag="modbus"):
    """A device the hub polls over Modbus TCP (docs/operations.md, Modbus sources)."""

    name: str
    host: str
    port: TwoBytes = 502
    unit_id: Annotated[int, msgspec.Meta(ge=0, le=255)] = 1
    poll_s: Annotated[float, msgspec.Meta(ge=0.1, le=86400)] = 10.0
    timeout_s: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 2.0
    reconnect_max_s: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 30.0
    profile: Literal["sunspec"] | None = None
    sunspec_base: Annotated[int, msgspec.Meta(ge=0, le=65533)] | None = None  # null: 40000, 0, then 50000
    map: str | None = None  # a register map's name: drivers/modbus/<map>.yaml
    der: str | None = None  # every quantity of the device to this DER
    ders: dict[str, list[int | str]] = {}  # DER → its SunSpec models: 103, or "802:2" for a second 802
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=125)] = 125

    @property
    def kind(self) -> str:
        return "modbus"


class CloudPushConfig(Section, frozen=True):
    """Where a vendor cloud POSTs data to the hub (docs/operations.md, Cloud sources)."""

    bind: str  # host:port of this source's own HTTP listener
    token_file: str  # the bearer token the cloud must send
    format: str | None = None  # null: the format of the profile's first request
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1, le=64 * 1024 * 1024)] = 1024 * 1024


class CloudSourceConfig(Section, frozen=True, tag_field="kind", tag="cloud"):
    """A vendor-cloud account the hub polls (and may take pushes from) (docs/operations.md, Cloud sources)."""

    name: str
    profile: str  # a cloud profile's name: drivers/cloud/<profile>.yaml
    sites: dict[str, str | dict[str, str]]  # vendor site id → its DER, or its DERs by the profile's roles
    secrets: dict[str, str] = {}  # a secret's name (as the profile names it) → the file that holds it
    base_url: str | None = None  # null: the profile's
    zone: str | None = None  # the vendor's time zone for {start}/{end}; null: the profile's
    start: str | None = None  # RFC 3339: where a site without a cursor begins; null: lookback_s before now
    poll_s: Annotated[float, msgspec.Meta(ge=0.05, le=86400)] = 900.0
    lookback_s: Annotated[float, msgspec.Meta(ge=0, le=31 * 86400)] = 3600.0
    timeout_s: Annotated[float, msgspec.Meta(ge=0.05, le=600)] = 30.0
    retry_min_s: Annotated[float, msgspec.Meta(ge=0.01, le=3600)] = 5.0
    retry_max_s: Annotated[float, msgspec.Meta(ge=0.01, le=86400)] = 900.0
    daily_requests: Annotated[int, msgspec.Meta(ge=1)] | None = None  # null: the profile's
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None  # null: the profile's
    push: CloudPushConfig | None = None

    @property
    def kind(self) -> str:
        return "cloud"


SourceConfig = ModbusSourceConfig | CloudSourceConfig  # the source kinds' sections, told apart by `kind`


class LogConfig(Section, frozen=True):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class HttpConfig(Section, frozen=True):
    """The operator's HTTP listener: /metrics, /healthz, /readyz and the status page (docs/operations.md)."""

    bind: str | None = "127.0.0.1:8780"  # host:port (port 0: a free one); null: no listener
    fresh_s: Positive = 900  # a DER whose last reading is at most this old is fresh on the page, else late
    silent_s: Positive = 3600  # and older than this (or none at all): silent
    session_hours: Annotated[float, msgspec.Meta(gt=0, le=24 * 30)] = 12.0  # a page login lasts this long

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) of ``bind``; an IPv6 host is written in brackets: ``[::1]:8780``."""
        if self.bind is None:
            return None
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def url(self) -> str | None:
        """Where ``hubd status`` asks; a wildcard address is asked on loopback."""
        if self.bind is None:
            return None
        host, _, port = self.bind.rpartition(":")
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        return f"http://{host}:{port}/"


class Config(Section, frozen=True):
    """The whole configuration; every section optional, so an empty file is the embedded default."""

    data_dir: str = "var"
    topic_prefix: str = "hub/v1"
    broker: BrokerConfig = BrokerConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    query: QueryConfig = QueryConfig()
    audit: AuditConfig = AuditConfig()
    formats: FormatsConfig = FormatsConfig()
    log: LogConfig = LogConfig()
    time: TimeConfig = TimeConfig()
    http: HttpConfig = HttpConfig()
    drivers: DriversConfig = DriversConfig()
    sources: list[SourceConfig] = []
    market: MarketConfig = MarketConfig()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def plugin_path(self) -> Path:
        """The broker's dynamic-security file (broker.plugin_file, else beside the embedded broker's files)."""
        return (
            Path(self.broker.plugin_file)
            if self.broker.plugin_file
            else self.data_path / "mosquitto" / "dynamic-security.json"
        )

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

    @property
    def drivers_user_path(self) -> Path:
        return Path(self.drivers.user_dir).expanduser() if self.drivers.user_dir else self.data_path / "drivers"


_ABSENT: Final = object()

# Never echoed in an error, whatever their type: a plain password typed where its hash belongs, a URL with one.
_UNSHOWN = {"auth.initial_password_hash", "broker.url"}


def _get(document: Any, key: str) -> Any:
    """The value at the dotted ``key`` of the parsed YAML, or ``_ABSENT``."""
    for name in key.split("."):
        if not isinstance(document, dict) or name not in document:
            return _ABSENT
        document = document[name]
    return document


def _put(document: dict[str, Any], key: str, value: Any) -> None:
    *sections, name = key.split(".")
    for section in sections:
        if document.get(section) is None:
            document[section] = {}
        document = document[section]
        if not isinstance(document, dict):
            return  # the section itself is not a mapping, which msgspec reports
    document[name] = value


def _rename(document: dict[str, Any], source: str) -> None:
    """Move each renamed key the file still uses to its new name, and say so."""
    for old, new in RENAMED.items():
        value = _get(document, old)
        if value is _ABSENT:
            continue
        if _get(document, new) is not _ABSENT:
            raise ConfigError(f"{old} and {new}: both given; {old} is the old name of {new}, keep only {new}")
        *sections, name = old.split(".")
        del (_get(document, ".".join(sections)) if sections else document)[name]
        _put(document, new, value)
        logger.warning(f"{source}: {old} is deprecated; use {new}")


def _fill_empty_sections(document: dict[str, Any], section: type[Section]) -> None:
    """A section whose keys are all commented out parses as null: it means its defaults, as an absent one does."""
    for field in msgspec.structs.fields(section):
        if isinstance(field.type, type) and issubclass(field.type, Section) and field.name in document:
            if document[field.name] is None:
                document[field.name] = {}
            if isinstance(document[field.name], dict):
                _fill_empty_sections(document[field.name], field.type)


# msgspec's words: "Expected `int`, got `str` - at `$.broker.embedded_port`", "Object contains unknown field
# `ulr` - at `$.broker`", "Expected `str` - at `key` in `$.broker`" (a key that is not a string).
_FAILURE = re.compile(r"(?P<what>.*?)(?: - at (?P<bad_key>`key` in )?`\$(?P<path>[^`]*)`)?", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>.*)`", re.DOTALL)
_EXPECTED = re.compile(r"Expected `(?P<type>[^`]*)`, got `[^`]*`")


_KIND = "kind"
SOURCE_KINDS = [s.__struct_config__.tag for s in get_args(SourceConfig)]


def _dotted(names: list[tuple[str, str]]) -> str:
    return "".join(f"[{index}]" if index else f".{name}" for name, index in names).lstrip(".")


def _explain(error: msgspec.ValidationError, document: Any) -> str:
    """msgspec's error as hubd's one line: the dotted key first, then what it must be and what it was."""
    failure = _FAILURE.fullmatch(str(error))
    assert failure is not None  # the pattern matches any text
    what = failure["what"]
    names = re.findall(r"\.([^.\[]+)|\[(\d+)\]", failure["path"] or "")
    annotation: Any = Config
    value = document
    for name, index in names:
        if index:  # an item of a list (``sources[0]``): of the list's item type
            annotation, value = get_args(annotation)[0], value[int(index)]
            if isinstance(annotation, UnionType) and isinstance(value, dict):  # the source section `kind` names
                sections = {member.__struct_config__.tag: member for member in get_args(annotation)}
                annotation = sections.get(value.get(_KIND), get_args(annotation)[0])
        elif name == _KIND:  # the tag of a source's section
            kinds = " or ".join(repr(kind) for kind in SOURCE_KINDS)
            return f"{_dotted(names)}: must be {kinds}, got {value.get(name)!r}"
        else:
            annotation = {field.name: field.type for field in msgspec.structs.fields(annotation)}[name]
            value = value[name]
    key = _dotted(names)
    unknown = _UNKNOWN.fullmatch(what)
    if unknown or failure["bad_key"]:
        name = unknown["name"] if unknown else next(str(k) for k in value if not isinstance(k, str))
        known = ", ".join(sorted([*annotation.__struct_fields__, *([_KIND] if key.startswith("sources[") else [])]))
        return f"{key + '.' if key else ''}{name}: unknown key (known: {known})"
    where = key or "config"
    shown = f"{type(value).__name__} (value not shown)" if key in _UNSHOWN else repr(value)
    if get_origin(annotation) is Literal:
        return f"{where}: must be {' or '.join(repr(choice) for choice in get_args(annotation))}, got {shown}"
    expected = _EXPECTED.fullmatch(what)
    if expected:
        name = expected["type"].replace(" | ", " or ").replace("object", "a mapping")
        return f"{where}: expected {name}, got {shown}"
    if get_origin(annotation) is Annotated:  # a value of the right type out of its range
        meta = get_args(annotation)[1]
        if meta.gt == 0 and meta.le is None:
            return f"{where}: must be positive, got {shown}"
        if meta.ge is not None and meta.le is not None:
            return f"{where}: must be {meta.ge} … {meta.le}, got {shown}"
    return f"{where}: {what}"


def _valid_broker_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a port that is no number or out of range
    except ValueError:
        return False
    return bool(parts.hostname) and parts.path in ("", "/") and not parts.query and not parts.fragment and port != 0


def ntp_address(server: str) -> tuple[str, int] | None:
    """``host`` or ``host:port`` (an IPv6 address in brackets: ``[::1]:123``) as (host, port); None if neither."""
    try:
        parts = urlsplit(f"ntp://{server}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.query or parts.fragment or "@" in server or port == 0:
        return None
    return parts.hostname, 123 if port is None else port


def _check(config: Config) -> None:
    """Rules a type cannot say."""
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
    if config.broker.access_control == "dynsec":
        missing = [k for k in ("username", "password_file", "admin_password_file") if not getattr(config.broker, k)]
        if missing:
            raise ConfigError(f"broker.access_control dynsec needs broker.{missing[0]}")
    if config.broker.access_control == "emqx":  # EMQX asks hubd's HTTP listener (hubd.auth.emqx)
        missing = [k for k in ("url", "username", "password_file", "emqx_secret_file") if not getattr(config.broker, k)]
        if missing or config.http.bind is None:
            raise ConfigError(f"broker.access_control emqx needs {f'broker.{missing[0]}' if missing else 'http.bind'}")
    influx = config.store.influxdb
    if "@" in influx.url:
        raise ConfigError("store.influxdb.url: no user or password in the URL; use username and password_file")
    if not influx.url.startswith(("http://", "https://")):
        raise ConfigError("store.influxdb.url: must start with http:// or https://")
    if influx.password_file and influx.token_file:
        raise ConfigError("store.influxdb: give password_file (1.x) or token_file (2.x, 3.x), not both")
    for server in config.time.ntp.servers:
        if ntp_address(server) is None:
            raise ConfigError(f"time.ntp.servers: {server!r} must be host or host:port with a port 1 … 65535")
    bind = config.http.bind
    if bind is not None and not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(0|[1-9][0-9]{0,4})", bind):
        raise ConfigError(f"http.bind: must be host:port (an IPv6 host in brackets), got {bind!r}")
    if bind is not None and int(bind.rpartition(":")[2]) > 65535:
        raise ConfigError(f"http.bind: the port must be 0 … 65535, got {bind!r}")
    if config.http.silent_s < config.http.fresh_s:
        raise ConfigError("http.silent_s: must be at least http.fresh_s")
    _check_sources(config)
    _check_market(config)
    if config.topic_prefix.endswith("/") or "#" in config.topic_prefix or "+" in config.topic_prefix:
        raise ConfigError(
            f"topic_prefix: must be a plain topic without wildcards or a trailing /, got {config.topic_prefix!r}"
        )


def _check_sources(config: Config) -> None:
    """A source's rules no type says: unique names, one profile or map, one way of naming its DERs."""
    names: set[str] = set()
    for index, source in enumerate(config.sources):
        key = f"sources[{index}]"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", source.name):
            raise ConfigError(f"{key}.name: must be 1-64 characters of letters, digits and ._:-, got {source.name!r}")
        if source.name in names:
            raise ConfigError(f"{key}.name: {source.name!r} names another source too; each needs its own name")
        names.add(source.name)
        if isinstance(source, CloudSourceConfig):
            _check_cloud(source, key)
            continue
        if (source.profile is None) == (source.map is None):
            raise ConfigError(f"{key}: give either profile: sunspec or map: <register map name>")
        if (source.der is None) == (not source.ders):
            raise ConfigError(f"{key}: give either der: <DER id> or ders: {{<DER id>: [<SunSpec model>, ...]}}")
        for der_id, models in source.ders.items():
            for model in models:
                if not re.fullmatch(r"[0-9]{1,5}(:[1-9][0-9]{0,2})?", str(model)):
                    raise ConfigError(
                        f"{key}.ders.{der_id}: {model!r} is no SunSpec model (103, or 802:2 for a second)"
                    )
        if source.ders and source.profile != "sunspec":
            raise ConfigError(f"{key}.ders: DERs by SunSpec model need profile: sunspec; a map's device is one der")


def _check_cloud(source: CloudSourceConfig, key: str) -> None:
    """A cloud source's rules no type says (its profile is checked when the hub loads it)."""
    if not source.sites:
        raise ConfigError(f"{key}.sites: give at least one site: {{<vendor site id>: <DER id>}}")
    for site, ders in source.sites.items():
        if not ders or (isinstance(ders, dict) and not all(ders.values())):
            raise ConfigError(f"{key}.sites.{site}: give a DER id, or {{<role>: <DER id>, ...}}")
    if source.retry_max_s < source.retry_min_s:
        raise ConfigError(f"{key}.retry_max_s: must be at least retry_min_s")
    if source.base_url is not None and (
        not source.base_url.startswith(("http://", "https://")) or "@" in source.base_url
    ):
        raise ConfigError(f"{key}.base_url: must be http(s)://host[:port][/path] without a user or password")
    if source.start is not None:
        try:
            parse_time(source.start, f"{key}.start")
        except HubError as exc:
            raise ConfigError(exc.message) from None
    push = source.push
    if push is not None and not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}", push.bind):
        raise ConfigError(f"{key}.push.bind: must be host:port, got {push.bind!r}")


def _check_market(config: Config) -> None:
    from hubd.market.jepx import AREAS  # here: hubd.market imports the config

    for area, price_area in config.market.price_areas.items():
        if price_area not in AREAS:
            raise ConfigError(f"market.price_areas.{area}: {price_area!r} is no JEPX area ({', '.join(AREAS)})")
    for index, fetch in enumerate(config.market.weather):
        if not fetch.url.startswith(("http://", "https://")):
            raise ConfigError(f"market.weather[{index}].url: must start with http:// or https://")


def _yaml_times(document: dict[str, Any]) -> None:
    """A cloud source's ``start`` written unquoted (``start: 2026-11-01T00:00:00Z``) is a YAML timestamp: taken
    as the same RFC 3339 text when it has a zone; without one (or a bare date) it is refused, named."""
    sources = document.get("sources")
    for index, entry in enumerate(sources if isinstance(sources, list) else []):
        value = entry.get("start") if isinstance(entry, dict) else None
        if isinstance(value, datetime) and value.tzinfo is not None:
            entry["start"] = value.isoformat()
        elif isinstance(value, date):
            raise ConfigError(
                f"sources[{index}].start: {value.isoformat()} has no time zone; write one (2026-11-01T00:00:00Z)"
            )


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a parsed YAML document into a Config; ``source`` begins every message (the file, usually)."""
    document = {} if data is None else copy.deepcopy(data)  # an empty file is the embedded default
    try:
        if isinstance(document, dict):
            _rename(document, source)
            _fill_empty_sections(document, Config)
            _yaml_times(document)
        try:
            config = msgspec.convert(document, Config)
        except msgspec.ValidationError as exc:
            raise ConfigError(_explain(exc, document)) from None
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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not a YAML file (not UTF-8 text: byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML ({_yaml_problem(exc)})") from None
    return _anchored(parse_config(data, str(file)), file.parent)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message in one line: its own spans several, with a picture of the line, which would split the
    one-line error an operator gets (and the journal's record of it)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _anchored(config: Config, folder: Path) -> Config:
    """Relative paths are relative to the config file, not to wherever hubd was started from."""

    def anchored(path: str) -> str:
        return path if Path(path).expanduser().is_absolute() else str((folder / path).resolve())

    def maybe(path: str | None) -> str | None:
        return anchored(path) if path else path

    return replace(
        config,
        data_dir=anchored(config.data_dir),
        store=replace(
            config.store,
            sqlite=replace(config.store.sqlite, path=maybe(config.store.sqlite.path)),
            influxdb=replace(
                config.store.influxdb,
                password_file=maybe(config.store.influxdb.password_file),
                token_file=maybe(config.store.influxdb.token_file),
                spool_path=maybe(config.store.influxdb.spool_path),
            ),
        ),
        audit=replace(config.audit, path=maybe(config.audit.path)),
        formats=replace(
            config.formats, user_dir=maybe(config.formats.user_dir), shipped_dir=maybe(config.formats.shipped_dir)
        ),
        drivers=replace(config.drivers, user_dir=maybe(config.drivers.user_dir)),
        sources=[_anchored_cloud(source, anchored) for source in config.sources],
    )


def _anchored_cloud(source: SourceConfig, anchored: Any) -> SourceConfig:
    """A cloud source's secret and token files, relative to the config file too."""
    if not isinstance(source, CloudSourceConfig):
        return source
    push = source.push and replace(source.push, token_file=anchored(source.push.token_file))
    return replace(source, secrets={k: anchored(v) for k, v in source.secrets.items()}, push=push)


def read_secret(path: str | None) -> str | None:
    """A password, token or key from the file a ``*_file`` key names (one line; surrounding blanks dropped), or
    None when no file is named. Never logged by the hub."""
    return Path(path).read_text(encoding="utf-8").strip() if path else None


def command_config(ctx: click.Context) -> Config:
    """The config of the ``hubd`` command being run: loaded once, when first asked, by the root command's context
    (``hubd --config``), for every subcommand group alike."""
    config: Config = ctx.find_root().obj.config
    return config
