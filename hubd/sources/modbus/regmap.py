"""Register maps: a device that speaks no SunSpec, described as data (``drivers/modbus/<name>.yaml``).

A map says where each quantity is (address, holding or input registers), how it is encoded (type, word and
byte order), how it is scaled (a multiplier, or a register holding a power-of-ten exponent), its unit and sign
convention, and which raw values mean "no value". Loading checks all of it; a bad map is refused naming its
file, the key and the problem (docs/operations.md, Modbus sources, has the format).

``plan`` groups the points into as few reads as the device's largest request allows; ``decode`` turns the
registers those reads returned into quantities.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, get_args

import msgspec
import yaml

from hubd.model import QUANTITIES

Order = Literal["big", "little"]
Table = Literal["holding", "input"]
Type = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"]

REGISTERS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "uint64": 4, "float32": 2, "float64": 4}
_STRUCT = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q"}
_STRUCT |= {"float32": "f", "float64": "d"}
# The device's unit → the factor to the quantity's own unit (docs/protocol.md's table of quantities).
UNITS: dict[str, dict[str, float]] = {
    "power_kw": {"W": 0.001, "kW": 1.0, "MW": 1000.0},
    "reactive_power_kvar": {"var": 0.001, "kvar": 1.0},
    "energy_kwh": {"Wh": 0.001, "kWh": 1.0, "MWh": 1000.0},
    "energy_interval_kwh": {"Wh": 0.001, "kWh": 1.0},
    "voltage_v": {"V": 1.0, "kV": 1000.0},
    "current_a": {"A": 1.0, "mA": 0.001},
    "power_factor": {"": 1.0, "%": 0.01},
    "frequency_hz": {"Hz": 1.0},
    "soc_pct": {"%": 1.0},
}
INFO_KEYS = ("maker", "model", "serial", "version")
_ADDRESS = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class PointSpec(_Strict, frozen=True):
    """One quantity (or one text for ``info``) of the device, as written in the map file."""

    address: _ADDRESS
    table: Table = "holding"
    type: Type = "uint16"
    length: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None  # registers of a string
    word_order: Order | None = None  # null: the map's
    byte_order: Order | None = None
    scale: float = 1.0
    scale_register: _ADDRESS | None = None  # an int16 power-of-ten exponent, in the same table
    unit: str | None = None  # null: the quantity's own unit
    invert: bool = False  # the device counts consumption / charging as positive
    not_available: list[int] = []  # raw values that mean "no value"; NaN always does


class MapSpec(_Strict, frozen=True):
    """A register map file."""

    quantities: dict[str, PointSpec]
    description: str = ""
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=125)] = 125  # the most one request may read
    max_gap: Annotated[int, msgspec.Meta(ge=0, le=124)] = 0  # unnamed registers a request may read through
    word_order: Order = "big"
    byte_order: Order = "big"
    info: dict[str, PointSpec] = {}


class MapError(Exception):
    """A register map that cannot be used; the message names the file, the key and the problem."""


@dataclass(frozen=True, slots=True)
class Point:
    key: str  # the quantity, or the info key
    table: Table
    address: int
    size: int
    type: str
    word_order: Order
    byte_order: Order
    factor: float  # scale, times the unit's factor, times -1 when inverted
    scale_register: int | None
    not_available: frozenset[int]


@dataclass(frozen=True, slots=True)
class RegisterMap:
    name: str
    file: Path
    description: str
    max_registers: int
    max_gap: int
    quantities: tuple[Point, ...]
    info: tuple[Point, ...]


@dataclass(frozen=True, slots=True)
class Request:
    table: Table
    address: int
    count: int


_CHOICES = {"type": Type, "table": Table, "word_order": Order, "byte_order": Order}


def _where(error: msgspec.ValidationError, prefix: str = "") -> str:
    """msgspec's error as ``key: problem``: "Expected `int`, got `str` - at `$.address`" → "address: ..."."""
    found = re.fullmatch(r"(?P<what>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?", str(error), re.DOTALL)
    assert found is not None
    what = found["what"]
    unknown = re.fullmatch(r"Object contains unknown field `(?P<name>.*)`", what)
    path = (prefix + (found["path"] or "")).rstrip(".")
    if unknown:
        return f"{path + '.' if path else ''}{unknown['name']}: unknown key"
    choices = _CHOICES.get(path.rsplit(".", 1)[-1])
    if choices is not None and what.startswith("Invalid enum value"):
        what += f" (one of: {', '.join(get_args(choices))})"
    return f"{path or 'map'}: {what}"


def _check(spec: MapSpec, file: Path) -> None:
    def fail(key: str, problem: str) -> MapError:
        return MapError(f"{file}: {key}: {problem}")

    if not spec.quantities:
        raise fail("quantities", "the map names no quantity")
    for name, point in spec.quantities.items():
        key = f"quantities.{name}"
        if name not in QUANTITIES:
            raise fail(key, f"not a quantity of hubd (known: {', '.join(QUANTITIES)})")
        if point.type == "string" or point.length is not None:
            raise fail(f"{key}.type", "a quantity is a number: string and length are for info")
        units = UNITS[name]
        if point.unit is not None and point.unit not in units:
            raise fail(f"{key}.unit", f"must be one of {', '.join(repr(u) for u in units)}, got {point.unit!r}")
        if not math.isfinite(point.scale) or point.scale == 0:
            raise fail(f"{key}.scale", f"must be a finite number other than 0, got {point.scale}")
        if point.address + REGISTERS[point.type] > 65536:
            raise fail(f"{key}.address", f"{point.type} at {point.address} runs past register 65535")
        if point.invert and name not in ("power_kw", "energy_interval_kwh", "reactive_power_kvar", "current_a"):
            raise fail(f"{key}.invert", "only a signed flow (power, interval energy, current) can be inverted")
    for name, point in spec.info.items():
        key = f"info.{name}"
        if name not in INFO_KEYS:
            raise fail(key, f"must be one of {', '.join(INFO_KEYS)}")
        if point.type != "string" or point.length is None:
            raise fail(f"{key}.type", "info is text: type string with a length in registers")


def load_map(file: Path) -> RegisterMap:
    """Read and check one map file; its name is the file's name without ``.yaml``."""
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MapError(f"{file}: cannot read the map: {' '.join(str(exc).split())}") from None
    for section in ("quantities", "info"):  # each entry on its own, so that an error names its key
        entries = data.get(section) if isinstance(data, dict) else None
        for name, entry in entries.items() if isinstance(entries, dict) else ():
            try:
                msgspec.convert(entry, PointSpec)
            except msgspec.ValidationError as exc:
                raise MapError(f"{file}: {_where(exc, f'{section}.{name}.')}") from None
    try:
        spec = msgspec.convert(data, MapSpec)
    except msgspec.ValidationError as exc:
        raise MapError(f"{file}: {_where(exc)}") from None
    _check(spec, file)

    def point(key: str, given: PointSpec, unit_factor: float) -> Point:
        size = given.length if given.type == "string" and given.length else REGISTERS.get(given.type, 1)
        return Point(
            key=key,
            table=given.table,
            address=given.address,
            size=size,
            type=given.type,
            word_order=given.word_order or spec.word_order,
            byte_order=given.byte_order or spec.byte_order,
            factor=given.scale * unit_factor * (-1.0 if given.invert else 1.0),
            scale_register=given.scale_register,
            not_available=frozenset(given.not_available),
        )

    quantities = tuple(
        point(name, given, UNITS[name][given.unit] if given.unit is not None else 1.0)
        for name, given in spec.quantities.items()
    )
    info = tuple(point(name, given, 1.0) for name, given in spec.info.items())
    return RegisterMap(file.stem, file, spec.description, spec.max_registers, spec.max_gap, quantities, info)


def load_maps(folders: Sequence[Path]) -> tuple[dict[str, RegisterMap], dict[str, str]]:
    """Every map in ``folders`` by name (a later folder's map replaces an earlier one of the same name), and
    the refusals of the bad ones by name."""
    maps: dict[str, RegisterMap] = {}
    refused: dict[str, str] = {}
    for folder in folders:
        for file in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            try:
                maps[file.stem] = load_map(file)
                refused.pop(file.stem, None)
            except MapError as exc:
                refused[file.stem] = str(exc)
                maps.pop(file.stem, None)
    return maps, refused


# -- reading and decoding ------------------------------------------------------------------------------------


def _spans(points: Sequence[Point]) -> list[tuple[Table, int, int]]:
    spans = [(p.table, p.address, p.size) for p in points]
    spans += [(p.table, p.scale_register, 1) for p in points if p.scale_register is not None]
    return spans


def plan(points: Sequence[Point], most: int, gap: int = 0) -> list[Request]:
    """The reads that cover ``points`` (and their scale registers): neighbouring registers in one request, as
    long as a request stays within ``most`` registers; a gap of more than ``gap`` registers is never read."""
    requests: list[Request] = []
    for table, address, size in sorted(set(_spans(points))):
        last = requests[-1] if requests else None
        end = address + size
        joined = max(end, last.address + last.count) - last.address if last is not None else 0
        if last is not None and last.table == table and address <= last.address + last.count + gap and joined <= most:
            requests[-1] = Request(table, last.address, joined)
            continue
        requests.append(Request(table, address, size))
    return requests


Registers = Mapping[tuple[Table, int], int]  # (table, address) → register value


def _bytes(point: Point, registers: Registers) -> bytes:
    words = [registers[(point.table, point.address + i)] for i in range(point.size)]
    if point.word_order == "little":
        words.reverse()
    order = "<" if point.byte_order == "little" else ">"
    return b"".join(struct.pack(order + "H", word) for word in words)


def raw(point: Point, registers: Registers) -> int | float | str:
    data = _bytes(point, registers)
    if point.type == "string":
        return data.decode("utf-8", errors="replace").rstrip("\0 ")
    value: int | float = struct.unpack(">" + _STRUCT[point.type], data)[0]
    if point.type == "float32" and math.isfinite(value):
        return float(f"{value:.7g}")  # the digits a float32 holds: 229.5, 59.98, not 59.97999954
    return value


@dataclass(slots=True)
class Decoded:
    values: dict[str, float]
    problems: list[str]


def decode(registers: Registers, register_map: RegisterMap) -> Decoded:
    """The quantities in ``registers``: a not-available value or NaN gives no quantity, never a zero."""
    decoded = Decoded({}, [])
    for point in register_map.quantities:
        value = raw(point, registers)
        assert not isinstance(value, str)
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, int) and value in point.not_available:
            continue
        factor = point.factor
        if point.scale_register is not None:
            exponent = struct.unpack(">h", struct.pack(">H", registers[(point.table, point.scale_register)]))[0]
            if exponent == -32768:  # SunSpec's "not implemented" for a scale factor
                continue
            if abs(exponent) > 10:
                decoded.problems.append(f"{point.key}: scale register {point.scale_register} holds {exponent}")
                continue
            factor *= 10.0**exponent
        decoded.values[point.key] = round(value * factor, 9)
    return decoded


def describe(registers: Registers, register_map: RegisterMap) -> dict[str, str]:
    """What the device says of itself, from the map's ``info`` (maker, model, serial, version)."""
    texts = {point.key: raw(point, registers) for point in register_map.info}
    return {key: text for key, text in texts.items() if isinstance(text, str) and text}
