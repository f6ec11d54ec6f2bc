"""The reading interpreter: a checked reading spec built once into closures, then plain loops per message.

No Python source is generated: each part of a reading (der_id, password, measured_at, each quantity) is a
closure made when the definition loads, typed and checked like any other code. A part whose sources are the
same for the whole message (a user property, a constant, a unit stated once) is judged once per message; the
rest per record. Parts are judged in the order and with the messages of ``hubd.decode.native.check_reading``,
so a vendor reading is judged exactly as a native one (tests hold the two to the same results); a refusal of a
part judged once is given where the first such part would be judged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import islice, repeat
from operator import add, itemgetter, mul, setitem
from typing import Any, NamedTuple

from hubd.decode.native import KNOWN_IDS, derive_reactive_power, valid_id
from hubd.decode.registry import Limits
from hubd.decode.vendor.access import Access, Message
from hubd.decode.vendor.language import IdSpec, Number, ReadingSpec, Source, TimeSpec
from hubd.decode.vendor.numbers import factors_of, message_factor, quantity, quantity_column
from hubd.decode.vendor.times import (
    _epoch,
    _local,
    _rfc3339,
    _slow_time,
    hour_table,
    hourly,
    in_order,
    second_occurrence,
    show,
)
from hubd.model import MAX_TIME_MS, MIN_TIME_MS, ErrorCode, HubError, Reading

BAD = ErrorCode.BAD_REQUEST

# The records of one message: (src, aux, user properties, limits) -> its readings and refusals, in order.
RecordFunction = Callable[[Any, Any, dict[str, str], Limits], list[Reading | HubError]]
# One part of a reading: (the message, the record, the DER id so far) -> its value. Raises HubError to refuse.
Judge = Callable[[Message, Any, str | None], Any]
# One part for every record of a message: (the message, its records, their DER ids) -> the values, in order.
PartColumn = Callable[[Message, list[Any], Iterable[str | None]], list[Any]]

DER_ID, PASSWORD, MEASURED_AT, FIRST_QUANTITY = range(4)


class _Step(NamedTuple):
    """A part of a reading: where its value goes (by the positions above) and how it is judged."""

    position: int
    judge: Judge


def reader(spec: ReadingSpec, access: Access) -> RecordFunction:
    """The record loop for ``spec``: ``read(src, aux, props, limits) -> items``."""
    return _Reader(spec, access).read


class _Reader:
    """The parts of a reading, split into those judged once per message and those judged per record.

    A message is read a column at a time (each part for every record, in a few passes over lists) when that
    gives no refusal, which is the common case; a message with any refusal, or of a few records, is read
    record by record, which judges each record's parts in check_reading's order and gives its first refusal.
    """

    def __init__(self, spec: ReadingSpec, access: Access) -> None:
        self.access = access
        self.check_record = access.check_record()
        level = _level(access)
        quantities = spec.quantities
        per_message = [
            level(spec.der_id.source),
            spec.password.template is None and level(spec.password),
            level(spec.measured_at.source),
            *(level(*_sources(number)) for number in quantities.values()),
        ]
        # The scales a per-record quantity takes from the message: resolved once, into Message.factors.
        self.factors: list[Callable[[Message], Any]] = []
        slots: dict[int, int] = {}
        for (name, number), once in zip(quantities.items(), per_message[FIRST_QUANTITY:], strict=True):
            for factor in factors_of(number) if not once else []:
                if access.message_level(factor.source):
                    slots[id(factor)] = len(self.factors)
                    self.factors.append(message_factor(factor, name, access))
        parts: list[tuple[Judge, PartColumn]] = [
            _der_id(spec.der_id, access),
            _password(spec.password, access),
            _time(spec.measured_at, access),
        ]
        for (name, number), once in zip(quantities.items(), per_message[FIRST_QUANTITY:], strict=True):
            parts.append(_quantity(number, name, access, None if once else slots))
        self.parts = len(parts)
        self.once = [_Step(index, judge) for index, (judge, _) in enumerate(parts) if per_message[index]]
        self.each = [_Step(index, judge) for index, (judge, _) in enumerate(parts) if not per_message[index]]
        self.columns = [(index, column) for index, (_, column) in enumerate(parts) if not per_message[index]]
        # A refusal of a part judged once is given where the first of them would be judged, as check_reading would.
        first_once = per_message.index(True) if True in per_message else self.parts
        self.before_once = [step for step in self.each if step.position < first_once]
        # The values in check_reading's order: the quantities, with interval_s after its energy.
        names = list(quantities)
        shown = [name for name in names if name != "interval_s"] + (["interval_s"] if "interval_s" in names else [])
        self.template: dict[str, Any] = dict.fromkeys(shown)  # the keys in order, for readings made a column at a time
        self.pick_indices = [FIRST_QUANTITY + names.index(name) for name in shown]
        self.named = list(zip(shown, self.pick_indices, strict=True))
        self.shown = shown
        # A record's values in that order, by one C call; the first index once more, so that one quantity gives
        # a tuple too (zip with the names stops before it).
        self.pick = itemgetter(*self.pick_indices, self.pick_indices[0])
        self.interval = "interval_s" in names
        self.derive = "power_kw" in names and "power_factor" in names

    def read(self, src: Any, aux: Any, props: dict[str, str], limits: Limits) -> list[Reading | HubError]:
        horizon = limits.now_ms + limits.max_future_ms
        if horizon >= MAX_TIME_MS:
            horizon = MAX_TIME_MS - 1
        message = Message(src, aux, props, limits, horizon)
        if self.factors:
            message.factors = [resolve(message) for resolve in self.factors]
        once: list[Any] = [None] * self.parts
        refusal: HubError | None = None  # the first refusal of a part judged once
        for index, judge in self.once:
            try:
                once[index] = judge(message, None, once[DER_ID])
            except HubError as exc:
                if refusal is None:
                    refusal = exc
        places, records = self.access.records(message)
        items = None
        if refusal is None:
            if len(records) == 1:
                items = self._one(message, records[0], once)
            elif len(records) >= _FEW:
                items = self._by_columns(message, records, once)
        if items is None:
            items = self._by_records(message, places, records, once, refusal)
        if len(items) > limits.max_readings:
            raise HubError(
                ErrorCode.TOO_LARGE, f"{len(items)} readings in one message; the limit is {limits.max_readings}"
            )
        return items

    def _one(self, message: Message, record: Any, once: list[Any]) -> list[Any] | None:
        """The reading of a message of one record (an ECHONET Lite frame) with no refusal, judged into ``once``
        itself: none of the loop, copies and names a message of many records needs. None if it has a refusal
        (then read record by record, which judges every part of the record again, in order, before it reads one)."""
        if record.__class__ is HubError or self.check_record is not None:
            return None
        try:
            for index, judge in self.each:
                once[index] = judge(message, record, once[DER_ID])
            reading = self._reading(once)
        except HubError:
            return None
        return [] if reading is None else [reading]

    def _by_columns(self, message: Message, found: list[Any], once: list[Any]) -> list[Any] | None:
        """The readings of a message that has no refusal, a part at a time; None if it has one."""
        if not self.access.readable(found):
            return None
        columns: list[Any] = [repeat(value) for value in once]  # a part judged once: its value for each
        try:
            for index, column in self.columns:
                columns[index] = column(message, found, columns[DER_ID])
            if self._available(columns):  # the common case: a reading per record, made a column at a time
                quantities: list[dict[str, Any]] = list(map(dict.copy, repeat(self.template, len(found))))
                for name, index in self.named:
                    list(map(setitem, quantities, repeat(name), columns[index]))  # twice as fast as dict(zip())
                if self.derive:
                    for each in quantities:
                        derive_reactive_power(each)
                return list(map(Reading, columns[DER_ID], columns[MEASURED_AT], quantities, columns[PASSWORD]))
            readings = [self._reading(row) for row in zip(*columns, found, strict=False)]
        except HubError:
            return None
        return [reading for reading in readings if reading is not None]

    def _available(self, columns: list[Any]) -> bool:
        """Whether every value of every quantity is available (a part judged once has a repeat() column)."""
        for index in self.pick_indices:
            column = columns[index]
            if None in column if column.__class__ is list else next(column) is None:
                return False
        return True

    def _by_records(
        self, message: Message, places: Sequence[Any], records: list[Any], once: list[Any], refusal: HubError | None
    ) -> list[Reading | HubError]:
        """The readings and refusals of a message, record by record, each record's parts in the native order."""
        steps = self.each if refusal is None else self.before_once
        message.last_local = None  # a series judged again from its start
        check_record = self.check_record
        items: list[Reading | HubError] = []
        for place, record in zip(places, records):  # noqa: B905 - as many places as records
            if record.__class__ is HubError:  # a record that could not be walked into
                items.append(record)
                continue
            values = once.copy()
            try:
                if check_record is not None:
                    check_record(record)
                for index, judge in steps:
                    values[index] = judge(message, record, values[DER_ID])
                if refusal is not None:
                    raise HubError(refusal.code, refusal.message)
                reading = self._reading(values)
                if reading is not None:
                    items.append(reading)
            except HubError as exc:
                exc.der_id = values[DER_ID]
                exc.message = f"{self.access.location(message, place)}: {exc.message}"
                items.append(exc)
        return items

    def _reading(self, values: Sequence[Any]) -> Reading | None:
        """A reading of the values judged (by the positions above); None when none is available."""
        picked = self.pick(values)
        if None in picked:  # some not available: only those that are
            quantities = {name: value for name, value in zip(self.shown, picked, strict=False) if value is not None}
            if self.interval:
                _pair_interval(quantities)
            if not quantities:
                return None  # every value 'not available': no reading
        else:
            quantities = dict(zip(self.shown, picked, strict=False))  # picked: one more than shown
        if self.derive:
            derive_reactive_power(quantities)
        return Reading(values[DER_ID], values[MEASURED_AT], quantities, values[PASSWORD])


_DISORDER = MAX_TIME_MS  # Message.last_local once a series of local times went back: no time comes after it

# Fewer records than this are read record by record: columns cost a few list passes per part and message.
_FEW = 4


def _by_record(judge: Judge) -> tuple[Judge, PartColumn]:
    """A part with no column of its own: its column is judged record by record."""

    def column(message: Message, records: list[Any], der_ids: Iterable[str | None]) -> list[Any]:
        return [judge(message, record, der_id) for record, der_id in zip(records, der_ids, strict=False)]

    return judge, column


def _quantity(number: Number, name: str, access: Access, slots: dict[int, int] | None) -> tuple[Judge, PartColumn]:
    judge = quantity(number, name, access, slots)
    if slots is None:  # judged once per message
        return _by_record(judge)
    values = quantity_column(number, name, access, slots)

    def column(message: Message, records: list[Any], der_ids: Iterable[str | None]) -> list[Any]:
        return values(message, records)

    return judge, column


def _pair_interval(quantities: dict[str, float]) -> None:
    """The length of an interval whose energy is not available is dropped with it; energy without its interval
    is refused, as check_reading refuses it."""
    if "energy_interval_kwh" not in quantities:
        quantities.pop("interval_s", None)
    elif "interval_s" not in quantities:
        raise HubError(BAD, "energy_interval_kwh and interval_s go together")


def _level(access: Access) -> Callable[..., bool]:
    """Whether all the sources given are read once per message."""

    def level(*sources: Source | None) -> bool:
        return all(source is None or access.message_level(source) for source in sources)

    return level


def _sources(number: Any) -> list[Source]:
    found = [number.source, *(factor.source for factor in number.factors)]
    if number.minus is not None:
        found += _sources(number.minus)
    return found


# -- the parts --------------------------------------------------------------------------------------------------------


def _der_id(spec: IdSpec, access: Access) -> tuple[Judge, PartColumn]:
    """A DER id: a vendor id (a number, a binary text) as text, through the map if there is one, well-formed."""
    get = access.getter(spec.source)
    at_message = access.message_level(spec.source)
    label = spec.source.label
    convert = spec.source.kind not in ("property", "const")  # a user property is text already
    table, where = spec.map, spec.map_name

    def check(found: Any) -> str:
        if convert:
            if found.__class__ is int:
                found = str(found)
            elif found.__class__ is bytes:
                found = _ascii(found, "der_id", label)
        if table is not None:
            mapped = table.get(found) if found.__class__ is str else None
            if mapped is None:
                raise HubError(ErrorCode.UNKNOWN_DER, _unmapped(found, label, where))
            found = mapped
        if not (found.__class__ is str and found in KNOWN_IDS) and not valid_id(found):
            raise HubError(BAD, f"der_id is missing or not a valid DER id ({label})")
        return found

    def judge(message: Message, record: Any, der_id: str | None) -> str:
        found = get(message if at_message else record)
        if plain and found.__class__ is str and found in KNOWN_IDS:  # the common case, with no call
            return found
        return check(found)

    plain = not convert and table is None  # a text as it stands, a known id if it is one

    def column(message: Message, records: list[Any], der_ids: Iterable[str | None]) -> list[Any]:
        return _by_value(check, list(map(get, records)))

    return judge, column


def _password(source: Source, access: Access) -> tuple[Judge, PartColumn]:
    """A password: from the payload, or from the user property named after the DER id (``password:{der_id}``)."""
    label = source.label
    binary = source.kind == "field"

    def check(found: Any) -> str:
        if binary and found.__class__ is bytes:
            found = _ascii(found, "password", label)
        if found.__class__ is not str or not found:
            raise HubError(BAD, f"password is missing or not a string ({label})")
        return found

    if source.template is not None:
        prefix, suffix = source.template

        def named(message: Message, record: Any, der_id: str | None) -> str:
            return check(message.props.get(prefix + der_id + suffix) if der_id is not None else None)

        def by_der_id(message: Message, records: list[Any], der_ids: Iterable[str | None]) -> list[Any]:
            ids = list(islice(der_ids, len(records)))
            return _by_value(lambda der_id: named(message, None, der_id), ids)

        return named, by_der_id
    get = access.getter(source)
    at_message = access.message_level(source)

    def judge(message: Message, record: Any, der_id: str | None) -> str:
        found = get(message if at_message else record)
        if found.__class__ is str and found:  # the common case, with no call
            return found
        return check(found)

    def column(message: Message, records: list[Any], der_ids: Iterable[str | None]) -> list[Any]:
        return _by_value(check, list(map(get, records)))

    return judge, column


def _by_value(check: Callable[[Any], str], values: list[Any]) -> list[str]:
    """``check`` of each value, once per distinct value (a message names a few DERs, many times). Values are
    told apart by type too: 1, 1.0 and True are equal, but not the same DER id."""
    try:
        keys = list(zip(map(type, values), values, strict=True))
        checked = {key: check(key[1]) for key in set(keys)}
    except TypeError:  # an unhashable value: a JSON list or object
        return list(map(check, values))
    return list(map(checked.__getitem__, keys))


def _time(spec: TimeSpec, access: Access) -> tuple[Judge, PartColumn]:
    """measured_at in epoch ms: the common type the quick way (an epoch number, a text by its hour), anything
    else the long way; the hub's clock when the definition says so; within the years and not in the future."""
    if spec.source is None:

        def received(message: Message, record: Any, der_id: str | None) -> int:
            return message.limits.now_ms

        return _by_record(received)
    get = access.getter(spec.source)
    at_message = access.message_level(spec.source)
    label, shift, default_now = spec.source.label, spec.shift_ms, spec.default_now
    zone = spec.zone if spec.kind == "local" else None
    quick: Callable[[str], int] | None = None  # an epoch number: times its unit, inline
    many: Callable[[list[Any]], list[int]]  # quick for a column
    slow: Callable[[Any], int]
    if spec.kind in ("epoch_s", "epoch_ms"):
        common: Any = int  # Any: what the check narrows the value to
        per_unit = 1000 if spec.kind == "epoch_s" else 1

        def many(values: list[int]) -> list[int]:
            return list(map(mul, values, repeat(per_unit)))

        def slow(value: Any) -> int:
            return _epoch(value, per_unit, label)

    else:
        common, per_unit = str, 1
        table = hour_table(_slow_time(spec), spec.format, spec.zone) if spec.kind == "local" else None
        quick = table if table is not None else hourly(_slow_time(spec), spec.format)
        many = table.many if table is not None else partial(_each, quick)
        long_way = _rfc3339 if spec.kind == "rfc3339" else _local

        def slow(value: Any) -> int:
            return long_way(value, label, None, None)

    def in_series(message: Message, text: str, at: int) -> int:
        """``in_order`` record by record: ``message.last_local`` is the time before (None: none yet;
        ``_DISORDER``: the series went back where no hour repeats, and is left as it is from there)."""
        before = message.last_local
        if before is None or at > before:
            message.last_local = at
            return at
        assert zone is not None
        later = None if before == _DISORDER else second_occurrence(text, at, before, zone, spec.format)
        message.last_local = _DISORDER if later is None else later
        return at if later is None else later

    def judge(message: Message, record: Any, der_id: str | None) -> int:
        found = get(message if at_message else record)
        if found.__class__ is common:
            at = found * per_unit if quick is None else quick(found)
            if zone is not None:
                at = in_series(message, found, at)
            at += shift
        elif found is None:
            if not default_now:
                raise HubError(BAD, f"measured_at is missing ({label})")
            at = message.limits.now_ms
        else:
            at = slow(found) + shift
        if not MIN_TIME_MS <= at <= message.horizon:
            raise HubError(BAD, _bad_time(at, message.limits))
        return at

    def column(message: Message, records: list[Any], der_ids: Iterable[str | None]) -> list[Any]:
        """Every time of the common type: the quick way for all, then one check of the earliest and latest."""
        found = [get(message)] * len(records) if at_message else list(map(get, records))
        if set(map(type, found)) <= {common}:
            times = many(found)
            if zone is not None:  # local times through the hour repeated when daylight saving ends
                times = in_order(times, found, zone, spec.format)
            if shift:
                times = list(map(add, times, repeat(shift)))
            if not times or (min(times) >= MIN_TIME_MS and max(times) <= message.horizon):
                return times
        message.last_local = None
        return [judge(message, record, None) for record in records]

    return judge, column


def _each(function: Callable[[str], int], values: list[str]) -> list[int]:
    return list(map(function, values))


def _ascii(value: bytes, what: str, label: str) -> str:
    try:
        return value.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        raise HubError(BAD, f"{what}: {label} is not ASCII text") from None


def _unmapped(value: Any, label: str, where: str | None) -> str:
    if value is None:
        return f"der_id: {label} is missing"
    return f"der_id: {label} {show(value)} is not in {where}"


def _bad_time(at: int, limits: Limits) -> str:
    """The message of check_reading (and parse_time) for a time outside the years 1000-9998 or in the future."""
    if not MIN_TIME_MS <= at < MAX_TIME_MS:
        return "measured_at is out of range: the hub takes the years 1000 to 9998"
    return f"measured_at is more than {limits.max_future_ms // 1000} s in the future; check the sender's clock"
