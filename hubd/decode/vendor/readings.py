"""The reading interpreter: a checked reading spec built once into closures, then one plain loop per message.

Each part of a reading (der_id, password, measured_at, each quantity) is a closure made when the definition
loads. A part whose sources are the same for the whole message (a user property, a constant, a unit stated
once) is judged once per message; the rest per record. Parts are judged in the order and with the messages
of ``hubd.decode.native.check_reading``, so a vendor reading is judged exactly as a native one (tests hold the
two to the same results); a refusal of a part judged once is given where the first such part would be judged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from hubd.decode.native import derive_reactive_power, valid_id
from hubd.decode.registry import Limits
from hubd.decode.vendor.access import Access, Message
from hubd.decode.vendor.language import IdSpec, ReadingSpec, Source, TimeSpec
from hubd.decode.vendor.numbers import factors_of, message_factor, quantity
from hubd.decode.vendor.times import _epoch, _local, _rfc3339, _slow_time, hour_table, hourly, show
from hubd.model import MAX_TIME_MS, MIN_TIME_MS, ErrorCode, HubError, Reading

BAD = ErrorCode.BAD_REQUEST

# The records of one message: (src, aux, user properties, limits) -> its readings and refusals, in order.
RecordFunction = Callable[[Any, Any, dict[str, str], Limits], list[Reading | HubError]]
# One part of a reading: (the message, the record, the DER id so far) -> its value. Raises HubError to refuse.
Judge = Callable[[Message, Any, str | None], Any]

DER_ID, PASSWORD, MEASURED_AT, FIRST_QUANTITY = range(4)


class _Step(NamedTuple):
    """A part of a reading: where its value goes (by the positions above) and how it is judged."""

    position: int
    judge: Judge


def reader(spec: ReadingSpec, access: Access) -> RecordFunction:
    """The record loop for ``spec``: ``read(src, aux, props, limits) -> items``."""
    return _Reader(spec, access).read


class _Reader:
    """The parts of a reading, split into those judged once per message and those judged per record."""

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
        judges: list[Judge] = [
            _der_id(spec.der_id, access),
            _password(spec.password, access),
            _time(spec.measured_at, access),
        ]
        for (name, number), once in zip(quantities.items(), per_message[FIRST_QUANTITY:], strict=True):
            judges.append(_ignoring_der_id(quantity(number, name, access, None if once else slots)))
        self.parts = len(judges)
        self.once = [_Step(index, judge) for index, judge in enumerate(judges) if per_message[index]]
        self.each = [_Step(index, judge) for index, judge in enumerate(judges) if not per_message[index]]
        # A refusal of a part judged once is given where the first of them would be judged, as check_reading would.
        first_once = per_message.index(True) if True in per_message else self.parts
        self.before_once = [step for step in self.each if step.position < first_once]
        # The values in check_reading's order: the quantities, with interval_s after its energy.
        names = list(quantities)
        shown = [name for name in names if name != "interval_s"] + (["interval_s"] if "interval_s" in names else [])
        self.shown = [(name, FIRST_QUANTITY + names.index(name)) for name in shown]
        self.interval = "interval_s" in names
        self.derive = "power_kw" in names and "power_factor" in names

    def read(self, src: Any, aux: Any, props: dict[str, str], limits: Limits) -> list[Reading | HubError]:
        horizon = min(limits.now_ms + limits.max_future_ms, MAX_TIME_MS - 1)
        message = Message(src, aux, props, limits, horizon)
        message.factors = [resolve(message) for resolve in self.factors]
        once: list[Any] = [None] * self.parts
        refusal: HubError | None = None  # the first refusal of a part judged once
        for index, judge in self.once:
            try:
                once[index] = judge(message, None, once[DER_ID])
            except HubError as exc:
                if refusal is None:
                    refusal = exc
        steps = self.each if refusal is None else self.before_once
        check_record, location, shown = self.check_record, self.access.location, self.shown
        items: list[Reading | HubError] = []
        for place, record in self.access.records(message):
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
                quantities = {name: values[index] for name, index in shown if values[index] is not None}
                if self.interval:
                    _pair_interval(quantities)
                if not quantities:
                    continue  # every value 'not available': no reading
                if self.derive:
                    derive_reactive_power(quantities)
                items.append(Reading(values[DER_ID], values[MEASURED_AT], quantities, values[PASSWORD]))
            except HubError as exc:
                exc.der_id = values[DER_ID]
                exc.message = f"{location(message, place)}: {exc.message}"
                items.append(exc)
        if len(items) > limits.max_readings:
            raise HubError(
                ErrorCode.TOO_LARGE, f"{len(items)} readings in one message; the limit is {limits.max_readings}"
            )
        return items


def _pair_interval(quantities: dict[str, float]) -> None:
    """The length of an interval whose energy is not available is dropped with it; energy without its interval
    is refused, as check_reading refuses it."""
    if "energy_interval_kwh" not in quantities:
        quantities.pop("interval_s", None)
    elif "interval_s" not in quantities:
        raise HubError(BAD, "energy_interval_kwh and interval_s go together")


def _level(access: Access) -> Callable[..., bool]:
    def level(*sources: Source | None) -> bool:
        return all(source is None or access.message_level(source) for source in sources)

    return level


def _sources(number: Any) -> list[Source]:
    found = [number.source, *(factor.source for factor in number.factors)]
    if number.minus is not None:
        found += _sources(number.minus)
    return found


def _ignoring_der_id(value: Callable[[Message, Any], float | None]) -> Judge:
    def judge(message: Message, record: Any, der_id: str | None) -> float | None:
        return value(message, record)

    return judge


# -- the parts --------------------------------------------------------------------------------------------------------


def _der_id(spec: IdSpec, access: Access) -> Judge:
    """A DER id: a vendor id (a number, a binary text) as text, through the map if there is one, well-formed."""
    get = access.getter(spec.source)
    label = spec.source.label
    convert = spec.source.kind not in ("property", "const")  # a user property is text already
    table, where = spec.map, spec.map_name

    def judge(message: Message, record: Any, der_id: str | None) -> str:
        found = get(message, record)
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
        if not valid_id(found):
            raise HubError(BAD, f"der_id is missing or not a valid DER id ({label})")
        return found

    return judge


def _password(source: Source, access: Access) -> Judge:
    """A password: from the payload, or from the user property named after the DER id (``password:{der_id}``)."""
    label = source.label
    if source.template is not None:
        prefix, suffix = source.template

        def get(message: Message, record: Any, der_id: str | None) -> Any:
            return message.props.get(prefix + der_id + suffix) if der_id is not None else None

    else:
        fetch = access.getter(source)

        def get(message: Message, record: Any, der_id: str | None) -> Any:
            return fetch(message, record)

    binary = source.kind == "field"

    def judge(message: Message, record: Any, der_id: str | None) -> str:
        found = get(message, record, der_id)
        if binary and found.__class__ is bytes:
            found = _ascii(found, "password", label)
        if found.__class__ is not str or not found:
            raise HubError(BAD, f"password is missing or not a string ({label})")
        return found

    return judge


def _time(spec: TimeSpec, access: Access) -> Judge:
    """measured_at in epoch ms: the common type the quick way (an epoch number, a text by its hour), anything
    else the long way; the hub's clock when the definition says so; within the years and not in the future."""
    if spec.source is None:

        def received(message: Message, record: Any, der_id: str | None) -> int:
            return message.limits.now_ms

        return received
    get = access.getter(spec.source)
    label, shift, default_now = spec.source.label, spec.shift_ms, spec.default_now
    quick: Callable[[Any], int]
    slow: Callable[[Any], int]
    if spec.kind in ("epoch_s", "epoch_ms"):
        common: Any = int  # Any: what the check narrows the value to
        per_unit = 1000 if spec.kind == "epoch_s" else 1
        quick = _seconds if per_unit == 1000 else _itself

        def slow(value: Any) -> int:
            return _epoch(value, per_unit, label)

    else:
        common = str
        table = hour_table(_slow_time(spec), spec.format, spec.zone) if spec.kind == "local" else None
        quick = table if table is not None else hourly(_slow_time(spec), spec.format)
        long_way = _rfc3339 if spec.kind == "rfc3339" else _local

        def slow(value: Any) -> int:
            return long_way(value, label, None, None)

    def judge(message: Message, record: Any, der_id: str | None) -> int:
        found = get(message, record)
        if found.__class__ is common:
            at = quick(found) + shift
        elif found is None:
            if not default_now:
                raise HubError(BAD, f"measured_at is missing ({label})")
            at = message.limits.now_ms
        else:
            at = slow(found) + shift
        if not MIN_TIME_MS <= at <= message.horizon:
            raise HubError(BAD, _bad_time(at, message.limits))
        return at

    return judge


def _seconds(value: int) -> int:
    return value * 1000


def _itself(value: int) -> int:
    return value


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
