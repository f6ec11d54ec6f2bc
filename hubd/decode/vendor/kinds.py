"""What differs between JSON, CSV and binary payloads: reading a source, walking the records, parsing bytes."""

from __future__ import annotations

import csv
import io
import re
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import orjson

from hubd.decode.registry import Decoded, Decoder, Limits, load_json_object
from hubd.decode.vendor.codegen import Gen, RecordFunction, compile_reading
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
from hubd.model import ErrorCode, HubError

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

    A kind says how it reads its own fields (``fetch_field``) and, where it must, overrides the rest.
    """

    def message_level(self, source: Source) -> bool:
        return source.kind in ("property", "const")

    def fetch(self, gen: Gen, source: Source, var: str) -> None:
        if source.kind == "const":
            gen.line(f"{var} = {gen.const(self.constant(source.ref), 'const')}")
        elif source.kind == "property":
            gen.line(f"{var} = props.get({source.ref!r})")
        else:
            self.fetch_field(gen, source, var)

    def constant(self, value: Any) -> Any:
        """A constant as this kind's fetched values look (as they stand, unless a kind says otherwise)."""
        return value

    def fetch_field(self, gen: Gen, source: Source, var: str) -> None:
        raise NotImplementedError

    def check_record(self, gen: Gen) -> None:
        """Most kinds can read any record they loop over: nothing to check."""


class JsonAccess(_Access):
    """Records are found by walking ``records``; every ``[*]`` in it is a loop."""

    raw = "json"

    def __init__(self, ctx: Context, records: JsonPath) -> None:
        self.records = records
        self.segments: list[list[tuple[str, Any]]] = [[]]
        for step in records.steps:
            if step[0] == "each":
                self.segments.append([])
            else:
                self.segments[-1].append(step)
        self.needs_object = False
        self.record_keys: list[str] = []  # the keys a record's values are read from (their paths' first steps)

    def parse_path(self, ctx: Context, where: str, raw: Any) -> tuple[JsonPath, str]:
        path = parse_json_path(ctx, where, raw)
        eaches = sum(1 for kind, _ in path.steps if kind == "each")
        if eaches:
            prefix = self._prefix(path.steps, eaches)
            if eaches >= len(self.segments) or prefix != self._prefix(self.records.steps, eaches):
                raise ctx.error(
                    where, f"{path.text!r}: its [*] must follow records ({self.records.text}) from the root"
                )
        if not path.absolute:
            self.needs_object = True
            if path.steps and path.steps[0][0] == "key" and path.steps[0][1] not in self.record_keys:
                self.record_keys.append(path.steps[0][1])
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

    def fetch_field(self, gen: Gen, source: Source, var: str) -> None:
        path: JsonPath = source.ref
        if not path.absolute:
            if len(self.record_keys) > 1 and path.steps and path.steps[0][0] == "key":  # read by check_record
                gen.line(f"{var} = p{self.record_keys.index(path.steps[0][1])}")
                if len(path.steps) > 1:
                    self._walk(gen, var, list(path.steps[1:]), var)
            else:
                self._walk(gen, "rec", list(path.steps), var, known_dict=True)
            return
        eaches = [i for i, (kind, _) in enumerate(path.steps) if kind == "each"]
        if not eaches:
            self._walk(gen, "src", list(path.steps), var)
        else:
            self._walk(gen, f"e{len(eaches) - 1}", list(path.steps[eaches[-1] + 1 :]), var)

    @staticmethod
    def _walk(gen: Gen, base: str, steps: list[tuple[str, Any]], var: str, known_dict: bool = False) -> None:
        if not steps:
            gen.line(f"{var} = {base}")
            return
        current = base
        for position, (kind, ref) in enumerate(steps):
            if kind == "key":
                if position == 0 and known_dict:
                    gen.line(f"{var} = {current}.get({ref!r})")
                else:
                    gen.line(f"{var} = {current}.get({ref!r}) if {current}.__class__ is dict else None")
            else:
                fits = f"{current}.__class__ is list and len({current}) > {ref}"
                gen.line(f"{var} = {current}[{ref}] if {fits} else None")
            current = var

    @contextmanager
    def loop(self, gen: Gen) -> Iterator[None]:
        segments = self.segments
        with ExitStack() as stack:
            if len(segments) == 1:
                self._walk(gen, "src", segments[0], "rec")
                stack.enter_context(gen.block("for rec in (rec,):"))
            else:
                self._walk(gen, "src", segments[0], "x0")
                with gen.block("if x0.__class__ is not list:"):
                    where = self._text(1)
                    gen.line(f"raise HubError(DECODE, {f'the payload has no list at {where}'!r})")
                stack.enter_context(gen.block("for i0, e0 in enumerate(x0):"))
                for level in range(1, len(segments) - 1):
                    self._walk(gen, f"e{level - 1}", segments[level], f"x{level}")
                    with gen.block(f"if x{level}.__class__ is not list:"):
                        where = self._text(level + 1)
                        gen.line(f"append(HubError(BAD, {self._location(level)} + {f': no list at {where}'!r}))")
                        gen.line("continue")
                    stack.enter_context(gen.block(f"for i{level}, e{level} in enumerate(x{level}):"))
                self._walk(gen, f"e{len(segments) - 2}", segments[-1], "rec")
            yield

    def check_record(self, gen: Gen) -> None:
        if self.needs_object:
            with gen.block("if rec.__class__ is not dict:"):
                gen.line("raise HubError(BAD, 'the record is not a JSON object')")
        keys = self.record_keys
        if len(keys) > 1:  # one call reads them all; a record without one of them, one lookup each
            names = ", ".join(f"p{index}" for index in range(len(keys)))
            with gen.block("try:"):
                gen.line(f"{names} = {gen.const(itemgetter(*keys), 'keys')}(rec)")
            with gen.block("except KeyError:"):
                for index, key in enumerate(keys):
                    gen.line(f"p{index} = rec.get({key!r})")

    def _text(self, eaches: int) -> str:
        """The records path up to its ``eaches``-th [*] (without it)."""
        pieces = self.records.text.split("[*]")
        return "[*]".join(pieces[:eaches])

    def _location(self, levels: int) -> str:
        pieces = self.records.text.removeprefix("$").removeprefix(".").split("[*]")
        parts = [repr(pieces[0])]
        for level in range(levels):
            parts.append(f"'[' + str(i{level}) + ']'")
            if level + 1 < levels:
                parts.append(repr(pieces[level + 1]))
        return " + ".join(parts)

    def location(self) -> str:
        levels = len(self.segments) - 1
        if levels == 0:
            return repr(self.records.text)
        return self._location(levels)


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
    function = compile_reading(spec, access, code)

    def decode(payload: bytes, limits: Limits) -> Decoded:
        return Decoded(source_id, function(load_json(payload), None, limits.properties, limits))

    decode.records = function  # type: ignore[attr-defined]
    return decode


# -- CSV ------------------------------------------------------------------------------------------------------------


class CsvAccess(_Access):
    """A record is a row; a column is named by the header or counted from 1."""

    raw = "text"

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

    def fetch_field(self, gen: Gen, source: Source, var: str) -> None:
        c = f"c{source.ref}"
        gen.line(f"{var} = (r[{c}].strip() or None) if {c} < len(r) else None")

    @contextmanager
    def loop(self, gen: Gen) -> Iterator[None]:
        for index in range(len(self.columns)):
            gen.line(f"c{index} = aux[{index}]")
        with gen.block("for r in src:"):
            with gen.block("if not r or not ''.join(r).strip():"):
                gen.line("continue  # a blank line")
            yield

    def location(self) -> str:
        return "'line ' + str(src.line_num)"


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
    function = compile_reading(spec, access, code)
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

    decode.records = function  # type: ignore[attr-defined]
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
    """Header fields are per message (``aux``), record fields per record (``r``)."""

    raw = "number"

    def __init__(self, header: Layout | None, record: Layout) -> None:
        self.header = header
        self.record = record

    def message_level(self, source: Source) -> bool:
        if source.kind == "field":
            return self.header is not None and source.ref in self.header.names
        return super().message_level(source)

    def fetch_field(self, gen: Gen, source: Source, var: str) -> None:
        if self.header is not None and source.ref in self.header.names:
            gen.line(f"{var} = aux[{self.header.names[source.ref]}]")
        else:
            gen.line(f"{var} = r[{self.record.names[source.ref]}]")

    @contextmanager
    def loop(self, gen: Gen) -> Iterator[None]:
        with gen.block("for i0, r in enumerate(src):"):
            yield

    def location(self) -> str:
        return "'records[' + str(i0) + ']'"


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
    function = compile_reading(spec, access, code)
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

    decode.records = function  # type: ignore[attr-defined]
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
    """A record is ``{EPC: value}`` from one frame; ``aux`` names the frame for messages."""

    raw = "number"

    def fetch_field(self, gen: Gen, source: Source, var: str) -> None:
        gen.line(f"{var} = r.get({source.ref})")

    @contextmanager
    def loop(self, gen: Gen) -> Iterator[None]:
        with gen.block("for r in src:"):
            yield

    def location(self) -> str:
        return "_seoj(aux)"


def compile_epc_reading(spec: ReadingSpec, code: str) -> RecordFunction:
    return compile_reading(spec, EpcAccess(), code)
