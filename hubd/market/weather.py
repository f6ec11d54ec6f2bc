"""Hourly weather as series: from an Open-Meteo-shaped JSON answer, or a CSV of the same quantities.

Each value holds for the hour that begins at its time. The JSON shape is Open-Meteo's forecast and archive
answer: ``hourly.time`` (local times in ``utc_offset_seconds``, or epoch seconds with ``timeformat=unixtime``)
beside ``hourly.temperature_2m`` (°C), ``hourly.shortwave_radiation`` (W/m²) and ``hourly.cloud_cover`` (%).
The CSV has a header ``time,temperature_c,irradiance_w_m2,cloud_cover_pct`` (any of the quantities) and times
in RFC 3339 with an offset.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from hubd.market.data import Point
from hubd.market.jepx import bad, decode
from hubd.model import HubError, parse_time

HOUR_MS = 3_600_000
QUANTITIES = ("temperature_c", "irradiance_w_m2", "cloud_cover_pct")
OPEN_METEO = {
    "temperature_2m": "temperature_c",
    "shortwave_radiation": "irradiance_w_m2",
    "cloud_cover": "cloud_cover_pct",
    "cloudcover": "cloud_cover_pct",  # the name before Open-Meteo's 2023 renaming
}


def parse(data: bytes, place: str) -> list[Point]:
    """The hourly values in ``data`` (JSON or CSV, told by its first character), for ``place``."""
    text = decode(data)
    points = _json(text, place) if text.lstrip().startswith("{") else _csv(text, place)
    if not points:
        raise bad("no weather values in the file")
    return points


def _number(value: object, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise bad(f"{where}: {value!r} is not a number")
    return number


def _json(text: str, place: str) -> list[Point]:
    try:
        document: Any = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise bad(f"not JSON: {exc}") from None
    hourly = document.get("hourly") if isinstance(document, dict) else None
    if not isinstance(hourly, dict) or not isinstance(hourly.get("time"), list):
        raise bad("not an Open-Meteo answer: no hourly.time list")
    offset = document.get("utc_offset_seconds", 0)
    if not isinstance(offset, int) or isinstance(offset, bool) or abs(offset) >= 86_400:
        raise bad("utc_offset_seconds must be a whole number of seconds under a day")
    zone = timezone(timedelta(seconds=offset))
    times: list[int] = []
    for index, value in enumerate(hourly["time"]):
        if isinstance(value, int) and not isinstance(value, bool):
            times.append(value * 1000)
            continue
        try:
            local = datetime.fromisoformat(str(value))
        except ValueError:
            raise bad(f"hourly.time[{index}]: {value!r} is not a time") from None
        times.append(int((local if local.tzinfo else local.replace(tzinfo=zone)).astimezone(UTC).timestamp() * 1000))
    points: list[Point] = []
    for key, quantity in OPEN_METEO.items():
        values = hourly.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != len(times):
            raise bad(f"hourly.{key} must be a list as long as hourly.time")
        for index, (at, value) in enumerate(zip(times, values, strict=True)):
            number = _number(value, f"hourly.{key}[{index}]")
            if number is not None:
                points.append(Point(place, quantity, at, at + HOUR_MS, number))
    return points


def _csv(text: str, place: str) -> list[Point]:
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    if "time" not in header or not set(header) & set(QUANTITIES):
        raise bad(f"a weather CSV needs a header with time and any of {', '.join(QUANTITIES)}")
    points: list[Point] = []
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        try:
            at = parse_time((row.get("time") or "").strip(), f"line {line}: time")
        except HubError as exc:
            raise bad(exc.message) from None
        for quantity in QUANTITIES:
            number = _number((row.get(quantity) or "").strip(), f"line {line}: {quantity}")
            if number is not None:
                points.append(Point(place, quantity, at, at + HOUR_MS, number))
    return points
