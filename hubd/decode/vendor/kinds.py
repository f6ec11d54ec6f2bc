"""What differs between JSON, CSV and binary payloads: reading a source, walking the records, parsing bytes."""

from __future__ import annotations

import csv
import io
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter, methodcaller
from typing import Any

import orjson

from hubd.decode.registry import Decoded, Decoder, Limits, load_json_object
from hubd.decode.vendor.access import Getter, Message, Raw, Records
from hubd.decode.vendor.language import (
    TYPES,
    Context,
    ReadingSpec,
    Source,
    check_keys,
    integer,
    mapping,
    parse_reading,
    text,
)
from hubd.decode.vendor.readings import RecordFunction, reader
from hubd.model import ErrorCode, HubError

BAD = ErrorCode.BAD_REQUEST
DECODE = ErrorCode.DECODE_ERROR

# -- JSON -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JsonPath:
    """``$.power.values[*]`` (from the root; ``[*]`` is each element) or ``soc.percent`` (from the record)."""

    text: str
    absolute: bool
    steps: tuple[tuple[str, Any], ...]  # ("key", name) | ("index", n) | ("each", None)


_STEP = re.compile(r"\.([^.\[\]\"]+)|\[(\*|\d+)\]|\[\"([^\"]*)\"\]")


def parse_json_path(ctx: Context, where: str, raw: Any) -> JsonPath:
    written = text(ctx, where, raw)
    absolute = written.startswith("$")
    rest = written[1:] if absolute else "." + written
    steps: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(rest):
        match = _STEP.match(rest, pos)
        if match is None:
            raise ctx.error(where, f'{written!r} is not a path: expected .key, [n], [*] or ["key"] at {rest[pos:]!r}')
        key, index, quoted = match.groups()
        if key is not None or quoted is not None:
            steps.append(("key", key if key is not None else quoted))
        elif index == "*":
            steps.append(("each", None))
        else:
            steps.append(("index", int(index)))
        pos = match.end()
    if not absolute and any(kind == "each" for kind, _ in steps):
        raise ctx.error(where, f"{written!r}: [*] only in a path from the root ($...) that follows records")
    return JsonPath(written, absolute, tuple(steps))


class _Access:
    """What every kind reads alike: constants and MQTT v5 user properties (both the same for a whole message).

    A kind says how it reads its own fields (``field_getter``) and, where it must, overrides the rest.
    """

    def message_level(self, source: Source) -> bool:
        return source.kind in ("property", "const")

    def getter(self, source: Source) -> Getter:
        if source.kind == "const":
            value = self.constant(source.ref)
            return lambda message: value
        if source.kind == "property":
            name = source.ref
            return lambda message: message.props.get(name)
        return self.field_getter(source)

    def constant(self, value: Any) -> Any:
        """A constant as this kind's fetched values look (as they stand, unless a kind says otherwise)."""
        return value

    def field_getter(self, source: Source) -> Getter:
        raise NotImplementedError

    def readable(self, records: list[Any]) -> bool:
        """Most kinds can read any record they loop over."""
        return True

    def check_record(self) -> Callable[[Any], None] | None:
        """Most kinds can read any record they loop over: nothing to check."""
        return None


class JsonAccess(_Access):
    """Records are found by walking ``records``; every ``[*]`` in it is a loop.

    When a path has ``[*]`` (``$.devices[*].serial``: the element its record is in), a record is read as its
    scope: the element of each ``[*]`` it is in, then the record itself; else as the record alone.
    """

    raw: Raw = "json"

    def __init__(self, ctx: Context, records: JsonPath) -> None:
        self.records_path = records
        segments: list[list[tuple[str, Any]]] = [[]]
        for step in records.steps:
            if step[0] == "each":
                segments.append([])
            else:
                segments[-1].append(step)
        self.segments = segments
        self.walks = [_walker(segment) for segment in segments]
        self.needs_object = False
        self.scoped = False  # a path reads the element of a [*] that a record is in
        # The records path cut at each [*], for messages: "power.values[5]", "sites[0].points[3]".
        self.pieces = records.text.removeprefix("$").removeprefix(".").split("[*]")

    def parse_path(self, ctx: Context, where: str, raw: Any) -> tuple[JsonPath, str]:
        path = parse_json_path(ctx, where, raw)
        eaches = sum(1 for kind, _ in path.steps if kind == "each")
        if eaches:
            self.scoped = True
            prefix = self._prefix(path.steps, eaches)
            if eaches >= len(self.segments) or prefix != self._prefix(self.records_path.steps, eaches):
                raise ctx.error(
                    where, f"{path.text!r}: its [*] must follow records ({self.records_path.text}) from the root"
                )
        if not path.absolute:
            self.needs_object = True
        return path, path.text

    @staticmethod
    def _prefix(steps: tuple[tuple[str, Any], ...], eaches: int) -> tuple[tuple[str, Any], ...]:
        seen = 0
        for position, (kind, _) in enumerate(steps):
            if kind == "each":
                seen += 1
                if seen == eaches:
                    return steps[: position + 1]
        return steps

    def message_level(self, source: Source) -> bool:
        if source.kind == "path":
            path: JsonPath = source.ref
            return path.absolute and not any(kind == "each" for kind, _ in path.steps)
        return super().message_level(source)

    def field_getter(self, source: Source) -> Getter:
        path: JsonPath = source.ref
        if not path.absolute:  # from the record, an object by now (check_record)
            key: str = path.steps[0][1]
            rest = _walker(list(path.steps[1:]))
            if self.scoped:
                return lambda scope: rest(scope[-1].get(key))
            if len(path.steps) == 1:
                return methodcaller("get", key)
            return lambda record: rest(record.get(key))
        eaches = [i for i, (kind, _) in enumerate(path.steps) if kind == "each"]
        walk = _walker(list(path.steps[eaches[-1] + 1 :] if eaches else path.steps))
        if not eaches:
            return lambda message: walk(message.src)
        element = len(eaches) - 1  # the element of the path's last [*]
        return lambda scope: walk(scope[element])

    def records(self, message: Message) -> Records:
        first = self.walks[0](message.src)
        if len(self.walks) == 1:  # the payload is the one record
            return [None], [(first,) if self.scoped else first]
        if first.__class__ is not list:
            raise HubError(DECODE, f"the payload has no list at {self._text(1)}")
        if len(self.walks) == 2 and not self.segments[1] and not self.scoped:
            return range(len(first)), first  # the common case, $.values[*]: each element is a record
        places: list[tuple[int, ...]] = []
        records: list[Any] = []
        self._each(first, 1, (), (), places, records)
        return places, records

    def _each(
        self,
        elements: list[Any],
        level: int,
        places: tuple[int, ...],
        scope: tuple[Any, ...],
        found_places: list[tuple[int, ...]],
        found: list[Any],
    ) -> None:
        """The records under the elements of the ``level``-th [*], appended to ``found`` (their places too)."""
        walk = self.walks[level]
        last = level == len(self.walks) - 1
        for index, element in enumerate(elements):
            place = (*places, index)
            inner = walk(element)
            if last:
                found_places.append(place)
                found.append((*scope, element, inner) if self.scoped else inner)
            elif inner.__class__ is not list:
                found_places.append(place)
                found.append(HubError(BAD, f"{self._place(place)}: no list at {self._text(level + 1)}"))
            else:
                self._each(inner, level + 1, place, (*scope, element), found_places, found)

    def readable(self, records: list[Any]) -> bool:
        if self.scoped:
            records = [scope[-1] if scope.__class__ is tuple else scope for scope in records]
        kinds = set(map(type, records))
        return HubError not in kinds and (not self.needs_object or kinds <= {dict})

    def check_record(self) -> Callable[[Any], None] | None:
        if not self.needs_object:
            return None

        if not self.scoped:
            return _object

        def check(scope: tuple[Any, ...]) -> None:
            _object(scope[-1])

        return check

    def _text(self, eaches: int) -> str:
        """The records path up to its ``eaches``-th [*] (without it)."""
        return "[*]".join(self.records_path.text.split("[*]")[:eaches])

    def _place(self, indices: tuple[int, ...]) -> str:
        named = self.pieces[0]
        for level, index in enumerate(indices):
            named += f"[{index}]" + (self.pieces[level + 1] if level + 1 < len(indices) else "")
        return named

    def location(self, message: Message, place: Any) -> str:
        if place is None:
            return self.records_path.text
        return self._place(place if isinstance(place, tuple) else (place,))


def _object(record: Any) -> None:
    if record.__class__ is not dict:
        raise HubError(BAD, "the record is not a JSON object")


def _walker(steps: list[tuple[str, Any]]) -> Callable[[Any], Any]:
    """Follows ``steps`` (keys and indices) from a JSON value; None where the value has no such member."""
    if not steps:
        return _itself
    if len(steps) == 1 and steps[0][0] == "key":
        key = steps[0][1]
        return lambda value: value.get(key) if value.__class__ is dict else None

    def walk(value: Any) -> Any:
        for kind, ref in steps:
            if kind == "key":
                value = value.get(ref) if value.__class__ is dict else None
            else:
                value = value[ref] if value.__class__ is list and len(value) > ref else None
        return value

    return walk


def _itself(value: Any) -> Any:
    return value


def load_json(payload: bytes) -> Any:
    """Any JSON value, held to the same rules as the native format's parser."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return load_json_object(payload)  # NaN and Infinity pass (to fail their reading); the rest is refused


def build_json(ctx: Context, document: dict[str, Any], code: str, source_id: str | None) -> Decoder:
    check_keys(ctx, "", document, {"code", "kind", "description", "source_id", "records", "reading"}, {"reading"})
    records = parse_json_path(ctx, "records", document.get("records", "$"))
    if not records.absolute:
        raise ctx.error("records", f"{records.text!r}: records is a path from the root, starting with $")
    access = JsonAccess(ctx, records)
    spec = parse_reading(ctx, "reading", document["reading"], access.parse_path)
    function = reader(spec, access)

    def decode(payload: bytes, limits: Limits) -> Decoded:
        return Decoded(source_id, function(load_json(payload), None, limits.properties, limits))

    return decode


# -- CSV ------------------------------------------------------------------------------------------------------------


class CsvAccess(_Access):
    """A record is a row; a column is named by the header or counted from 1. ``aux`` holds each column's
    position in the rows of this message (its header may order them differently from the last one)."""

    raw: Raw = "text"

    def __init__(self, header: bool) -> None:
        self.header = header
        self.columns: list[int | str] = []

    def parse_path(self, ctx: Context, where: str, raw: Any) -> tuple[int, str]:
        if isinstance(raw, int) and not isinstance(raw, bool):
            integer(ctx, where, raw, 1, 10_000)
            label = f"column {raw}"
            column: int | str = raw - 1
        else:
            column = text(ctx, where, raw)
            if not self.header:
                raise ctx.error(where, f"{column!r}: columns are named only with header: true; count them from 1")
            label = f"column {column!r}"
        if column not in self.columns:
            self.columns.append(column)
        return self.columns.index(column), label

    def constant(self, value: Any) -> Any:
        return value if isinstance(value, str) else repr(value)  # read like any other cell: as text

    def field_getter(self, source: Source) -> Getter:
        column: int = source.ref

        def cell(cells: tuple[str, ...]) -> str | None:
            return cells[column].strip() or None

        return cell

    def records(self, message: Message) -> Records:
        """Each row as the cells the definition reads, in its order (a short row's missing cells empty), and
        its line number."""
        positions: tuple[int, ...] = message.aux
        pick = itemgetter(*positions, 0)  # one more, so that one column gives a tuple too
        width = max(positions, default=0) + 1
        lines: list[int] = []
        rows: list[tuple[str, ...]] = []
        reader = message.src
        for row in reader:
            if row and "".join(row).strip():  # else a blank line
                lines.append(reader.line_num)
                rows.append(pick(row if len(row) >= width else row + [""] * (width - len(row))))
        return lines, rows

    def location(self, message: Message, place: Any) -> str:
        return f"line {place}"


def build_csv(ctx: Context, document: dict[str, Any], code: str, source_id: str | None) -> Decoder:
    check_keys(ctx, "", document, {"code", "kind", "description", "source_id", "csv", "reading"}, {"reading"})
    options = mapping(ctx, "csv", document.get("csv", {}))
    check_keys(ctx, "csv", options, {"delimiter", "quote", "header", "skip_rows", "encoding"}, set())
    delimiter = options.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '\r\n"':
        raise ctx.error("csv.delimiter", f"one character such as , ; or a tab, got {delimiter!r}")
    quote = options.get("quote", '"')
    if not isinstance(quote, str) or len(quote) != 1 or quote == delimiter:
        raise ctx.error("csv.quote", f"one character other than the delimiter, got {quote!r}")
    header = options.get("header", True)
    if not isinstance(header, bool):
        raise ctx.error("csv.header", f"expected true or false, got {header!r}")
    skip_rows = integer(ctx, "csv.skip_rows", options.get("skip_rows", 0), 0, 1000)
    encoding = text(ctx, "csv.encoding", options.get("encoding", "utf-8-sig"))
    try:
        "".encode(encoding)
        b"".decode(encoding)
    except LookupError:
        raise ctx.error("csv.encoding", f"{encoding!r} is not a text encoding Python knows") from None
    access = CsvAccess(header)
    spec = parse_reading(ctx, "reading", document["reading"], access.parse_path)
    function = reader(spec, access)
    columns = list(access.columns)

    def decode(payload: bytes, limits: Limits) -> Decoded:
        try:
            content = payload.decode(encoding)
        except UnicodeDecodeError:
            raise HubError(DECODE, f"the payload is not {encoding} text") from None
        reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quotechar=quote, strict=True)
        try:
            for _ in range(skip_rows):
                next(reader, None)
            if header:
                names = next(reader, None)
                if names is None:
                    raise HubError(DECODE, "the payload has no header line")
                aux = _columns(columns, [name.strip() for name in names], reader.line_num)
            else:
                aux = tuple(int(c) for c in columns)
            items = function(reader, aux, limits.properties, limits)
        except csv.Error as exc:
            raise HubError(DECODE, f"line {reader.line_num}: not CSV as the definition says ({exc})") from None
        return Decoded(source_id, items)

    return decode


def _columns(columns: list[int | str], names: list[str], line: int) -> tuple[int, ...]:
    found = []
    for column in columns:
        if isinstance(column, int):
            found.append(column)
        elif column in names:
            found.append(names.index(column))
        else:
            shown = ", ".join(repr(n) for n in names[:20])
            raise HubError(DECODE, f"the header (line {line}) has no column {column!r}; it has {shown}")
    return tuple(found)


# -- binary ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Fixed fields compiled into one struct.Struct."""

    struct: struct.Struct
    names: dict[str, int]  # field name -> index in the unpacked tuple
    expect: dict[int, int | float]  # index -> the value the field must have
    texts: frozenset[str]  # the text fields


def _layout(ctx: Context, where: str, raw: Any, order: str, size: int | None = None) -> tuple[Layout, int]:
    if not isinstance(raw, list) or not raw:
        raise ctx.error(where, "expected a list of fields (name, type, offset)")
    fields = []
    for index, item in enumerate(raw):
        key = f"{where}[{index}]"
        spec = mapping(ctx, key, item)
        check_keys(ctx, key, spec, {"name", "type", "offset", "size", "expect"}, {"name", "type", "offset"})
        name = text(ctx, f"{key}.name", spec["name"])
        kind = spec["type"]
        offset = integer(ctx, f"{key}.offset", spec["offset"], 0, 1 << 20)
        if kind == "text":
            length = integer(ctx, f"{key}.size", spec.get("size"), 1, 255)
            code = f"{length}s"
        elif kind in TYPES:
            if "size" in spec:
                raise ctx.error(f"{key}.size", f"{kind} has its own size")
            code, length = TYPES[kind]
        else:
            raise ctx.error(f"{key}.type", f"one of {', '.join(TYPES)} or text, got {kind!r}")
        if "expect" in spec and (kind == "text" or isinstance(spec["expect"], bool)):
            raise ctx.error(f"{key}.expect", "expect takes a number, on a number field")
        fields.append((offset, length, code, name, spec.get("expect"), key))
    fields.sort()
    names: dict[str, int] = {}
    expect: dict[int, int | float] = {}
    texts = {name for _, _, code, name, _, _ in fields if code.endswith("s")}
    fmt = "<" if order == "little" else ">"
    end = 0
    for index, (offset, length, code, name, expected, key) in enumerate(fields):
        if offset < end:
            raise ctx.error(key, f"field {name!r} at offset {offset} overlaps the field before it (ending at {end})")
        if name in names:
            raise ctx.error(key, f"the name {name!r} is used twice")
        fmt += "x" * (offset - end) + code
        end = offset + length
        names[name] = index
        if expected is not None:
            expect[index] = expected
    if size is not None:
        if end > size:
            raise ctx.error(where, f"the fields end at byte {end}, past the record size {size}")
        fmt += "x" * (size - end)
        end = size
    return Layout(struct.Struct(fmt), names, expect, frozenset(texts)), end


class BinaryAccess(_Access):
    """Header fields are per message (``aux``, the unpacked header), record fields per record (a tuple)."""

    raw: Raw = "number"

    def __init__(self, header: Layout | None, record: Layout) -> None:
        self.header = header
        self.record = record

    def message_level(self, source: Source) -> bool:
        if source.kind == "field":
            return self.header is not None and source.ref in self.header.names
        return super().message_level(source)

    def field_getter(self, source: Source) -> Getter:
        if self.header is not None and source.ref in self.header.names:
            index = self.header.names[source.ref]
            return lambda message: message.aux[index]
        return itemgetter(self.record.names[source.ref])

    def records(self, message: Message) -> Records:
        records = list(message.src)
        return range(len(records)), records

    def location(self, message: Message, place: Any) -> str:
        return f"records[{place}]"


def build_binary(ctx: Context, document: dict[str, Any], code: str, source_id: str | None) -> Decoder:
    check_keys(
        ctx, "", document, {"code", "kind", "description", "source_id", "binary", "reading"}, {"binary", "reading"}
    )
    options = mapping(ctx, "binary", document["binary"])
    check_keys(ctx, "binary", options, {"byte_order", "header", "records"}, {"records"})
    order = options.get("byte_order", "big")
    if order not in ("big", "little"):
        raise ctx.error("binary.byte_order", f"big or little, got {order!r}")
    header = None
    header_end = 0
    if "header" in options:
        header, header_end = _layout(ctx, "binary.header", options["header"], order)
    records = mapping(ctx, "binary.records", options["records"])
    check_keys(ctx, "binary.records", records, {"offset", "size", "count", "fields"}, {"fields"})
    offset = integer(ctx, "binary.records.offset", records.get("offset", header_end), 0, 1 << 20)
    if offset < header_end:
        raise ctx.error("binary.records.offset", f"{offset} is inside the header, which ends at byte {header_end}")
    size = integer(ctx, "binary.records.size", records["size"], 1, 1 << 16) if "size" in records else None
    record, size = _layout(ctx, "binary.records.fields", records["fields"], order, size)
    count_index = None
    if "count" in records:
        count = mapping(ctx, "binary.records.count", records["count"])
        check_keys(ctx, "binary.records.count", count, {"field"}, {"field"})
        name = count["field"]
        if header is None or name not in header.names:
            raise ctx.error("binary.records.count.field", f"{name!r} is not a header field")
        count_index = header.names[name]
    ctx.fields = {name: True for name in (header.names if header else {})}
    for name in record.names:
        if name in ctx.fields:
            raise ctx.error("binary.records.fields", f"{name!r} is both a header and a record field")
        ctx.fields[name] = False
    access = BinaryAccess(header, record)
    spec = parse_reading(ctx, "reading", document["reading"], lambda c, w, r: (r, str(r)))
    _no_text_numbers(ctx, spec, header, record)
    function = reader(spec, access)
    record_struct = record.struct

    def decode(payload: bytes, limits: Limits) -> Decoded:
        aux: tuple[Any, ...] = ()
        if header is not None:
            if len(payload) < header.struct.size:
                raise HubError(DECODE, f"the payload has {len(payload)} bytes; the header needs {header.struct.size}")
            aux = header.struct.unpack_from(payload, 0)
            for index, expected in header.expect.items():
                if aux[index] != expected:
                    name = next(n for n, i in header.names.items() if i == index)
                    raise HubError(DECODE, f"the header field {name} is {_hex(aux[index])}, not {_hex(expected)}")
        rest = len(payload) - offset
        if rest < 0:
            raise HubError(DECODE, f"the payload has {len(payload)} bytes; the records start at byte {offset}")
        if count_index is not None:
            count = aux[count_index]
            if count * size != rest:
                raise HubError(DECODE, f"the header says {count} records of {size} bytes, but {rest} bytes follow it")
        elif rest % size:
            raise HubError(DECODE, f"{rest} bytes of records are not a whole number of {size}-byte records")
        if rest // size > limits.max_readings:
            raise HubError(
                ErrorCode.TOO_LARGE, f"{rest // size} readings in one message; the limit is {limits.max_readings}"
            )
        records = record_struct.iter_unpack(memoryview(payload)[offset:])
        for index, expected in record.expect.items():
            records = _expecting(records, index, expected, record)
        return Decoded(source_id, function(records, aux, limits.properties, limits))

    return decode


def _expecting(records: Iterator[tuple[Any, ...]], index: int, expected: Any, layout: Layout) -> Iterator[Any]:
    name = next(n for n, i in layout.names.items() if i == index)
    for number, record in enumerate(records):
        if record[index] != expected:
            raise HubError(DECODE, f"record {number}: the field {name} is {_hex(record[index])}, not {_hex(expected)}")
        yield record


def _hex(value: Any) -> str:
    return f"0x{value:X}" if isinstance(value, int) and value >= 0 else repr(value)


def _no_text_numbers(ctx: Context, spec: ReadingSpec, header: Layout | None, record: Layout) -> None:
    """A quantity, a time or a scale cannot come from a text field."""
    texts = record.texts | (header.texts if header else frozenset())
    sources: list[Source] = [] if spec.measured_at.source is None else [spec.measured_at.source]
    for number in spec.quantities.values():
        stack = [number]
        while stack:
            item = stack.pop()
            sources += [item.source, *(f.source for f in item.factors)]
            if item.minus is not None:
                stack.append(item.minus)
    for source in sources:
        if source.kind == "field" and source.ref in texts:
            raise ctx.error(source.key, f"{source.ref!r} is a text field; a number or a time needs a number field")


# -- one record per message, already parsed: ECHONET Lite property lists (see echonet.py) ---------------------------


class EpcAccess(_Access):
    """A record is ``{EPC: value}`` from one frame; ``aux`` is the frame, named in messages by its SEOJ."""

    raw: Raw = "number"

    def field_getter(self, source: Source) -> Getter:
        return methodcaller("get", source.ref)

    def records(self, message: Message) -> Records:
        return _NO_PLACE, message.src  # one frame, one record: named by its SEOJ

    def location(self, message: Message, place: Any) -> str:
        frame: bytes = message.aux
        return f"SEOJ 0x{frame[4]:02X}{frame[5]:02X}{frame[6]:02X}"


_NO_PLACE = (None,)


def epc_reader(spec: ReadingSpec) -> RecordFunction:
    """The record loop of one ECHONET Lite class: its records are the property values of one frame."""
    return reader(spec, EpcAccess())
