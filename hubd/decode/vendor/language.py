"""The format language: a YAML definition read, checked and turned into value specs for the reading interpreter.

Every problem is a DefinitionError naming the file, the key (``reading.power_kw.unit``) and what is wrong,
so an operator can fix a definition without reading Python. Checking does no I/O beyond the definition file
and the map files it names.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from hubd.auth.registry import ID_PATTERN
from hubd.decode.registry import Decoder
from hubd.model import QUANTITIES

# A format code is one topic level: the last segment of hub/v1/data/<code>.
CODE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
RESERVED_CODES = {"hub.v1"}


class DefinitionError(Exception):
    """A definition that cannot be used: the file, the key and the problem, for a person."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


# -- units: the factor that turns a vendor unit into the unified one ---------------------------------------------

_POWER = {"W": 0.001, "kW": 1.0, "MW": 1000.0}
_ENERGY = {"Wh": 0.001, "kWh": 1.0, "MWh": 1000.0}
UNITS: dict[str, dict[str, float]] = {
    "power_kw": _POWER,
    "energy_kwh": _ENERGY,
    "energy_interval_kwh": _ENERGY,
    "reactive_power_kvar": {"var": 0.001, "kvar": 1.0, "Mvar": 1000.0},
    "voltage_v": {"mV": 0.001, "V": 1.0, "kV": 1000.0},
    "current_a": {"mA": 0.001, "A": 1.0, "kA": 1000.0},
    "power_factor": {"ratio": 1.0, "%": 0.01},
    "frequency_hz": {"mHz": 0.001, "Hz": 1.0},
    "soc_pct": {"%": 1.0, "ratio": 100.0},
    "interval_s": {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0},
}

# Binary and ECHONET Lite types: struct code and size.
TYPES: dict[str, tuple[str, int]] = {
    "int8": ("b", 1),
    "uint8": ("B", 1),
    "int16": ("h", 2),
    "uint16": ("H", 2),
    "int32": ("i", 4),
    "uint32": ("I", 4),
    "int64": ("q", 8),
    "uint64": ("Q", 8),
    "float32": ("f", 4),
    "float64": ("d", 8),
}
TIME_KINDS = ("epoch_s", "epoch_ms", "rfc3339", "local")

# Reads a path or column reference: (the parsed reference, how messages name it).
PathParser = Callable[["Context", str, Any], tuple[Any, str]]

SourceKind = Literal["path", "column", "field", "epc", "property", "const"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("path", "column", "field", "epc", "property", "const")
# Which sources each kind of payload offers besides property and const.
KIND_SOURCES: dict[str, SourceKind] = {"json": "path", "csv": "column", "binary": "field", "epc": "epc"}


@dataclass(frozen=True)
class Source:
    """Where one value comes from. ``ref`` is kind-specific: a parsed path, a column, a field name, an EPC."""

    kind: SourceKind
    ref: Any
    label: str  # how messages name it: "powr", "column 'import_kwh'", "user property der_id"
    key: str  # where in the definition
    type: str | None = None  # epc: the EDT type
    template: tuple[str, str] | None = None  # property names with {der_id}: (prefix, suffix)


@dataclass(frozen=True)
class Factor:
    """A multiplier taken from the payload: the value itself, its row in ``table``, or 10 to its power."""

    source: Source
    table: Mapping[Any, float] | None = None
    pow10: bool = False
    default: float | None = None
    valid: tuple[float, float] | None = None


@dataclass(frozen=True)
class Number:
    """A quantity: the raw value, not-available markers, the constant factor and the factors from the payload."""

    source: Source
    factor: float = 1.0  # unit * scale * sign, folded at load
    factors: tuple[Factor, ...] = ()
    sentinels: frozenset[Any] = frozenset()
    valid: tuple[float, float] | None = None
    minus: Number | None = None


@dataclass(frozen=True)
class TimeSpec:
    source: Source | None  # None: the hub's clock when it received the message (Limits.now_ms)
    kind: str
    zone: ZoneInfo | None = None
    format: str | None = None
    shift_ms: int = 0
    default_now: bool = False


@dataclass(frozen=True)
class IdSpec:
    source: Source
    map: Mapping[str, str] | None = None
    map_name: str | None = None


@dataclass(frozen=True)
class ReadingSpec:
    """Where each part of a reading comes from, checked."""

    der_id: IdSpec
    password: Source
    measured_at: TimeSpec
    quantities: dict[str, Number]


@dataclass
class FormatDefinition:
    """A loaded definition: its code, what it decodes and the decoder built from it."""

    code: str
    kind: str
    description: str
    path: Path
    decoder: Decoder
    depends: tuple[Path, ...] = ()
    text: str = ""


@dataclass
class Context:
    """What checking one definition needs: the file (for messages) and what its payload kind offers."""

    file: str
    directory: Path
    kind: str  # json | csv | binary | epc
    depends: list[Path] = field(default_factory=list)
    # binary: the names a `field` source may use and whether each is per message (header) or per record
    fields: dict[str, bool] | None = None

    def error(self, key: str, problem: str) -> DefinitionError:
        return DefinitionError(self.file, key, problem)


# -- reading YAML ---------------------------------------------------------------------------------------------------


def read_document(path: Path) -> tuple[dict[str, Any], str]:
    """The definition as a mapping, and its text."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(str(path), "", f"cannot read the file ({exc})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DefinitionError(str(path), "", f"not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(document, dict):
        raise DefinitionError(str(path), "", "a definition must be a YAML mapping")
    return document, text


def check_keys(ctx: Context, where: str, data: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise ctx.error(_join(where, str(key)), f"unknown key (known: {', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in data:
            raise ctx.error(_join(where, key), "required")


def mapping(ctx: Context, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ctx.error(where, f"expected a mapping, got {_show(value)}")
    return value


def number(ctx: Context, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ctx.error(where, f"expected a number, got {_show(value)}")
    return float(value)


def integer(ctx: Context, where: str, value: Any, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(where, f"expected an integer, got {_show(value)}")
    if value < low or (high is not None and value > high):
        raise ctx.error(where, f"must be {low} … {high if high is not None else 'any'}, got {value}")
    return value


def text(ctx: Context, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ctx.error(where, f"expected a non-empty string, got {_show(value)}")
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


# -- sources --------------------------------------------------------------------------------------------------------


def parse_source(ctx: Context, where: str, spec: Mapping[str, Any], parse_path: PathParser) -> Source:
    """The one source key of a value spec (path, column, field, epc, property or const)."""
    offered = KIND_SOURCES[ctx.kind]
    given = [k for k in SOURCE_KINDS if k in spec]
    if len(given) != 1:
        choices = f"{offered}, property or const"
        problem = "says where the value comes from with one of" if not given else "has more than one of"
        raise ctx.error(where, f"{problem} {choices}")
    kind = given[0]
    key = _join(where, kind)
    raw = spec[kind]
    if kind not in (offered, "property", "const"):
        raise ctx.error(key, f"a {ctx.kind} format takes {offered}, property or const, not {kind}")
    if "type" in spec and kind != "epc":
        raise ctx.error(_join(where, "type"), "only an EPC source takes a type (a binary field has it in the layout)")
    if kind == "const":
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ctx.error(key, f"expected a number or a string, got {_show(raw)}")
        return Source("const", raw, f"the constant {_show(raw)}", key)
    if kind == "property":
        name = text(ctx, key, raw)
        template = None
        if "{der_id}" in name:
            prefix, _, suffix = name.partition("{der_id}")
            if "{" in prefix + suffix or "}" in prefix + suffix:
                raise ctx.error(key, "a property name may hold {der_id} once and no other {…}")
            template = (prefix, suffix)
        elif "{" in name or "}" in name:
            raise ctx.error(key, "the only placeholder a property name may hold is {der_id}")
        return Source("property", name, f"user property {name}", key, template=template)
    if kind == "epc":
        epc = _code_number(ctx, key, raw, 0xFF)
        type_name = spec.get("type")
        if type_name not in TYPES or type_name in ("float32", "float64"):
            choices = ", ".join(t for t in TYPES if not t.startswith("float"))
            raise ctx.error(_join(where, "type"), f"an EPC needs type: one of {choices}")
        return Source("epc", epc, f"EPC 0x{epc:02X}", key, type=type_name)
    if kind == "field":
        name = text(ctx, key, raw)
        assert ctx.fields is not None
        if name not in ctx.fields:
            known = ", ".join(ctx.fields) or "none"
            raise ctx.error(key, f"no field {name!r} in the layout (fields: {known})")
        return Source("field", name, f"field {name}", key)
    ref, label = parse_path(ctx, key, raw)
    return Source(kind, ref, label, key)


def _code_number(ctx: Context, where: str, value: Any, high: int) -> int:
    """An EPC or class code written as 0xE0 (a YAML integer) or "0xE0"."""
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ctx.error(where, f"expected a code such as 0xE0, got {_show(value)}") from None
    return integer(ctx, where, value, 0, high)


# -- value specs ----------------------------------------------------------------------------------------------------

_SOURCE_KEYS: set[str] = set(SOURCE_KINDS)


def parse_reading(ctx: Context, where: str, data: Any, parse_path: PathParser) -> ReadingSpec:
    """The ``reading`` mapping: der_id, password, measured_at and the quantities, each with its source."""
    data = mapping(ctx, where, data)
    check_keys(ctx, where, data, {"der_id", "password", "measured_at", *QUANTITIES}, set())
    der_id, password, measured_at = parse_credentials(ctx, where, data, parse_path)
    quantities = parse_quantities(ctx, where, {k: v for k, v in data.items() if k in QUANTITIES}, parse_path)
    return ReadingSpec(der_id, password, measured_at, quantities)


def parse_credentials(
    ctx: Context, where: str, data: Mapping[str, Any], parse_path: PathParser
) -> tuple[IdSpec, Source, TimeSpec]:
    """Whose reading it is, how it is authenticated and when it was measured."""
    check_keys(ctx, where, data, set(data), {"der_id", "password", "measured_at"})
    der_id = _parse_id(ctx, _join(where, "der_id"), data["der_id"], parse_path)
    pw_where = _join(where, "password")
    pw_spec = mapping(ctx, pw_where, data["password"])
    check_keys(ctx, pw_where, pw_spec, _SOURCE_KEYS, set())
    password = parse_source(ctx, pw_where, pw_spec, parse_path)
    if password.kind == "const":
        raise ctx.error(pw_where, "a password is never written in a definition: take it from the payload or a property")
    measured_at = _parse_time(ctx, _join(where, "measured_at"), data["measured_at"], parse_path)
    return der_id, password, measured_at


def parse_quantities(ctx: Context, where: str, data: Mapping[str, Any], parse_path: PathParser) -> dict[str, Number]:
    check_keys(ctx, where, data, set(QUANTITIES), set())
    quantities = {
        name: parse_number(ctx, _join(where, name), data[name], parse_path, name) for name in QUANTITIES if name in data
    }
    if not quantities:
        raise ctx.error(where, f"names no quantity (any of {', '.join(QUANTITIES)})")
    if ("energy_interval_kwh" in quantities) != ("interval_s" in quantities):
        raise ctx.error(where, "energy_interval_kwh and interval_s go together")
    return quantities


def _parse_id(ctx: Context, where: str, data: Any, parse_path: PathParser) -> IdSpec:
    spec = mapping(ctx, where, data)
    check_keys(ctx, where, spec, _SOURCE_KEYS | {"map", "map_file", "type"}, set())
    source = parse_source(ctx, where, spec, parse_path)
    if source.template is not None:
        raise ctx.error(_join(where, "property"), "the DER id cannot depend on itself")
    if "map" in spec and "map_file" in spec:
        raise ctx.error(where, "map and map_file exclude each other")
    if "map" in spec:
        table = _check_map(ctx, _join(where, "map"), mapping(ctx, _join(where, "map"), spec["map"]))
        return IdSpec(source, table, "the map in the definition")
    if "map_file" in spec:
        name = text(ctx, _join(where, "map_file"), spec["map_file"])
        return IdSpec(source, _read_map_file(ctx, _join(where, "map_file"), name), name)
    if source.kind == "const" and not (isinstance(source.ref, str) and ID_PATTERN.match(source.ref)):
        raise ctx.error(source.key, f"{_show(source.ref)} is not a valid DER id")
    return IdSpec(source)


def _check_map(ctx: Context, where: str, table: Mapping[Any, Any]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for vendor_id, der_id in table.items():
        if isinstance(vendor_id, bool) or not isinstance(vendor_id, str | int):
            raise ctx.error(where, f"the vendor id {_show(vendor_id)} is not a string or an integer")
        if not isinstance(der_id, str) or not ID_PATTERN.match(der_id):
            raise ctx.error(_join(where, str(vendor_id)), f"{_show(der_id)} is not a valid DER id")
        checked[str(vendor_id)] = der_id
    return checked


def _read_map_file(ctx: Context, where: str, name: str) -> dict[str, str]:
    """A CSV file ``vendor_id,der_id`` (header first) beside the definition."""
    path = (ctx.directory / name).resolve()
    if path.parent != ctx.directory.resolve():
        raise ctx.error(where, f"{name!r}: a map file is named without folders and lives beside the definition")
    ctx.depends.append(path)
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ctx.error(where, f"cannot read {name} ({exc})") from None
    rows = list(csv.reader(io.StringIO(content)))
    if not rows or [c.strip() for c in rows[0]] != ["vendor_id", "der_id"]:
        raise ctx.error(where, f"{name}: the first line must be the header vendor_id,der_id")
    table: dict[str, str] = {}
    for line, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != 2:
            raise ctx.error(where, f"{name} line {line}: expected 2 columns, got {len(row)}")
        vendor_id, der_id = row[0].strip(), row[1].strip()
        if not ID_PATTERN.match(der_id):
            raise ctx.error(where, f"{name} line {line}: {der_id!r} is not a valid DER id")
        if vendor_id in table:
            raise ctx.error(where, f"{name} line {line}: the vendor id {vendor_id!r} is mapped twice")
        table[vendor_id] = der_id
    return table


def _parse_time(ctx: Context, where: str, data: Any, parse_path: PathParser) -> TimeSpec:
    spec = mapping(ctx, where, data)
    check_keys(ctx, where, spec, _SOURCE_KEYS | {"time", "zone", "format", "shift_s", "default", "type"}, set())
    default_now = False
    if "default" in spec:
        if spec["default"] != "received":
            raise ctx.error(_join(where, "default"), "the only default is 'received' (the hub's clock)")
        default_now = True
    if not any(k in spec for k in SOURCE_KINDS):
        if not default_now:
            raise ctx.error(where, "needs a source (and time:), or default: received")
        return TimeSpec(None, "epoch_ms", default_now=True)
    source = parse_source(ctx, where, spec, parse_path)
    if source.template is not None:
        raise ctx.error(_join(where, "property"), "{der_id} is for passwords")
    kind = spec.get("time")
    if kind not in TIME_KINDS:
        raise ctx.error(_join(where, "time"), f"must be one of {', '.join(TIME_KINDS)}, got {_show(kind)}")
    zone = None
    if kind == "local":
        if "zone" not in spec:
            raise ctx.error(_join(where, "zone"), "required for local times: an IANA zone such as Asia/Tokyo")
        name = text(ctx, _join(where, "zone"), spec["zone"])
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ctx.error(_join(where, "zone"), f"{name!r} is not a known IANA time zone") from None
    elif "zone" in spec:
        raise ctx.error(_join(where, "zone"), "only local times take a zone")
    fmt = None
    if "format" in spec:
        if kind != "local":
            raise ctx.error(_join(where, "format"), "only local times take a format")
        fmt = text(ctx, _join(where, "format"), spec["format"])
        if not re.search(r"%[YyjmdHMS]", fmt) or re.search(r"%[zZ]", fmt):
            raise ctx.error(_join(where, "format"), "a strptime format with %Y, %m, %d … and no zone (%z, %Z)")
    shift_ms = 0
    if "shift_s" in spec:
        shift_ms = round(number(ctx, _join(where, "shift_s"), spec["shift_s"]) * 1000)
    return TimeSpec(source, kind, zone, fmt, shift_ms, default_now)


def parse_number(
    ctx: Context,
    where: str,
    data: Any,
    parse_path: PathParser,
    quantity: str | None,
) -> Number:
    """A numeric value: its source, not-available markers, unit, scale, sign and what to subtract."""
    spec = mapping(ctx, where, data)
    allowed = _SOURCE_KEYS | {"unit", "scale", "sentinels", "valid", "sign", "minus", "type"}
    check_keys(ctx, where, spec, allowed, set())
    source = parse_source(ctx, where, spec, parse_path)
    if source.template is not None:
        raise ctx.error(_join(where, "property"), "{der_id} is for passwords")
    factor = 1.0
    factors: list[Factor] = []
    if "unit" in spec:
        unit_where = _join(where, "unit")
        if quantity is None:
            raise ctx.error(unit_where, "a unit belongs on the quantity, not on the value it is subtracted from")
        table = UNITS[quantity]
        unit = spec["unit"]
        if isinstance(unit, str):
            if unit not in table:
                raise ctx.error(unit_where, f"{quantity} takes {', '.join(table)}, not {unit!r}")
            factor *= table[unit]
        else:
            unit_spec = mapping(ctx, unit_where, unit)
            check_keys(ctx, unit_where, unit_spec, _SOURCE_KEYS, set())
            factors.append(Factor(parse_source(ctx, unit_where, unit_spec, parse_path), table=table))
    scale = spec.get("scale", [])
    for index, entry in enumerate(scale if isinstance(scale, list) else [scale]):
        entry_where = _join(where, "scale") + (f"[{index}]" if isinstance(scale, list) else "")
        if isinstance(entry, int | float) and not isinstance(entry, bool):
            factor *= number(ctx, entry_where, entry)
        else:
            factors.append(_parse_factor(ctx, entry_where, entry, parse_path))
    if "sign" in spec:
        if spec["sign"] not in ("invert", "keep"):
            raise ctx.error(_join(where, "sign"), f"must be invert or keep, got {_show(spec['sign'])}")
        if spec["sign"] == "invert":
            factor = -factor
    sentinels: set[Any] = set()
    if "sentinels" in spec:
        values = spec["sentinels"]
        if not isinstance(values, list) or not values:
            raise ctx.error(_join(where, "sentinels"), "expected a list of the raw values that mean 'not available'")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ctx.error(_join(where, "sentinels"), f"{_show(value)} is not a number or a string")
            sentinels.add(value)
    minus = None
    if "minus" in spec:
        minus = parse_number(ctx, _join(where, "minus"), spec["minus"], parse_path, None)
    return Number(source, factor, tuple(factors), frozenset(sentinels), _valid(ctx, where, spec), minus)


def _valid(ctx: Context, where: str, spec: Mapping[str, Any]) -> tuple[float, float] | None:
    if "valid" not in spec:
        return None
    bounds = spec["valid"]
    key = _join(where, "valid")
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ctx.error(key, "expected [lowest, highest]: raw values outside mean 'not available'")
    low, high = number(ctx, key, bounds[0]), number(ctx, key, bounds[1])
    if low > high:
        raise ctx.error(key, f"the lowest value {low} is above the highest {high}")
    return low, high


def _parse_factor(ctx: Context, where: str, data: Any, parse_path: PathParser) -> Factor:
    spec = mapping(ctx, where, data)
    check_keys(ctx, where, spec, _SOURCE_KEYS | {"table", "pow10", "default", "valid", "type"}, set())
    source = parse_source(ctx, where, spec, parse_path)
    table = None
    if "table" in spec:
        raw = mapping(ctx, _join(where, "table"), spec["table"])
        table = {}
        for key, value in raw.items():
            if isinstance(key, bool) or not isinstance(key, int | str):
                raise ctx.error(_join(where, "table"), f"the key {_show(key)} is not an integer or a string")
            table[key] = number(ctx, _join(_join(where, "table"), str(key)), value)
            table[str(key)] = table[key]  # a CSV column gives text
    pow10 = spec.get("pow10", False)
    if not isinstance(pow10, bool):
        raise ctx.error(_join(where, "pow10"), f"expected true or false, got {_show(pow10)}")
    if pow10 and table is not None:
        raise ctx.error(where, "table and pow10 exclude each other")
    default = number(ctx, _join(where, "default"), spec["default"]) if "default" in spec else None
    return Factor(source, table, pow10, default, _valid(ctx, where, spec))
