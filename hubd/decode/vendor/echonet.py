"""ECHONET Lite property frames: the hook for what a fixed layout cannot say (a variable list of properties).

A frame (ECHONET Lite specification, part II, chapter 3) is EHD1 0x10, EHD2 0x81, TID (2 bytes), SEOJ and
DEOJ (3 bytes each: class group, class, instance), ESV, OPC, then OPC properties of EPC (1 byte), PDC (1 byte)
and PDC bytes of EDT, big-endian. The hook walks the properties into ``{EPC: integer}``; which EPC gives
which quantity, with its type, valid range, unit, scale and sign, is declared per SEOJ class in the
definition (formats/echonet.lite.yaml) and read like any other format. One frame is one reading.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

from hubd.decode.registry import Decoded, Decoder, Limits
from hubd.decode.vendor.kinds import epc_reader
from hubd.decode.vendor.language import (
    TYPES,
    Context,
    ReadingSpec,
    _code_number,
    check_keys,
    mapping,
    parse_credentials,
    parse_quantities,
)
from hubd.decode.vendor.readings import RecordFunction
from hubd.model import ErrorCode, HubError

DECODE = ErrorCode.DECODE_ERROR
# The services that carry measured values: Get_Res, INF, INFC, and Get_SNA / INF_SNA (a property the device
# could not give has PDC 0: it is absent from the reading).
DEFAULT_ESV = (0x72, 0x73, 0x74, 0x52, 0x53)


@dataclass(frozen=True)
class _Class:
    function: RecordFunction
    types: dict[int, tuple[int, bool, str]]  # EPC -> (size, signed, type name)
    shapes: dict[int, _Shape] = field(default_factory=dict)  # by frame length: the last good frame's shape


class _Shape(NamedTuple):
    """A frame's layout (OPC, each EPC and PDC), so that the next frame of a device is read in one go.

    A device sends the same properties each time: if a frame has the same length and the same OPC, EPC and
    PDC bytes at the same places as the last good one, its values are unpacked by one struct, with no walk.
    """

    probe: Callable[[bytes], tuple[int, ...]]  # the OPC, EPC and PDC bytes of a frame
    expected: tuple[int, ...]
    unpack: Callable[[bytes, int], tuple[int, ...]]
    epcs: tuple[int, ...]


_CODES = {(1, False): "B", (2, False): "H", (4, False): "I", (8, False): "Q",
          (1, True): "b", (2, True): "h", (4, True): "i", (8, True): "q"}  # fmt: skip


def _shape_of(frame: bytes, types: dict[int, tuple[int, bool, str]]) -> _Shape:
    """The shape of a frame the walk has just read without fault."""
    positions = [10, 11]  # ESV (already checked) and OPC: with them, a probe is always a tuple
    layout = ">"
    epcs = []
    position = 12
    for _ in range(frame[11]):
        epc, pdc = frame[position], frame[position + 1]
        positions += [position, position + 1]
        layout += "xx"
        if pdc and epc in types:
            width, signed, _ = types[epc]
            layout += _CODES[width, signed]
            epcs.append(epc)
        elif pdc:
            layout += f"{pdc}x"
        position += 2 + pdc
    probe = itemgetter(*positions)
    return _Shape(probe, probe(frame), struct.Struct(layout).unpack_from, tuple(epcs))


def _no_path(ctx: Context, where: str, raw: Any) -> tuple[Any, str]:
    raise ctx.error(where, "an ECHONET Lite format reads epc, property or const")


def build(ctx: Context, document: dict[str, Any], code: str, source_id: str | None) -> Decoder:
    allowed = {"code", "kind", "description", "source_id", "hook", "reading", "classes", "esv"}
    check_keys(ctx, "", document, allowed, {"reading", "classes"})
    ctx.kind = "epc"
    common = mapping(ctx, "reading", document["reading"])
    check_keys(ctx, "reading", common, {"der_id", "password", "measured_at"}, set())
    der_id, password, measured_at = parse_credentials(ctx, "reading", common, _no_path)
    esv_list = document.get("esv", list(DEFAULT_ESV))
    if not isinstance(esv_list, list) or not esv_list:
        raise ctx.error("esv", "expected a list of ESV codes such as 0x72")
    accepted = frozenset(_code_number(ctx, f"esv[{i}]", v, 0xFF) for i, v in enumerate(esv_list))
    classes: dict[int, _Class] = {}
    for key, table in mapping(ctx, "classes", document["classes"]).items():
        where = f"classes.{key}"
        class_code = _code_number(ctx, where, key, 0xFFFF)
        quantities = parse_quantities(ctx, where, mapping(ctx, where, table), _no_path)
        spec = ReadingSpec(der_id, password, measured_at, quantities)
        types: dict[int, tuple[int, bool, str]] = {}
        for source in _epc_sources(spec):
            assert source.type is not None
            size = TYPES[source.type][1]
            signed = source.type.startswith("int")
            if source.ref in types and types[source.ref][2] != source.type:
                raise ctx.error(source.key, f"EPC 0x{source.ref:02X} is read as {types[source.ref][2]} elsewhere")
            types[source.ref] = (size, signed, source.type)
        classes[class_code] = _Class(epc_reader(spec), types)
    if not classes:
        raise ctx.error("classes", "names no SEOJ class")
    known = ", ".join(f"0x{c:04X}" for c in classes)

    def decode(payload: bytes, limits: Limits) -> Decoded:
        size = len(payload)
        if size < 12:
            raise HubError(DECODE, f"an ECHONET Lite frame has at least 12 bytes; this one has {size}")
        if payload[0] != 0x10 or payload[1] != 0x81:
            ehd = (payload[0] << 8) | payload[1]
            raise HubError(DECODE, f"EHD is 0x{ehd:04X}, not 0x1081: no ECHONET Lite frame in the specified format")
        esv = payload[10]
        if esv not in accepted:
            raise HubError(DECODE, f"ESV 0x{esv:02X} carries no measured values this format takes")
        class_code = (payload[4] << 8) | payload[5]
        found = classes.get(class_code)
        if found is None:
            raise HubError(DECODE, f"SEOJ class 0x{class_code:04X} is not in the definition (it has {known})")
        shape = found.shapes.get(size)
        if shape is not None:
            probe, expected, unpack, epcs = shape
            if probe(payload) == expected:
                values = dict(zip(epcs, unpack(payload, 12)))  # noqa: B905 - the shape gives as many as it names
                return Decoded(source_id, found.function([values], payload, limits.properties, limits))
        types = found.types
        values = {}
        count = payload[11]
        position = 12
        for number in range(1, count + 1):
            if position + 2 > size:
                raise HubError(DECODE, f"property {number} of {count} runs past the end of the frame")
            epc = payload[position]
            pdc = payload[position + 1]
            position += 2
            end = position + pdc
            if end > size:
                raise HubError(DECODE, f"property {number} of {count} (EPC 0x{epc:02X}) runs past the end of the frame")
            if pdc and epc in types:
                width, signed, name = types[epc]
                if pdc != width:
                    raise HubError(DECODE, f"EPC 0x{epc:02X} has {pdc} bytes; the definition reads it as {name}")
                values[epc] = int.from_bytes(payload[position:end], "big", signed=signed)
            position = end
        if position != size:
            raise HubError(DECODE, f"{size - position} bytes follow the last of {count} properties")
        if len(found.shapes) >= 64:
            found.shapes.clear()
        found.shapes[size] = _shape_of(payload, types)
        return Decoded(source_id, found.function([values], payload, limits.properties, limits))

    return decode


def _epc_sources(spec: ReadingSpec) -> list[Any]:
    found = []
    for number in spec.quantities.values():
        stack = [number]
        while stack:
            item = stack.pop()
            found += [s for s in (item.source, *(f.source for f in item.factors)) if s.kind == "epc"]
            if item.minus is not None:
                stack.append(item.minus)
    return found
