"""Extraction conditions (PROTOCOL.md, Extraction): validated into a Query, or ``bad_request`` naming why."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson

from hubd.auth.registry import Der
from hubd.config import QueryConfig
from hubd.model import DER_TYPES, FIELDS, MAX_TIME_MS, MIN_TIME_MS, ErrorCode, HubError, parse_time
from hubd.query.buckets import INTERVALS_MS, zone

AGGREGATIONS = ("mean", "min", "max", "sum", "first", "last", "count", "delta")
OPERATORS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "=", "ne": "!="}
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
    "reply_to",
    "request_id",
}

UTC_ZONE = ZoneInfo("UTC")
Mode = Literal["raw", "at", "buckets"]


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


def _strings(request: Mapping[str, Any], key: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    value = request.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(f"{key} must be a list of strings")
    if allowed is not None:
        for item in value:
            if item not in allowed:
                raise bad(f"{key}: unknown value {item!r} (one of {', '.join(allowed)})")
    return tuple(dict.fromkeys(value))


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise bad(f"{what} must be a number")
    return float(value)


def _where(value: object) -> tuple[tuple[str, str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad('where must be an object such as {"power_kw": {"gte": 1.0}}')
    out = []
    for field, tests in value.items():
        if field not in FIELDS:
            raise bad(f"where: unknown field {field!r}")
        if not isinstance(tests, dict) or not tests:
            raise bad(f'where.{field} must be an object such as {{"gte": 1.0}}')
        for op, operand in tests.items():
            if op not in OPERATORS:
                raise bad(f"where.{field}: unknown operator {op!r} (one of {', '.join(OPERATORS)})")
            out.append((field, op, _number(operand, f"where.{field}.{op}")))
    return tuple(out)


def _ders(request: Mapping[str, Any], ders: Mapping[str, Der], config: QueryConfig) -> tuple[str, ...] | None:
    """Resolve der_ids, types, areas and bbox against the registry into the DERs to extract."""
    der_ids = _strings(request, "der_ids")
    if len(der_ids) > config.max_der_ids:
        raise bad(f"at most {config.max_der_ids} der_ids per query, got {len(der_ids)}")
    types = _strings(request, "types", DER_TYPES)
    areas = _strings(request, "areas")
    bbox = request.get("bbox")
    if bbox is not None:
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise bad("bbox must be [min_lon, min_lat, max_lon, max_lat]")
        west, south, east, north = (_number(v, "bbox") for v in bbox)
        if west > east or south > north:
            raise bad("bbox must be [min_lon, min_lat, max_lon, max_lat] with min <= max")
    if not (types or areas or bbox is not None):
        return tuple(sorted(der_ids)) if der_ids else None
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


def parse_query(request: Mapping[str, Any], config: QueryConfig, ders: Mapping[str, Der]) -> Query:
    """Validate a query request; every problem is a ``bad_request`` that names the condition."""
    unknown = set(request) - KEYS
    if unknown:
        raise bad(f"unknown condition {sorted(unknown)[0]!r}")
    limit = request.get("limit", config.default_limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise bad("limit must be a positive integer")
    limit = min(limit, config.max_limit)
    fields = _strings(request, "fields", FIELDS)
    common: dict[str, Any] = {
        "der_ids": _ders(request, ders, config),
        "where": _where(request.get("where")),
        "limit": limit,
    }
    cursor = request.get("cursor")

    if "at" in request:
        if "start" in request or "end" in request or "interval" in request:
            raise bad("at asks for one instant: leave out start, end and interval")
        at = parse_time(request["at"], "at")
        tolerance = _number(request.get("at_tolerance_s", 0), "at_tolerance_s")
        if not 0 <= tolerance <= 86_400:
            raise bad("at_tolerance_s must be 0 … 86400")
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
        raise bad("at_tolerance_s goes with at")
    for key in ("start", "end"):
        if key not in request:
            raise bad(f"{key} is required (or at, for one instant)")
    start, end = parse_time(request["start"], "start"), parse_time(request["end"], "end")
    if end <= start:
        raise bad("end must be after start")
    interval = request.get("interval")
    if interval is None:
        for key in ("agg", "tz"):
            if key in request:
                raise bad(f"{key} goes with interval")
        return Query(
            "raw",
            start,
            end,
            fields=fields or FIELDS,
            cursor=decode_cursor(cursor, "raw") if cursor is not None else None,
            **common,
        )
    if interval not in INTERVALS_MS:
        raise bad(f"interval must be one of {', '.join(INTERVALS_MS)}")
    agg = request.get("agg") or {}
    if not isinstance(agg, dict):
        raise bad('agg must be an object such as {"power_kw": "mean"}')
    for field, how in agg.items():
        if field not in FIELDS:
            raise bad(f"agg: unknown field {field!r}")
        if how not in AGGREGATIONS:
            raise bad(f"agg.{field}: unknown aggregation {how!r} (one of {', '.join(AGGREGATIONS)})")
        if how == "delta" and field != "energy_kwh":
            raise bad("delta is for energy_kwh, the cumulative register")
    if fields and set(agg) - set(fields):
        raise bad(f"agg names {sorted(set(agg) - set(fields))[0]!r}, which fields leaves out")
    chosen = fields or tuple(agg) or ("power_kw",)
    pairs = tuple((field, agg.get(field, "mean")) for field in chosen)
    return Query(
        "buckets",
        start,
        end,
        fields=chosen,
        interval=interval,
        agg=pairs,
        tz=zone(request.get("tz", "UTC")),
        cursor=decode_cursor(cursor, "buckets") if cursor is not None else None,
        **common,
    )
