"""The settlement view: per DER or group per 30-minute slot, actual energy against plan, priced, with how
complete the data behind it is (docs/protocol.md, Settlement).

Actual energy is the extraction's own slot computation (``delta`` of the register, ``sum`` of interval
energies, with the share clock-flagged readings measured), run through ``hubd.query.execute`` on the store's
``ReadingQuery``, so the view is the same on every backend. Plans, prices and weather come from the state file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from hubd.auth.registry import Der
from hubd.config import MarketConfig, QueryConfig
from hubd.market.data import MarketData
from hubd.market.jepx import AREAS, PRICE
from hubd.market.weather import QUANTITIES as WEATHER
from hubd.model import ErrorCode, HubError, format_time, parse_time
from hubd.query.buckets import Bucket, buckets, zone
from hubd.query.conditions import JSON_NAMES, Names, Query, decode_cursor, encode_cursor
from hubd.query.execute import run as run_query
from hubd.store import ReadingQuery

KEYS = {"view", "client_id", "password", "reply_to", "request_id", "start", "end", "tz", "der_ids", "groups"}
KEYS |= {"max_gap_s", "weather", "limit", "cursor"}
DEFAULT_TZ = "Asia/Tokyo"
DAY_MS = 86_400_000
COLUMNS = [
    "der_id",
    "group",
    "bucket_start",
    "slot",
    "actual_kwh",
    "plan_kwh",
    "imbalance_kwh",
    "price_area",
    "price_yen_kwh",
    "imbalance_yen",
    "completeness",
    "clock_flagged_kwh",
]


@dataclass(frozen=True)
class Settlement:
    """What to settle: whole slots of [start, end) in ``tz``, for DERs and groups (with their members)."""

    start: int
    end: int
    tz: ZoneInfo
    der_ids: tuple[str, ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    max_gap_ms: int
    weather: bool
    limit: int
    cursor: tuple[str, str, int] | None = None
    unknown_der_ids: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return COLUMNS + (list(WEATHER) if self.weather else [])


def bad(message: str) -> HubError:
    return HubError(ErrorCode.BAD_REQUEST, message)


def price_area(der: Der | None, price_areas: Mapping[str, str]) -> str | None:
    """The JEPX area a DER is priced in: its ``location.area`` mapped by ``market.price_areas``, or the area
    itself when it is a JEPX area's name (any case); None when neither."""
    area = der.area if der else None
    if area is None:
        return None
    if area in price_areas:
        return price_areas[area]
    return area.lower() if area.lower() in AREAS else None


def parse(
    request: Mapping[str, Any],
    query: QueryConfig,
    market: MarketConfig,
    ders: Mapping[str, Der],
    groups: Mapping[str, tuple[str, ...]],
    names: Names = JSON_NAMES,
) -> Settlement:
    """Validate a settlement request: ``bad_request`` naming the condition, ``unknown_der`` when ``der_ids``
    names only DERs the registry does not know."""
    unknown = set(request) - KEYS
    if unknown:
        raise bad(f"{names(sorted(unknown)[0])} does not go with the settlement view")
    for key in ("start", "end"):
        if key not in request:
            raise bad(f"{names(key)} is required")
    start, end = parse_time(request["start"], names("start")), parse_time(request["end"], names("end"))
    if end <= start:
        raise bad(f"{names('end')} must be after {names('start')}")
    tz = zone(request.get("tz", DEFAULT_TZ), names("tz"))
    laid = buckets(start, end, "30m", tz)
    if not laid or laid[0].start != start or laid[-1].end != end:
        raise bad(f"{names('start')} and {names('end')} must be slot edges (whole half hours) in {tz.key}")
    named = request.get("der_ids") or []
    if not isinstance(named, list) or not all(isinstance(d, str) for d in named):
        raise bad(f"{names('der_ids')} must be a list of strings")
    asked = request.get("groups") or []
    if not isinstance(asked, list) or not all(isinstance(g, str) for g in asked):
        raise bad(f"{names('groups')} must be a list of group names")
    if not named and not asked:
        raise bad(f"the settlement view needs {names('der_ids')} or {names('groups')}")
    if len(named) + len(asked) > query.max_der_ids:
        raise bad(f"at most {query.max_der_ids} DERs and groups per settlement query")
    for group in asked:
        if group not in groups:
            raise bad(f"{names('groups')}: no such group {group[:64]!r}")
    known = tuple(sorted({d for d in named if d in ders}))
    missing = tuple(sorted({d for d in named if d not in ders}))
    if named and not known and not asked:
        raise HubError(
            ErrorCode.UNKNOWN_DER, f"{names('der_ids')} names no DER this hub knows: {', '.join(missing[:20])}"
        )
    gap = request.get("max_gap_s", market.register_max_gap_s)
    if isinstance(gap, bool) or not isinstance(gap, int | float) or not 0 < gap <= 86_400:
        raise bad(f"{names('max_gap_s')} must be a number of seconds, more than 0 and at most 86400")
    weather = request.get("weather", False)
    if not isinstance(weather, bool):
        raise bad(f"{names('weather')} must be true or false")
    limit = request.get("limit", query.default_limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise bad(f"{names('limit')} must be a positive integer")
    cursor = request.get("cursor")
    parsed_cursor = parse_cursor(cursor) if cursor is not None else None
    return Settlement(
        start,
        end,
        tz,
        known,
        tuple((g, tuple(m for m in groups[g] if m in ders)) for g in sorted(set(asked))),
        int(gap * 1000),
        weather,
        min(limit, query.max_limit),
        parsed_cursor,
        missing,
    )


def parse_cursor(cursor: object) -> tuple[str, str, int]:
    """A settlement cursor: the last row's target (``der@<id>``, ``group@<name>``) and slot start."""
    refused = bad("cursor is not one this hub issued for the settlement view")
    try:
        packed, at = decode_cursor(cursor, "buckets")  # the same (text, time) shape as a bucket row's key
    except HubError:
        raise refused from None
    kind, _, name = str(packed).partition("@")
    if kind not in ("der", "group") or not name:
        raise refused
    return kind, name, int(at)


def settle(
    s: Settlement, store: ReadingQuery, market: MarketData, ders: Mapping[str, Der], config: MarketConfig
) -> dict[str, Any]:
    """One page of the settlement view: ``{"ok": true, "view": "settlement", "rows": [...], ...}``."""
    laid = buckets(s.start, s.end, "30m", s.tz)
    targets = [("der", d) for d in s.der_ids] + [("group", g) for g, _ in s.groups]
    members = dict(s.groups)
    computed: dict[str, list[dict[str, Any]]] = {}
    prices: dict[str, dict[int, float]] = {}  # by price area: read once per page, not once per DER

    def der_slots(der_id: str) -> list[dict[str, Any]]:
        if der_id not in computed:
            der = ders.get(der_id)
            area = price_area(der, config.price_areas)
            if area is not None and area not in prices:
                prices[area] = {start: value for start, _, value in market.series("jepx", area, PRICE, s.start, s.end)}
            computed[der_id] = _der_slots(s, laid, der_id, store, market, der, area, prices.get(area or "", {}))
        return computed[der_id]

    rows: list[dict[str, Any]] = []
    keys: list[tuple[str, str, int]] = []
    after = s.cursor[1] if s.cursor is not None and s.cursor[0] == "der" else ""
    store.expect([d for d in s.der_ids if d >= after])  # one after another, in this order (each DER's slots)
    for kind, name in targets:  # in (kind, name) order: DERs ("der") before groups, each sorted
        if s.cursor is not None and (kind, name) < s.cursor[:2]:
            continue
        if kind == "der":
            slots = der_slots(name)
        else:
            plans = market.plans(f"group:{name}", s.start, s.end)
            slots = _group_slots(laid, [der_slots(d) for d in members[name]], plans, s.weather)
        for bucket, values in zip(laid, slots, strict=True):
            if s.cursor is not None and (kind, name) == s.cursor[:2] and bucket.start <= s.cursor[2]:
                continue
            rows.append({"der_id" if kind == "der" else "group": name, **values})
            keys.append((kind, name, bucket.start))
            if len(rows) > s.limit:
                break
        if len(rows) > s.limit:
            break
    cursor = None
    if len(rows) > s.limit:
        kind, name, at = keys[s.limit - 1]
        cursor = encode_cursor(f"{kind}@{name}", at)
    rows = rows[: s.limit]
    answer: dict[str, Any] = {"ok": True, "view": "settlement", "rows": rows, "count": len(rows), "next_cursor": cursor}
    if s.unknown_der_ids:
        answer["unknown_der_ids"] = list(s.unknown_der_ids)
    return answer


def _actual(s: Settlement, laid: list[Bucket], der_id: str, store: ReadingQuery) -> dict[int, dict[str, Any]]:
    """The extraction's own 30-minute rows (register delta, interval sum, flagged share) by slot start."""
    query = Query(
        "buckets",
        s.start,
        s.end,
        der_ids=(der_id,),
        fields=("energy_kwh", "energy_interval_kwh"),
        where=(),
        limit=len(laid) + 1,
        interval="30m",
        agg=(("energy_kwh", "delta"), ("energy_interval_kwh", "sum")),
        tz=s.tz,
    )
    labels = {format_time(b.start): b.start for b in laid}
    return {labels[row["bucket_start"]]: row for row in run_query(query, store)["rows"]}


def _covered(s: Settlement, der_id: str, store: ReadingQuery) -> list[tuple[int, int]]:
    """The spans the DER's readings cover, merged: between register readings no more than the gap apart, or
    each interval reading's own interval."""
    registers = store.series(der_id, s.start - s.max_gap_ms, s.end + s.max_gap_ms + 1, ("energy_kwh",))
    if registers:  # in time order: one pass, a span grows while the readings stay close enough
        runs: list[list[int]] = []
        previous = None
        for at, _ in registers:
            if previous is not None and at - previous <= s.max_gap_ms:
                if runs and runs[-1][1] == previous:
                    runs[-1][1] = at
                else:
                    runs.append([previous, at])
            previous = at
        return [(lo, hi) for lo, hi in runs]
    intervals = store.series(der_id, s.start, s.end + DAY_MS, ("energy_interval_kwh", "interval_s"))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted((t - int(seconds * 1000), t) for t, _, seconds in intervals if seconds > 0):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _share(bucket: Bucket, covered: list[tuple[int, int]]) -> float:
    inside = sum(max(0, min(hi, bucket.end) - max(lo, bucket.start)) for lo, hi in covered)
    return inside / (bucket.end - bucket.start)


def _at(points: list[tuple[int, int, float]], at: int) -> float | None:
    for start, end, value in points:
        if start <= at < end:
            return value
    return None


def _der_slots(
    s: Settlement,
    laid: list[Bucket],
    der_id: str,
    store: ReadingQuery,
    market: MarketData,
    der: Der | None,
    area: str | None,
    prices: dict[int, float],
) -> list[dict[str, Any]]:
    actual = _actual(s, laid, der_id, store)
    covered = _covered(s, der_id, store)
    plans = market.plans(f"der:{der_id}", s.start, s.end)
    weather = {}
    if s.weather and der is not None and der.area:
        weather = {q: market.series("weather", der.area, q, s.start, s.end) for q in WEATHER}
    out = []
    for bucket in laid:
        row = actual.get(bucket.start, {})
        energy = row.get("energy_kwh", row.get("energy_interval_kwh"))
        flagged = energy * row["clock_flagged_share"] if energy is not None and "clock_flagged_share" in row else 0.0
        values = _priced(energy, plans.get(bucket.start), area, prices.get(bucket.start))
        slot: dict[str, Any] = {
            "bucket_start": format_time(bucket.start),
            "slot": bucket.slot,
            **values,
            "completeness": round(_share(bucket, covered), 4),
            "clock_flagged_kwh": round(flagged, 6),
        }
        if s.weather:
            slot.update({q: _at(weather.get(q, []), bucket.start) for q in WEATHER})
        out.append(slot)
    return out


def _priced(actual: float | None, plan: float | None, area: str | None, price: float | None) -> dict[str, Any]:
    imbalance = actual - plan if actual is not None and plan is not None else None
    value = imbalance * price if imbalance is not None and price is not None else None
    return {
        "actual_kwh": None if actual is None else round(actual, 6),
        "plan_kwh": plan,
        "imbalance_kwh": None if imbalance is None else round(imbalance, 6),
        "price_area": area,
        "price_yen_kwh": price,
        "imbalance_yen": None if value is None else round(value, 4),
    }


def _group_slots(
    laid: list[Bucket], members: list[list[dict[str, Any]]], plans: dict[int, float], weather: bool
) -> list[dict[str, Any]]:
    """A group's slot: its members' actual energies summed against the group's own plan, priced at the mean of
    the members' area prices weighted by their actual energy (plain mean when they produced none)."""
    out = []
    for index, bucket in enumerate(laid):
        rows = [m[index] for m in members]
        energies = [r["actual_kwh"] for r in rows if r["actual_kwh"] is not None]
        actual = math.fsum(energies) if energies else None
        prices = [r["price_yen_kwh"] for r in rows]
        price = None
        if rows and all(p is not None for p in prices):
            weights = [max(r["actual_kwh"] or 0.0, 0.0) for r in rows]
            total = math.fsum(weights)
            price = (
                math.fsum(w * p for w, p in zip(weights, prices, strict=True)) / total
                if total > 0
                else math.fsum(prices) / len(prices)
            )
            price = round(price, 6)
        areas = sorted({r["price_area"] for r in rows if r["price_area"]})
        slot: dict[str, Any] = {
            "bucket_start": format_time(bucket.start),
            "slot": bucket.slot,
            **_priced(actual, plans.get(bucket.start), ",".join(areas) or None, price),
            "completeness": round(math.fsum(r["completeness"] for r in rows) / len(rows), 4) if rows else 0.0,
            "clock_flagged_kwh": round(math.fsum(r["clock_flagged_kwh"] for r in rows), 6),
            "members": len(rows),
        }
        if weather:
            slot.update({q: None for q in WEATHER})
        out.append(slot)
    return out
