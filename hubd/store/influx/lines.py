"""Readings as InfluxDB line protocol (precision ms), and points read back as rows.

The series key is the measurement and the one tag ``der_id``; the timestamp is ``measured_at`` in
milliseconds. So (der_id, measured_at) is a point's identity: a reading written again lands on the same
point. Everything else is a field: a tag that could change between two sendings of a reading (its source,
its format) would make a second series, a duplicate, instead of replacing the first.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import orjson

from hubd.model import FIELDS, MIN_TIME_MS
from hubd.store import CLOCK_COLUMNS

# The fields every point has besides its quantities; ``sent_at`` and the clock pair only when present.
META_FIELDS = ("received_at", "source", "format", "sent_at")
ALL_FIELDS = (*FIELDS, *CLOCK_COLUMNS, *META_FIELDS)

_UNSENT = MIN_TIME_MS - 1  # the version of a reading without ``sent_at``, as in hubd.store.sqlite
Point = tuple[str, int, dict[str, Any]]  # (der_id, measured_at, {column: value}) with only present values


_INTEGERS = frozenset(("received_at", "sent_at"))


@functools.lru_cache(maxsize=65_536)
def escape_tag(value: str) -> str:
    """An escaped tag (or measurement) value; kept per DER: every batch names the same DERs again."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


@functools.lru_cache(maxsize=4096)
def _string(value: str) -> str:
    """A quoted string field: a reading's source and format, the same in every line of a batch."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def line(measurement: str, point: Point) -> str:
    """One point as a line; raises ValueError for a value InfluxDB cannot hold. On the write path of every
    reading, so the fields are formatted here in one loop rather than by a function each."""
    der_id, measured_at, values = point
    fields = []
    for name, value in values.items():
        if value is None:
            continue
        if name in _INTEGERS:
            fields.append(f"{name}={int(value)}i")
        elif isinstance(value, str):
            fields.append(f"{name}={_string(value)}")
        else:
            number = float(value)
            if not math.isfinite(number):  # InfluxDB has no NaN or infinity: refused like a value it refuses
                raise ValueError(f"{name}: {value} cannot be stored in InfluxDB")
            fields.append(f"{name}={number!r}")
    return f"{escape_tag(measurement)},der_id={escape_tag(der_id)} {','.join(fields)} {int(measured_at)}"


_NOT_NUMBERS = frozenset(("received_at", "sent_at", "source", "format", "clock_flag"))
_ODD = re.compile(rb":[^-0-9]|\{\}")  # a value that is no number (null for NaN, true, a string), or no quantity


def lines(measurement: str, points: list[Point]) -> list[str] | None:
    """The lines of ``points``, as ``line`` makes them; None if one holds a value it must look at (a NaN, a
    bool, a string quantity): then ``line`` each. A request's quantities are formatted by one orjson call,
    whose shortest round-trip form reads as Python's ``repr`` of a float (1e-7 for 1e-07) at a fraction of
    its cost per float (bench/README.md, bench/influx)."""
    if not points:
        return []
    quantities = [{k: v for k, v in p[2].items() if k not in _NOT_NUMBERS} for p in points]
    try:
        text = orjson.dumps(quantities)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, a type orjson does not know
        return None
    if _ODD.search(text):
        return None
    # [{"a":1.5,"b":2.0},{"a":…}] → ["a=1.5,b=2.0", "a=…"]: the field names are the hub's own, never escaped
    fields = text[3:-2].decode().replace('":', "=").replace(',"', ",").split('},{"')
    head = f"{escape_tag(measurement)},der_id="
    out: list[str] = []
    for p, numbers in zip(points, fields, strict=True):
        der_id, measured_at, values = p
        received_at, source, format_code = values.get("received_at"), values.get("source"), values.get("format")
        if received_at is None or source is None or format_code is None or "clock_flag" in values:
            out.append(line(measurement, p))  # the uncommon shapes
            continue
        sent_at = values.get("sent_at")
        sent = "" if sent_at is None else f",sent_at={int(sent_at)}i"
        out.append(
            f"{head}{escape_tag(der_id)} {numbers},received_at={int(received_at)}i,source={_string(source)},"
            f"format={_string(format_code)}{sent} {int(measured_at)}"
        )
    return out


def point(names: tuple[str, ...], row: tuple[Any, ...]) -> Point:
    """A row of ``hubd.store.Rows`` as a point: (der_id, measured_at, *values, received_at, source_id,
    format_code, sent_at). On the write path of every reading: the quantities are taken whole unless one is
    absent (None), the four last columns one by one."""
    values = dict(zip(names, row[2:-4], strict=True))
    if None in values.values():
        values = {name: value for name, value in values.items() if value is not None}
    received_at, source, format_code, sent_at = row[-4:]
    if received_at is not None:
        values["received_at"] = received_at
    if source is not None:
        values["source"] = source
    if format_code is not None:
        values["format"] = format_code
    if sent_at is not None:
        values["sent_at"] = sent_at
    return row[0], row[1], values


def version(values: dict[str, Any]) -> tuple[int, int]:
    """A point's version as SQLite's upsert compares them: (sent_at, received_at), no sent_at before any."""
    sent_at = values.get("sent_at")
    return (_UNSENT if sent_at is None else int(sent_at), int(values.get("received_at", 0)))
