"""Vendor times to epoch milliseconds: epoch numbers, RFC 3339 texts, and wall-clock texts in a stated zone.

Parsing a text costs microseconds, a series of them is mostly the same few hours: ``hourly`` and ``HourTable``
compute each hour once and the rest (minutes and seconds) by lookup, with the same result as parsing each
text, across daylight-saving changes too (an hour whose offset changes is parsed text by text).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import islice
from operator import add, itemgetter, lt
from typing import Any
from zoneinfo import ZoneInfo

from hubd.decode.vendor.language import TimeSpec
from hubd.model import ErrorCode, HubError, parse_time

BAD = ErrorCode.BAD_REQUEST
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_MS = timedelta(milliseconds=1)


def show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _epoch(value: Any, per_unit: int, label: str) -> int:
    """Epoch seconds (per_unit 1000) or milliseconds (1) as a number or a numeric string."""
    if value.__class__ is str:
        try:
            value = float(value)
        except ValueError:
            value = None
    if value.__class__ is int:
        return int(value * per_unit)
    if value.__class__ is float and math.isfinite(value) and abs(value) < 1e17:
        return round(value * per_unit)
    unit = "seconds" if per_unit == 1000 else "milliseconds"
    raise HubError(BAD, f"measured_at: {label} is {show(value)}, not epoch {unit}")


def _rfc3339(value: Any, label: str, _zone: None, _fmt: None) -> int:
    """RFC 3339 with an offset, or epoch milliseconds (also as digits: a user property is always text)."""
    if value.__class__ is str:
        if value.lstrip("-").isdigit() and len(value) < 20:
            value = int(value)
        else:
            try:  # the common case, at a third of parse_time's cost; anything unusual goes the long way
                moment = datetime.fromisoformat(value)
                if moment.tzinfo is not None and 1000 <= moment.year < 9999:
                    return int(moment.timestamp() * 1000)
            except ValueError:
                pass
    if isinstance(value, bytes | bool) or not isinstance(value, str | int | float):
        raise HubError(BAD, f"measured_at: {label} is {show(value)}, not an RFC 3339 time")
    try:
        return parse_time(value, "measured_at")
    except HubError as exc:
        raise HubError(BAD, f"{exc.message} ({label})") from None


def _local(value: Any, label: str, zone: ZoneInfo | None, fmt: str | None) -> int:
    """A vendor's local time in the zone the definition states; an offset in the text wins over the zone.

    An ambiguous time (the hour repeated when daylight saving ends) is taken as its first occurrence; in a
    series, ``in_order`` takes the repeat of it as the second.
    """
    if value.__class__ is not str:
        raise HubError(BAD, f"measured_at: {label} is {show(value)}, not a local time")
    try:
        moment = datetime.fromisoformat(value) if fmt is None else datetime.strptime(value, fmt)
    except ValueError:
        like = "YYYY-MM-DD hh:mm:ss" if fmt is None else fmt
        raise HubError(BAD, f"measured_at: {label} is {show(value)}, not a time like {like}") from None
    try:
        if moment.tzinfo is None:  # wall time in the zone: three times faster than attaching the zone
            assert zone is not None
            offset = zone.utcoffset(moment)
            assert offset is not None
            return (moment - _EPOCH_NAIVE - offset) // _MS
        return (moment - _EPOCH) // _MS
    except OverflowError:
        raise HubError(BAD, "measured_at is out of range: the hub takes the years 1000 to 9998") from None


def second_occurrence(text: Any, at: int, before: int, zone: ZoneInfo, fmt: str | None) -> int | None:
    """``text``'s second occurrence when it repeats a wall time (``at``: its first) and that comes after
    ``before``; None when it does not (no repeated hour, an offset in the text, or still not after ``before``)."""
    try:
        moment = datetime.fromisoformat(text) if fmt is None else datetime.strptime(text, fmt)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is not None:
        return None
    first, second = zone.utcoffset(moment), zone.utcoffset(moment.replace(fold=1))
    assert first is not None and second is not None
    later = at + (first - second) // _MS
    return later if later > before else None


def in_order(times: list[int], texts: list[Any], zone: ZoneInfo, fmt: str | None) -> list[int]:
    """A series of local times in order through the hour repeated when daylight saving ends (02:00 … 02:45,
    02:00 … 02:45 in Europe/Berlin): each wall time that, taken as its first occurrence, would not come after the
    time before it is taken as its second occurrence (``fold=1``), the later instant, when that does. The times
    are changed only while the series is in order: a series that goes back anywhere else is left as it is.
    ``times``: the texts taken as first occurrences; the common case (strictly increasing) costs one pass."""
    if all(map(lt, times, islice(times, 1, None))):
        return times
    times = list(times)
    for index in range(1, len(times)):
        before, at = times[index - 1], times[index]
        if at > before:
            continue
        later = second_occurrence(texts[index], at, before, zone, fmt)
        if later is None:
            break
        times[index] = later
    return times


def _slow_time(spec: TimeSpec) -> Callable[[str], int]:
    assert spec.source is not None
    label, zone, fmt = spec.source.label, spec.zone, spec.format
    if spec.kind == "rfc3339":

        def rfc3339(text: str) -> int:
            return _rfc3339(text, label, None, None)

        return rfc3339
    assert zone is not None

    def local(text: str) -> int:
        return _local(text, label, zone, fmt)

    return local


def hourly(slow: Callable[[str], int], fmt: str | None) -> Callable[[str], int]:
    """``slow`` made fast for the times of a series: they share their hour and differ in minutes and seconds.

    The epoch milliseconds of each hour (a text's prefix up to the minutes, with what follows the seconds, such
    as an offset) are computed once by ``slow`` and kept, provided its offset is the same at :00:00 and at
    :59:59 (an hour with a daylight-saving change, or a text the cache does not fit, goes to ``slow`` every
    time). A time is then that hour plus its minutes and seconds, with the same result as ``slow``. ``fmt``:
    None for ISO-like texts (2026-11-27 09:15:00, ...T09:15:00+09:00), or a strptime format that ends with
    %H<sep>%M[<sep>%S] after fixed-width %Y %m %d %H fields.
    """
    if fmt is None:  # ISO-like: minutes at 14, seconds at 17; what follows the seconds (an offset) is kept
        minute_at, second_at, width = 14, 17, 19
    else:
        layout = _fixed_layout(fmt)
        if layout is None:
            return slow
        minute_at, second_at, width = layout
    cache: dict[str, int | None] = {}
    minute_end, second_end = minute_at + 2, second_at + 2
    get = cache.get

    def fill(text: str) -> int:
        """A text whose hour is not in the cache: its hour is computed once (or found unfit), then the text."""
        if (
            len(text) >= width
            and (fmt is not None or (text[13] == ":" and text[16] == ":"))
            and (fmt is None or len(text) == width)
            and text[minute_at:minute_end] in _MINUTES
            and (not second_at or text[second_at:second_end] in _SECONDS)
        ):
            key = _key(text, minute_at, second_at, width)
            if key not in cache:
                if len(cache) >= 4096:
                    cache.clear()
                cache[key] = _hour_of(slow, text, minute_at, second_at)
        return slow(text)

    if fmt is None:

        def parse(text: str) -> int:
            minutes = _MINUTES.get(text[14:16])
            seconds = _SECONDS.get(text[17:19])
            if minutes is not None and seconds is not None and text[13] == ":" and text[16] == ":":
                base = get(text[:14] + text[16:17] + text[19:])
                if base is not None:
                    return base + minutes + seconds
            return fill(text)

    elif second_at:

        def parse(text: str) -> int:
            minutes = _MINUTES.get(text[minute_at:minute_end])
            seconds = _SECONDS.get(text[second_at:second_end])
            if minutes is not None and seconds is not None and len(text) == width:
                base = get(text[:minute_at] + text[minute_end:second_at])
                if base is not None:
                    return base + minutes + seconds
            return fill(text)

    else:

        def parse(text: str) -> int:
            minutes = _MINUTES.get(text[minute_at:minute_end])
            if minutes is not None and len(text) == width:
                base = get(text[:minute_at])
                if base is not None:
                    return base + minutes
            return fill(text)

    return parse


# "00".."59" -> milliseconds: one lookup checks two ASCII digits below 60 and gives their value.
_MINUTES = {f"{n:02d}": n * 60_000 for n in range(60)}
_SECONDS = {f"{n:02d}": n * 1000 for n in range(60)}


def _key(text: str, minute_at: int, second_at: int, width: int) -> str:
    """A text without its minutes and seconds: the same for every time of one hour."""
    if not second_at:
        return text[:minute_at] + text[width:]
    return text[:minute_at] + text[minute_at + 2 : second_at] + text[width:]


def _hour_of(slow: Callable[[str], int], text: str, minute_at: int, second_at: int) -> int | None:
    """The epoch ms of ``text``'s hour at :00:00, or None if the offset changes within it (or it is no time)."""

    def at(minutes: str, seconds: str) -> str:
        if not second_at:
            return text[:minute_at] + minutes + text[minute_at + 2 :]
        return text[:minute_at] + minutes + text[minute_at + 2 : second_at] + seconds + text[second_at + 2 :]

    try:
        start, end = slow(at("00", "00")), slow(at("59", "59" if second_at else "00"))
    except HubError:
        return None
    return start if end - start == (3_599_000 if second_at else 3_540_000) else None


def _fixed_layout(fmt: str) -> tuple[int, int, int] | None:
    """(minute position, second position or 0, width) of a fixed-width format ending in %M or %M<sep>%S."""
    widths = {"Y": 4, "m": 2, "d": 2, "H": 2, "M": 2, "S": 2}
    position, index, found = 0, 0, {}
    while index < len(fmt):
        if fmt[index] == "%":
            if index + 1 >= len(fmt) or fmt[index + 1] not in widths or fmt[index + 1] in found:
                return None
            found[fmt[index + 1]] = position
            position += widths[fmt[index + 1]]
            index += 2
        else:
            if fmt[index].isdigit() or (fmt[index].isspace() and fmt[index] != " "):
                return None
            position += 1
            index += 1
    if set(found) not in ({"Y", "m", "d", "H", "M"}, {"Y", "m", "d", "H", "M", "S"}):
        return None
    minute_at, second_at = found["M"], found.get("S", 0)
    last = (second_at or minute_at) + 2
    if last != position or any(found[k] > minute_at for k in "YmdH") or (second_at and second_at < minute_at):
        return None
    if second_at and not fmt[fmt.index("%M") + 2 : fmt.index("%S")].strip():
        return None  # whitespace between the minutes and seconds: strptime takes runs of it, positions would move
    return minute_at, second_at, position


class HourTable:
    """Wall-clock texts of one layout as two lookups added, ``hours[text[:cut]]`` (the epoch ms of the text's
    hour) plus ``tails[text[cut:]]`` (exactly what follows the hour, such as ``:15:00``).

    A text that either lookup misses goes to ``parse``: when the text has the exact layout it enters the 24
    hours of its day at once if the zone's offset is the same at each hour's start and at the day's last second
    (the first message of a day costs one parse, not two per hour), else its own hour (computed by ``slow`` at
    :00:00 and :59:59, and only if the offset is the same at both, see ``_hour_of``); the rest, and hours with a
    daylight-saving change, go to ``hourly`` and ``slow``, with the same result. ``table(text)`` reads one
    text, ``table.many(texts)`` a series.
    """

    def __init__(
        self, slow: Callable[[str], int], fmt: str | None, layout: tuple[int, int, int, int], zone: ZoneInfo | None
    ) -> None:
        cut, minute_at, second_at, width = layout
        self.cut = cut
        self._hour, self._tail = itemgetter(slice(cut)), itemgetter(slice(cut, None))  # text[:cut], text[cut:]
        self.hours: dict[str, int | None] = {}
        self.tails = _tails(fmt, cut, minute_at, second_at, width)
        hours, tails, fallback = self.hours, self.tails, hourly(slow, fmt)
        midnight = next(tail for tail, ms in tails.items() if ms == 0)  # what follows the hour at :00(:00)

        def enter_day(text: str) -> bool:
            head = text[: cut - 2]  # the text up to its hour's two digits
            first = head + "00" + midnight
            try:
                start = slow(first)
                moment = datetime.fromisoformat(first) if fmt is None else datetime.strptime(first, fmt)
            except (HubError, ValueError):
                return False
            if zone is None or moment.tzinfo is not None:
                return False
            offset = zone.utcoffset(moment)
            if any(zone.utcoffset(moment + step) != offset for step in _DAY_STEPS):
                return False
            for hour in range(24):
                hours[f"{head}{hour:02d}"] = start + hour * 3_600_000
            return True

        def parse(text: str) -> int:
            ms = tails.get(text[cut:])
            if ms is not None:  # the exact layout up to the hour, as far as its length goes
                key = text[:cut]
                if key not in hours:
                    if len(hours) >= 4096:
                        hours.clear()
                    if not enter_day(text) or key not in hours:
                        hours[key] = _hour_of(slow, text, minute_at, second_at)
                base = hours[key]
                if base is not None:
                    return base + ms
            return fallback(text)

        self.parse = parse

    def __call__(self, text: str) -> int:
        base = self.hours.get(text[: self.cut])
        ms = self.tails.get(text[self.cut :])
        return self.parse(text) if base is None or ms is None else base + ms

    def many(self, texts: list[str]) -> list[int]:
        """``self(text)`` for each text: the lookups a list at a time, and if any misses, text by text."""
        hours = list(map(self._hour, texts))
        bases = list(map(self.hours.get, hours))
        if None in bases:  # a day not seen lately: enter it through its first text, and look again
            self(texts[bases.index(None)])
            bases = list(map(self.hours.get, hours))
        ms = list(map(self.tails.get, map(self._tail, texts)))
        if None in bases or None in ms:
            return list(map(self, texts))
        return list(map(add, bases, ms))


# Each hour's start after midnight, and the day's last second: a day whose offset is the same at all of them
# and at midnight has no change of offset (one that came and went within an hour would pass, as in _hour_of).
_DAY_STEPS = (*(timedelta(hours=hour) for hour in range(1, 24)), timedelta(hours=23, minutes=59, seconds=59))


def hour_table(slow: Callable[[str], int], fmt: str | None, zone: ZoneInfo | None = None) -> HourTable | None:
    """An HourTable for a wall-clock layout: ISO-like (fmt None) or a fixed-width strptime format whose date
    fields all come before ``%H``, followed only by ``%M`` and ``%S``; None for any other. Without the zone
    ``slow`` parses in, hours are entered one by one."""
    if fmt is None:
        return HourTable(slow, None, (13, 14, 17, 19), zone)
    layout = _fixed_layout(fmt)
    if layout is None:
        return None
    minute_at, second_at, width = layout
    hour = fmt.index("%H")
    if any(fmt.index(field) > hour for field in ("%Y", "%m", "%d")) or "%" in fmt[hour + 2 : fmt.index("%M")]:
        return None
    return HourTable(slow, fmt, (minute_at - (fmt.index("%M") - hour - 2), minute_at, second_at, width), zone)


@cache
def _tails_of(before_minutes: str, before_seconds: str | None) -> dict[str, int]:
    if before_seconds is None:
        return {f"{before_minutes}{m:02d}": m * 60_000 for m in range(60)}
    return {
        f"{before_minutes}{m:02d}{before_seconds}{s:02d}": m * 60_000 + s * 1000 for m in range(60) for s in range(60)
    }


def _tails(fmt: str | None, cut: int, minute_at: int, second_at: int, width: int) -> dict[str, int]:
    """What may follow the hour, exactly: the text between the hour and the minutes, the minutes, and so on."""
    if fmt is None:
        return _tails_of(":", ":")
    before_minutes = fmt[fmt.index("%H") + 2 : fmt.index("%M")]
    if not second_at:
        return _tails_of(before_minutes, None)
    return _tails_of(before_minutes, fmt[fmt.index("%M") + 2 : fmt.index("%S")])
