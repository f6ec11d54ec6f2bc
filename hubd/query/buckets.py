"""Buckets aligned to midnight in a time zone, and the 30-minute settlement slots of the power market.

Buckets are spans of real (UTC) time laid from each local midnight, so a day with a daylight-saving change
has 46 or 50 half-hour slots, numbered in order, and a ``1d`` bucket is that local day however long it is.
The store is handed the buckets themselves, so it never needs to know about zones.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hubd.model import ErrorCode, HubError

INTERVALS_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1h": 3_600_000, "1d": 86_400_000}
MAX_BUCKETS = 200_000


@dataclass(frozen=True, slots=True)
class Bucket:
    start: int  # aligned edges: what the row reports, and where delta reads the register
    end: int
    slot: int  # 1-based position within its local day
    lo: int  # the part of the bucket inside the query's [start, end): where readings are taken from
    hi: int


def zone(name: object, what: str = "tz") -> ZoneInfo:
    """The zone called ``name``; ``what`` is how the asker spells the condition (``tz``, ``--tz``)."""
    if not isinstance(name, str) or not name:
        raise HubError(ErrorCode.BAD_REQUEST, f"{what} must be an IANA time zone name such as Asia/Tokyo")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise HubError(ErrorCode.BAD_REQUEST, f"{what}: unknown time zone {name!r}") from None


def _midnight(day: date, tz: ZoneInfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)


def buckets(start: int, end: int, interval: str, tz: ZoneInfo) -> list[Bucket]:
    """Every bucket that overlaps [start, end), in order."""
    step = INTERVALS_MS[interval]
    day = datetime.fromtimestamp(start / 1000, UTC).astimezone(tz).date()
    if _midnight(day, tz) > start:  # a zone whose midnight was skipped: begin a day earlier
        day -= timedelta(days=1)
    out: list[Bucket] = []
    while True:
        day_start, day_end = _midnight(day, tz), _midnight(day + timedelta(days=1), tz)
        if day_start >= end:
            return out
        width = day_end - day_start if interval == "1d" else step
        slot, at = 1, day_start
        while at < day_end:
            upper = min(at + width, day_end)
            if upper > start and at < end:
                out.append(Bucket(at, upper, slot, max(at, start), min(upper, end)))
                if len(out) > MAX_BUCKETS:
                    raise HubError(
                        ErrorCode.BAD_REQUEST,
                        f"more than {MAX_BUCKETS} buckets: use a longer interval or a shorter range",
                    )
            slot += 1
            at = upper
        day += timedelta(days=1)
