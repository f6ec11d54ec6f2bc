"""JEPX day-ahead spot results (the published ``spot_summary`` CSV) as series: prices and volumes per slot.

The layout: 年月日 (date), 時刻コード (slot code 1-48 of the day in Japan time), 売り入札量 / 買い入札量 / 約定総量
(sell, buy and contracted volume, kWh), システムプライス (the system price, yen/kWh), one エリアプライス<area>
column per price area, then columns this importer does not need (averages, avoidable costs, FIP prices). JEPX
publishes it in Shift_JIS; UTF-8 (with or without a byte-order mark) is read as well.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from hubd.market.data import Point
from hubd.model import ErrorCode, HubError

JAPAN = ZoneInfo("Asia/Tokyo")
SLOT_MS = 1_800_000
# JEPX's price areas, as the hub names them, with the names in JEPX's column headers.
AREAS: dict[str, str] = {
    "hokkaido": "北海道",
    "tohoku": "東北",
    "tokyo": "東京",
    "chubu": "中部",
    "hokuriku": "北陸",
    "kansai": "関西",
    "chugoku": "中国",
    "shikoku": "四国",
    "kyushu": "九州",
}
SYSTEM = "system"  # the place of the system price and the volumes
PRICE = "price_yen_kwh"
VOLUMES = {"売り入札量": "sell_bid_kwh", "買い入札量": "buy_bid_kwh", "約定総量": "contract_kwh"}
_BY_NAME = {name: slug for slug, name in AREAS.items()}
_AREA_PRICE = re.compile(r"^エリアプライス\s*([^\s(（]+)")


def bad(message: str) -> HubError:
    return HubError(ErrorCode.BAD_REQUEST, message)


def decode(data: bytes) -> str:
    """UTF-8 when it is, else Shift_JIS (as cp932, Windows' superset that JEPX's files are written in)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp932")
    except UnicodeDecodeError:
        raise bad("the file is neither UTF-8 nor Shift_JIS text") from None


def _columns(header: list[str]) -> tuple[int, int, dict[int, tuple[str, str]]]:
    """The date and slot columns, and (place, quantity) of each value column the hub keeps."""
    names = [h.strip() for h in header]
    try:
        day_at, slot_at = names.index("年月日"), names.index("時刻コード")
    except ValueError:
        raise bad("not a JEPX spot CSV: the header needs the columns 年月日 and 時刻コード") from None
    values: dict[int, tuple[str, str]] = {}
    for index, name in enumerate(names):
        match = _AREA_PRICE.match(name)
        if match:
            slug = _BY_NAME.get(match[1])
            if slug is None:
                raise bad(f"column {index + 1} ({name}): unknown price area {match[1]!r}")
            values[index] = (slug, PRICE)
        elif name.startswith("システムプライス"):
            values[index] = (SYSTEM, PRICE)
        else:
            for prefix, quantity in VOLUMES.items():
                if name.startswith(prefix):
                    values[index] = (SYSTEM, quantity)
    if not any(quantity == PRICE for _, quantity in values.values()):
        raise bad("not a JEPX spot CSV: no システムプライス or エリアプライス column")
    return day_at, slot_at, values


def _day(text: str, line: int) -> date:
    for layout in ("%Y/%m/%d", "%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text.strip(), layout).date()
        except ValueError:
            continue
    raise bad(f"line {line}: {text!r} is not a date (2026/11/27)")


def slot_start(day: date, slot: int) -> int:
    """Epoch ms at which JEPX's slot ``slot`` (1-48) of ``day`` begins (Japan has no daylight saving)."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=JAPAN)
    return int((midnight + timedelta(minutes=30 * (slot - 1))).timestamp() * 1000)


def parse(data: bytes) -> list[Point]:
    """Every price and volume in a JEPX spot CSV; a bad line refuses the whole file, naming the line."""
    rows = list(csv.reader(io.StringIO(decode(data))))
    if not rows:
        raise bad("the file is empty")
    day_at, slot_at, values = _columns(rows[0])
    points: list[Point] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(day_at, slot_at, *values):
            raise bad(f"line {line}: {len(row)} columns, the header has {len(rows[0])}")
        day = _day(row[day_at], line)
        try:
            slot = int(row[slot_at])
        except ValueError:
            raise bad(f"line {line}: slot code {row[slot_at]!r} is not a number") from None
        if not 1 <= slot <= 48:
            raise bad(f"line {line}: slot code {slot} is not 1 … 48")
        start = slot_start(day, slot)
        for index, (place, quantity) in values.items():
            text = row[index].strip().replace(",", "")
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                raise bad(f"line {line}, column {index + 1}: {row[index]!r} is not a number") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise bad(f"line {line}, column {index + 1}: {row[index]!r} is not a number")
            points.append(Point(place, quantity, start, start + SLOT_MS, value))
    if not points:
        raise bad("the file has no prices")
    return points
