"""SunSpec: find a device's models and decode them with the definitions shipped in ``pysunspec2``.

Nothing here is a hand-typed table of registers: a model's points (their order, sizes, types, scale-factor
references, repeating groups, enumerations) come from the model's JSON definition in the ``sunspec2`` package,
and the codecs and "not implemented" values from ``sunspec2.mb``. What *is* written here is the small table
``QUANTITIES``: which point of which model is which of hubd's unified quantities (docs/operations.md, Modbus
sources, shows it).

Discovery needs only a function that reads holding registers, so the same code serves the hub's poll loop,
``hubd source test`` and the tests.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from sunspec2 import mb as sunspec_codec  # type: ignore[import-untyped]
from sunspec2.device import get_model_def  # type: ignore[import-untyped]

from hubd.sources.modbus.client import NoAnswer

MARKER = (0x5375, 0x6E53)  # "SunS"
BASES = (40000, 0, 50000)  # where the marker may be, in the order the specification says to look
END_ID = 0xFFFF
LARGEST_SCALE = 10  # a scale factor beyond ±10 is no power of ten a device means (SunSpec: -10 … 10)
MOST_MODELS = 200  # a chain longer than this is a device answering nonsense, not a real SunSpec map

Read = Callable[[int, int], Awaitable[list[int]]]
"""Read ``count`` holding registers from ``address``."""


class NotSunSpec(Exception):
    """The device has no SunSpec marker where the specification says, or a model chain that makes no sense."""


# -- definitions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointDef:
    name: str
    type: str
    size: int  # registers
    sf: str | int | None
    units: str | None
    symbols: dict[int, str]


@dataclass(frozen=True, slots=True)
class GroupDef:
    name: str
    points: tuple[PointDef, ...]
    groups: tuple[GroupDef, ...]
    count: int | str  # repeating groups: a number, the name of a point that holds it, or 0 (fills the model)
    size: int  # registers of one instance, its own repeating groups not counted


@dataclass(frozen=True, slots=True)
class ModelDef:
    id: int
    name: str
    group: GroupDef


def _group(definition: dict[str, Any]) -> GroupDef:
    points = tuple(
        PointDef(
            name=point["name"],
            type=point["type"],
            size=int(point["size"]),
            sf=point.get("sf"),
            units=point.get("units"),
            symbols={int(symbol["value"]): symbol["name"] for symbol in point.get("symbols", ())},
        )
        for point in definition.get("points", ())
    )
    groups = tuple(_group(group) for group in definition.get("groups", ()))
    count = definition.get("count", 1)
    return GroupDef(definition["name"], points, groups, count, sum(point.size for point in points))


@cache
def model_def(model_id: int) -> ModelDef | None:
    """The model's definition from pysunspec2, or None for a model it does not know."""
    try:
        definition = get_model_def(model_id)
    except Exception:  # pysunspec2 raises its own error, or OSError, for an unknown id
        return None
    group = _group(definition["group"])
    return ModelDef(model_id, group.name, group)


# -- decoding ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Block:
    """One instance of a group, decoded: each point's value (None when not implemented) and its sub-groups."""

    name: str
    values: dict[str, float | int | str | None]
    groups: dict[str, list[Block]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.values)
        for name, blocks in self.groups.items():
            out[name] = [block.as_dict() for block in blocks]
        return out


@dataclass(slots=True)
class Model:
    """A model instance as the device holds it: where it is, its decoded points, and what was wrong in it."""

    id: int
    name: str
    address: int  # of its ID register
    length: int  # its L: registers after ID and L
    index: int = 1  # the first, second … instance of this id on the device
    block: Block | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.id}" if self.index == 1 else f"{self.id}:{self.index}"


def _raw(point: PointDef, registers: Sequence[int], at: int) -> float | int | str | None:
    words = registers[at : at + point.size]
    data = struct.pack(f">{len(words)}H", *words)
    if point.type == "string":
        text: str = sunspec_codec.data_to_str(data)
        return text.rstrip("\0 ") if sunspec_codec.is_impl_string(text) else None
    info = sunspec_codec.point_type_info.get(point.type)
    if info is None:  # ipv6addr, eui48: nothing hubd reads
        return None
    if point.type in ("float32", "float64"):
        value = struct.unpack(">f" if point.type == "float32" else ">d", data)[0]
        if math.isnan(value):  # every NaN, not only SunSpec's own pattern
            return None
        return float(f"{value:.7g}") if point.type == "float32" else float(value)  # 59.98, not 59.97999954
    value = info.data_to(data)
    return value if info.is_impl(value) else None


def _decode_group(
    group: GroupDef, registers: Sequence[int], at: int, end: int, scope: dict[str, Any], problems: list[str]
) -> tuple[Block, int]:
    """Decode one instance of ``group`` from ``at``; its end. ``scope`` holds the enclosing groups' raw values,
    where a scale-factor reference may point."""
    raw: dict[str, float | int | str | None] = {}
    for point in group.points:
        raw[point.name] = _raw(point, registers, at) if at + point.size <= end else None
        at += point.size
    scope = {**scope, **raw}
    values: dict[str, float | int | str | None] = {}
    for point in group.points:
        value = raw[point.name]
        if point.type == "sunssf" or value is None or point.sf is None or isinstance(value, str):
            values[point.name] = value
            continue
        exponent = point.sf if isinstance(point.sf, int) else scope.get(point.sf)
        if not isinstance(exponent, int):  # the scale factor is not implemented: the value means nothing
            values[point.name] = None
        elif abs(exponent) > LARGEST_SCALE:
            problems.append(f"{group.name}.{point.sf} = {exponent} is no scale factor (SunSpec: -10 … 10)")
            values[point.name] = None
        else:
            # rounded to the digits the scale factor gives: 812 x 10^-2 is 8.12, not 8.120000000000001
            values[point.name] = round(value * 10.0**exponent, -exponent) if exponent < 0 else value * 10**exponent
    block = Block(group.name, values)
    for sub in group.groups:
        instances: list[Block] = []
        count = sub.count
        if isinstance(count, str):
            counted = raw.get(count)
            count = counted if isinstance(counted, int) else 0
            fill = False
        else:
            fill = count == 0
        while (fill and at + sub.size <= end) or (not fill and len(instances) < count and at < end):
            instance, at = _decode_group(sub, registers, at, end, scope, problems)
            instances.append(instance)
            if sub.size == 0:
                break
        block.groups[sub.name] = instances
    return block, at


def decode(model: Model, registers: Sequence[int]) -> None:
    """Decode the model's registers (from its ID register on) into ``model.block``."""
    definition = model_def(model.id)
    if definition is None:
        return
    problems: list[str] = []
    model.block, _ = _decode_group(definition.group, registers, 0, model.length + 2, {}, problems)
    model.problems = problems


# -- discovery -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Discovery:
    """What a device holds: where its map starts, its models in order, and the ids pysunspec2 does not know."""

    base: int
    models: list[Model]
    unknown: list[int]

    def common(self) -> dict[str, str]:
        """Model 1 (common): maker, model, serial number and version, as far as the device fills them."""
        for model in self.models:
            if model.id == 1 and model.block is not None:
                names = {"maker": "Mn", "model": "Md", "serial": "SN", "version": "Vr"}
                found = {key: model.block.values.get(point) for key, point in names.items()}
                return {key: value for key, value in found.items() if isinstance(value, str) and value}
        return {}


async def discover(read: Read, bases: Sequence[int] = BASES, most: int = 125) -> Discovery:
    """Find the marker, walk the model chain to its end, and decode model 1 (read once, it does not change)."""
    for base in bases:
        try:
            if tuple(await read(base, 2)) == MARKER:
                break
        except NoAnswer:
            continue
    else:
        raise NotSunSpec(f"no SunSpec marker (SunS) at {', '.join(str(base) for base in bases)}")
    models: list[Model] = []
    unknown: list[int] = []
    seen: dict[int, int] = {}
    address = base + 2
    while True:
        if len(models) >= MOST_MODELS or address + 2 > 0x10000:
            raise NotSunSpec(f"the model chain from {base} does not end (no end marker 0xFFFF)")
        model_id, length = await read(address, 2)
        if model_id == END_ID:
            break
        definition = model_def(model_id)
        if definition is None:
            unknown.append(model_id)
        else:
            seen[model_id] = seen.get(model_id, 0) + 1
            models.append(Model(model_id, definition.name, address, length, seen[model_id]))
        address += 2 + length
    discovery = Discovery(base, models, unknown)
    for model in models:
        if model.id == 1:
            decode(model, await read_span(read, model.address, model.length + 2, most))
    return discovery


async def read_span(read: Read, address: int, count: int, most: int = 125) -> list[int]:
    """``count`` registers from ``address``, in as few requests as ``most`` registers each allows."""
    registers: list[int] = []
    while len(registers) < count:
        registers += await read(address + len(registers), min(most, count - len(registers)))
    return registers


# -- unified quantities --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quantity:
    """One of hubd's quantities taken from one point of some models: the value times ``factor``."""

    quantity: str
    models: frozenset[int]
    point: str
    factor: float = 1.0


_INVERTERS = frozenset({101, 102, 103, 111, 112, 113})
# The order counts: the first point of a model that gives a quantity wins (701's LNV before LLV).
QUANTITIES: tuple[Quantity, ...] = (
    Quantity("power_kw", _INVERTERS, "W", 0.001),
    Quantity("reactive_power_kvar", _INVERTERS, "VAr", 0.001),
    Quantity("energy_kwh", _INVERTERS, "WH", 0.001),
    Quantity("voltage_v", _INVERTERS, "PhVphA"),
    Quantity("current_a", _INVERTERS, "A"),
    Quantity("frequency_hz", _INVERTERS, "Hz"),
    Quantity("power_factor", _INVERTERS, "PF", 0.01),  # a percentage in these models
    Quantity("power_kw", frozenset({701}), "W", 0.001),
    Quantity("reactive_power_kvar", frozenset({701}), "Var", 0.001),
    Quantity("energy_kwh", frozenset({701}), "TotWhInj", 0.001),
    Quantity("voltage_v", frozenset({701}), "LNV"),
    Quantity("voltage_v", frozenset({701}), "LLV"),
    Quantity("current_a", frozenset({701}), "A"),
    Quantity("frequency_hz", frozenset({701}), "Hz"),
    Quantity("power_factor", frozenset({701}), "PF"),
    Quantity("soc_pct", frozenset({713, 802}), "SoC"),
    Quantity("power_kw", frozenset({802}), "W", 0.001),  # SunSpec storage: positive = discharge, as hubd's
    Quantity("voltage_v", frozenset({802}), "V"),
    Quantity("current_a", frozenset({802}), "A"),
)
STATE_POINTS = {101: "St", 102: "St", 103: "St", 111: "St", 112: "St", 113: "St", 701: "InvSt", 802: "State"}


def quantities(model: Model) -> dict[str, float]:
    """The unified quantities in a decoded model; a point not implemented gives no quantity, never a zero."""
    if model.block is None:
        return {}
    values = model.block.values
    out: dict[str, float] = {}
    for quantity in QUANTITIES:
        if model.id in quantity.models and quantity.quantity not in out:
            value = values.get(quantity.point)
            if isinstance(value, int | float) and math.isfinite(value):
                out[quantity.quantity] = round(value * quantity.factor, 9)
    return out


def state(model: Model) -> str | None:
    """The operating state (its name in the definition, e.g. MPPT), where the model has one and sets it."""
    point = STATE_POINTS.get(model.id)
    definition = model_def(model.id)
    if point is None or model.block is None or definition is None:
        return None
    value = model.block.values.get(point)
    if not isinstance(value, int):
        return None
    symbols = next((p.symbols for p in definition.group.points if p.name == point), {})
    return symbols.get(value, str(value))
