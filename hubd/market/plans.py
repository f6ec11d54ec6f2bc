"""Plans as the market system sends them: per DER or group, per slot of a local day, in kWh.

One shape on the wire and in a file: entries of ``der_id`` (or ``group``), ``date`` (the local day in the
plan's time zone), ``slot`` (1 … the day's number of half hours: 48, or 46/50 on a daylight-saving day) and
``kwh``. Every entry is checked before any is stored: one bad entry refuses the whole plan.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Collection, Mapping
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hubd.market.data import PlanEntry
from hubd.market.jepx import bad, decode
from hubd.model import ErrorCode, HubError
from hubd.query.buckets import buckets

MAX_ENTRIES = 100_000
DEFAULT_TZ = "Asia/Tokyo"  # the zone of JEPX's slots


def day_slots(day: date, tz: ZoneInfo) -> list[tuple[int, int]]:
    """(start, end) in epoch ms of each half-hour slot of the local ``day``, in order (46, 48 or 50 of them)."""
    start = int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)
    after = day + timedelta(days=1)
    end = int(datetime(after.year, after.month, after.day, tzinfo=tz).timestamp() * 1000)
    return [(b.start, b.end) for b in buckets(start, end, "30m", tz)]


def entries(
    items: object, tz: ZoneInfo, ders: Collection[str], groups: Collection[str], where: str = "plans"
) -> list[PlanEntry]:
    """Check plan entries (a list of objects); unknown DERs are ``unknown_der``, anything else ``bad_request``."""
    if not isinstance(items, list) or not items:
        raise bad(f"{where} must be a non-empty list of {{der_id or group, date, slot, kwh}}")
    if len(items) > MAX_ENTRIES:
        raise bad(f"at most {MAX_ENTRIES} entries in one plan, got {len(items)}")
    days: dict[str, list[tuple[int, int]]] = {}
    out: list[PlanEntry] = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        if not isinstance(item, Mapping):
            raise bad(f"{at} must be an object")
        unknown = set(item) - {"der_id", "group", "date", "slot", "kwh"}
        if unknown:
            raise bad(f"{at}: unknown key {sorted(unknown)[0]!r}")
        der_id, group = item.get("der_id"), item.get("group")
        if (der_id is None) == (group is None):
            raise bad(f"{at}: give der_id or group, not both")
        if der_id is not None:
            if der_id not in ders:
                raise HubError(ErrorCode.UNKNOWN_DER, f"{at}: no such DER {str(der_id)[:64]!r}")
            target = f"der:{der_id}"
        else:
            if group not in groups:
                raise bad(f"{at}: no such group {str(group)[:64]!r}")
            target = f"group:{group}"
        text = item.get("date")
        if not isinstance(text, str):
            raise bad(f"{at}.date must be a date such as 2026-11-27")
        if text not in days:
            try:
                days[text] = day_slots(date.fromisoformat(text), tz)
            except ValueError:
                raise bad(f"{at}.date: {text[:40]!r} is not a date such as 2026-11-27") from None
        slots = days[text]
        slot = item.get("slot")
        if isinstance(slot, bool) or not isinstance(slot, int) or not 1 <= slot <= len(slots):
            raise bad(f"{at}.slot must be 1 … {len(slots)} on {text} in {tz.key}")
        kwh = item.get("kwh")
        if isinstance(kwh, bool) or not isinstance(kwh, int | float) or not math.isfinite(kwh):
            raise bad(f"{at}.kwh must be a number")
        start, end = slots[slot - 1]
        out.append(PlanEntry(target, start, end, float(kwh)))
    return out


def read_csv(data: bytes) -> list[dict[str, Any]]:
    """A plan file (header ``der_id,group,date,slot,kwh``; der_id or group may be left out) as entries."""
    reader = csv.DictReader(io.StringIO(decode(data)))
    header = {name.strip() for name in reader.fieldnames or []}
    if not {"date", "slot", "kwh"} <= header or not header & {"der_id", "group"}:
        raise bad("a plan CSV needs the header der_id (or group), date, slot, kwh")
    items: list[dict[str, Any]] = []
    for line, row in enumerate(reader, start=2):
        cells = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        try:
            slot, kwh = int(cells["slot"]), float(cells["kwh"])
        except ValueError:
            raise bad(f"line {line}: slot must be a whole number and kwh a number") from None
        item: dict[str, Any] = {"date": cells["date"], "slot": slot, "kwh": kwh}
        for key in ("der_id", "group"):
            if cells.get(key):
                item[key] = cells[key]
        items.append(item)
    return items
