"""Extraction conditions (docs/protocol.md, Extraction): validated into a Query, or ``bad_request`` naming why.

Errors name a condition as its asker wrote it: the JSON key on the wire, the option on the command line
(``Names``), so a person can find what to change without knowing the other spelling.
"""

from __future__ import annotations

import base64
import binascii
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson

from hubd.auth.registry import Der
from hubd.config import QueryConfig
from hubd.model import DER_TYPES, FIELDS, MAX_TIME_MS, MIN_TIME_MS, ErrorCode, HubError, parse_time
from hubd.query.buckets import INTERVALS_MS, zone

AGGREGATIONS = ("mean", "min", "max", "sum", "first", "last", "count", "delta")
OPERATORS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "=", "ne": "!="}  # as SQL says them
# The same operators applied in Python, where the hub filters readings itself (energy's own rows, InfluxDB's points).
COMPARE: dict[str, Callable[[float, float], bool]] = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "eq": operator.eq,
    "ne": operator.ne,
}
KEYS = {
    "client_id",
    "password",
    "start",
    "end",
    "at",
    "at_tolerance_s",
    "der_ids",
    "types",
    "areas",
    "bbox",
    "fields",
    "where",
    "interval",
    "agg",
    "tz",
    "limit",
    "cursor",
    "clock_flagged",
    "reply_to",
    "request_id",
}

UTC_ZONE = ZoneInfo("UTC")
Mode = Literal["raw", "at", "buckets"]
MAX_NAMED_UNKNOWN = 20  # unknown DER ids spelled out in an error message; the rest are counted


class Names:
    """How the asker spells each condition in error messages: by default its JSON key (``agg.power_kw``);
    given ``{"agg": "--agg"}``, the command-line option (``--agg power_kw``)."""

    def __init__(self, spelled: Mapping[str, str] | None = None) -> None:
        self._spelled = dict(spelled or {})

    def __call__(self, key: str) -> str:
        return self._spelled.get(key, key)

    def entry(self, key: str, item: str) -> str:
        """One entry of an object condition, such as the aggregation of one field."""
        return f"{self._spelled[key]} {item}" if key in self._spelled else f"{key}.{item}"


JSON_NAMES = Names()


@dataclass(frozen=True)
class Query:
    """What to extract. ``der_ids`` is None for "every DER", else the DERs the filters leave."""

    mode: Mode
    start: int
    end: int
    der_ids: tuple[str, ...] | None
    fields: tuple[str, ...]
    where: tuple[tuple[str, str, float], ...]
    limit: int
    cursor: tuple[Any, ...] | None = None
    at: int = 0
    tolerance_ms: int = 0
    interval: str = ""
    agg: tuple[tuple[str, str], ...] = ()
    tz: ZoneInfo = UTC_ZONE
    unknown_der_ids: tuple[str, ...] = ()  # named in der_ids but not in the registry: a warning in the answer
    flagged: bool | None = None  # clock_flagged: only readings with a clock flag (True), only without (False)

    @property
    def columns(self) -> tuple[tuple[str, str, str], ...]:
        """(field, aggregation, column) of each bucket value: a field aggregated one way keeps its own name, a
        field aggregated several ways gets one column per aggregation, ``<field>_<aggregation>``."""
        ways: dict[str, int] = {}
        for field, _ in self.agg:
            ways[field] = ways.get(field, 0) + 1
        return tuple((field, how, field if ways[field] == 1 else f"{field}_{how}") for field, how in self.agg)


def bad(message: str) -> HubError:
    return HubError(ErrorCode.BAD_REQUEST, message)


def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


def decode_cursor(cursor: object, mode: Mode) -> tuple[Any, ...]:
    """A cursor is the last row's key: (measured_at, der_id) raw, (der_id,) at, (der_id, bucket_start) buckets."""
    shape = {"raw": (int, str), "at": (str,), "buckets": (str, int)}[mode]
    refused = bad("cursor is not one this hub issued for this kind of query")
    if not isinstance(cursor, str):
        raise refused
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise refused from None
    if (
        not isinstance(value, list)
        or len(value) != len(shape)
        or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(value, shape, strict=True))
        or not all(MIN_TIME_MS <= v < MAX_TIME_MS for v in value if isinstance(v, int))  # times, as parse_time
    ):
        raise refused
    return tuple(value)


def _strings(
    request: Mapping[str, Any], key: str, names: Names, allowed: tuple[str, ...] | None = None
) -> tuple[str, ...]:
    value = request.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(f"{names(key)} must be a list of strings")
    if allowed is not None:
        for item in value:
            if item not in allowed:
                raise bad(f"{names(key)}: unknown value {item!r} (one of {', '.join(allowed)})")
    return tuple(dict.fromkeys(value))


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise bad(f"{what} must be a number")
    return float(value)


def _where(value: object, names: Names) -> tuple[tuple[str, str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad(f'{names("where")} must be an object such as {{"power_kw": {{"gte": 1.0}}}}')
    out = []
    for field, tests in value.items():
        if field not in FIELDS:
            raise bad(f"{names('where')}: unknown field {field!r}")
        entry = names.entry("where", field)
        if not isinstance(tests, dict) or not tests:
            raise bad(f'{entry} must be an object such as {{"gte": 1.0}}')
        for op, operand in tests.items():
            if op not in OPERATORS:
                raise bad(f"{entry}: unknown operator {op!r} (one of {', '.join(OPERATORS)})")
            out.append((field, op, _number(operand, f"{entry}.{op}")))
    return tuple(out)


def _ders(
    request: Mapping[str, Any], ders: Mapping[str, Der], config: QueryConfig, names: Names
) -> tuple[str, ...] | None:
    """Resolve der_ids, types, areas and bbox against the registry into the DERs to extract."""
    der_ids = _strings(request, "der_ids", names)
    if len(der_ids) > config.max_der_ids:
        raise bad(f"at most {config.max_der_ids} {names('der_ids')} per query, got {len(der_ids)}")
    types = _strings(request, "types", names, DER_TYPES)
    areas = _strings(request, "areas", names)
    bbox = request.get("bbox")
    if bbox is not None:
        shape = f"{names('bbox')} must be [min_lon, min_lat, max_lon, max_lat]"
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise bad(shape)
        west, south, east, north = (_number(v, names("bbox")) for v in bbox)
        if west > east or south > north:
            raise bad(f"{shape} with min <= max")
    if not (types or areas or bbox is not None):
        return tuple(sorted(d for d in der_ids if d in ders)) if der_ids else None
    chosen = []
    for der_id in der_ids or sorted(ders):
        der = ders.get(der_id)
        if der is None or (types and der.type not in types) or (areas and der.area not in areas):
            continue
        if bbox is not None and (
            der.lat is None or der.lon is None or not (west <= der.lon <= east and south <= der.lat <= north)
        ):
            continue
        chosen.append(der_id)
    return tuple(sorted(chosen))


def parse_query(
    request: Mapping[str, Any], config: QueryConfig, ders: Mapping[str, Der], names: Names = JSON_NAMES
) -> Query:
    """Validate a query request; every problem is a ``bad_request`` that names the condition as ``names`` spell
    it. DERs in ``der_ids`` that the registry (``ders``) does not know are left out and named in
    ``Query.unknown_der_ids``; when ``der_ids`` names no DER the registry knows, the query is refused
    ``unknown_der``, so that a mistyped id never reads as "no data"."""
    query = _parse(request, config, ders, names)
    named = _strings(request, "der_ids", names)
    if named and len(query.unknown_der_ids) == len(named):
        listed = ", ".join(named[:MAX_NAMED_UNKNOWN])
        more = f" and {len(named) - MAX_NAMED_UNKNOWN} more" if len(named) > MAX_NAMED_UNKNOWN else ""
        raise HubError(ErrorCode.UNKNOWN_DER, f"{names('der_ids')} names no DER this hub knows: {listed}{more}")
    return query


def _parse(request: Mapping[str, Any], config: QueryConfig, ders: Mapping[str, Der], names: Names) -> Query:
    unknown = set(request) - KEYS
    if unknown:
        raise bad(f"unknown condition {sorted(unknown)[0]!r}")
    limit = request.get("limit", config.default_limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise bad(f"{names('limit')} must be a positive integer")
    limit = min(limit, config.max_limit)
    fields = _strings(request, "fields", names, FIELDS)
    common: dict[str, Any] = {
        "der_ids": _ders(request, ders, config, names),
        "where": _where(request.get("where"), names),
        "limit": limit,
        "unknown_der_ids": tuple(sorted(d for d in _strings(request, "der_ids", names) if d not in ders)),
        "flagged": _flagged(request.get("clock_flagged"), names),
    }
    cursor = request.get("cursor")

    if "at" in request:
        if "start" in request or "end" in request or "interval" in request:
            raise bad(
                f"{names('at')} asks for one instant: leave out {names('start')}, {names('end')} and "
                f"{names('interval')}"
            )
        at = parse_time(request["at"], names("at"))
        tolerance = _number(request.get("at_tolerance_s", 0), names("at_tolerance_s"))
        if not 0 <= tolerance <= 86_400:
            raise bad(f"{names('at_tolerance_s')} must be 0 … 86400")
        tolerance_ms = int(tolerance * 1000)
        return Query(
            "at",
            at - tolerance_ms,
            at + tolerance_ms + 1,
            fields=fields or FIELDS,
            at=at,
            tolerance_ms=tolerance_ms,
            cursor=decode_cursor(cursor, "at") if cursor is not None else None,
            **common,
        )
    if "at_tolerance_s" in request:
        raise bad(f"{names('at_tolerance_s')} goes with {names('at')}")
    for key in ("start", "end"):
        if key not in request:
            raise bad(f"{names(key)} is required (or {names('at')}, for one instant)")
    start, end = parse_time(request["start"], names("start")), parse_time(request["end"], names("end"))
    if end <= start:
        raise bad(f"{names('end')} must be after {names('start')}")
    interval = request.get("interval")
    if interval is None:
        for key in ("agg", "tz"):
            if key in request:
                raise bad(f"{names(key)} goes with {names('interval')}")
        return Query(
            "raw",
            start,
            end,
            fields=fields or FIELDS,
            cursor=decode_cursor(cursor, "raw") if cursor is not None else None,
            **common,
        )
    if interval not in INTERVALS_MS:
        raise bad(f"{names('interval')} must be one of {', '.join(INTERVALS_MS)}")
    agg = _agg(request.get("agg"), names)
    if fields and set(agg) - set(fields):
        raise bad(f"{names('agg')} names {sorted(set(agg) - set(fields))[0]!r}, which {names('fields')} leaves out")
    chosen = fields or tuple(agg) or ("power_kw",)
    pairs = tuple((field, how) for field in chosen for how in agg.get(field, ("mean",)))
    return Query(
        "buckets",
        start,
        end,
        fields=chosen,
        interval=interval,
        agg=pairs,
        tz=zone(request.get("tz", "UTC"), names("tz")),
        cursor=decode_cursor(cursor, "buckets") if cursor is not None else None,
        **common,
    )


def _flagged(value: object, names: Names) -> bool | None:
    """``clock_flagged``: true (only readings from a clock known to be off), false (only the others), or absent."""
    if value is not None and not isinstance(value, bool):
        raise bad(f"{names('clock_flagged')} must be true or false")
    return value


def _agg(value: object, names: Names) -> dict[str, tuple[str, ...]]:
    """``{"power_kw": "mean"}``, or a list to aggregate a field several ways: ``{"power_kw": ["min", "max"]}``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f'{names("agg")} must be an object such as {{"power_kw": "mean"}}')
    out: dict[str, tuple[str, ...]] = {}
    for field, hows in value.items():
        if field not in FIELDS:
            raise bad(f"{names('agg')}: unknown field {field!r}")
        entry = names.entry("agg", field)
        listed = [hows] if isinstance(hows, str) else hows
        if not isinstance(listed, list) or not listed or not all(isinstance(how, str) for how in listed):
            raise bad(f'{entry} must be an aggregation or a list of them, such as "mean" or ["min", "max"]')
        for how in listed:
            if how not in AGGREGATIONS:
                raise bad(f"{entry}: unknown aggregation {how!r} (one of {', '.join(AGGREGATIONS)})")
            if how == "delta" and field != "energy_kwh":
                raise bad(f"{entry}: delta is for energy_kwh, the cumulative register")
        out[field] = tuple(dict.fromkeys(listed))
    return out
