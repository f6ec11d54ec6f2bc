"""A quantity's value, from the raw payload value to the unified unit: built once per definition into closures.

A value is read, told 'not available' by its sentinels and valid range, scaled by its constant factor (unit,
scale and sign folded at load) and by the factors the payload states, less what it is minus. A scale the
message states once (a unit for the whole series) is resolved once per message (``message_factor``), into
``Message.factors``. Refusals carry the messages of ``hubd.decode.native.check_reading``.

Two ways to the same values: ``quantity`` judges one record, ``quantity_column`` the records of a message at
once, the common case (every value a number, none a sentinel) in a few passes over lists, and any other
value by value through ``quantity``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from itertools import repeat
from operator import mul, sub, truediv
from typing import Any, NamedTuple

from hubd.decode.vendor.access import Access, Getter, Message, Resolved
from hubd.decode.vendor.language import Factor, Number
from hubd.decode.vendor.times import show
from hubd.model import QUANTITIES, ErrorCode, HubError, out_of_range

BAD = ErrorCode.BAD_REQUEST

# (the message, the record, the DER id so far) -> the value in the unified unit, or None when it is not available.
# The signature of a part of a reading (readings.Judge); the DER id is not needed here.
Value = Callable[[Message, Any, str | None], float | None]
# (the message, its records) -> the value of each record, as ``Value`` gives it.
Column = Callable[[Message, list[Any]], list[float | None]]


def quantity(number: Number, name: str, access: Access, slots: dict[int, int] | None) -> Value:
    """``name``'s value, held to the native bounds: finite, within the quantity's range.

    ``slots``: for a quantity read per record, where in ``Message.factors`` each factor the message states once
    was resolved (by ``id`` of the Factor); None for a quantity read once per message. One closure does the
    common work inline (a value a quantity reads per record costs one call, not one per step).
    """
    return _value(number, name, access, slots, bounded=True)


def quantity_column(number: Number, name: str, access: Access, slots: dict[int, int]) -> Column:
    """``name``'s value for each record of a message, as ``quantity`` gives it (and raising what it raises)."""
    return _column(number, name, access, slots, bounded=True)


def _column(number: Number, name: str, access: Access, slots: dict[int, int], bounded: bool) -> Column:
    """Values a column at a time when every raw value is a number and none is a sentinel, and the factors are
    those the message states; else value by value. Both give the same floats: the same operations, in order."""
    one = _value(number, name, access, slots, bounded)

    def each(message: Message, records: list[Any]) -> list[float | None]:
        return [one(message, record, None) for record in records]

    stated = [slots.get(id(factor)) for factor in number.factors]
    if None in stated:  # a factor read per record
        return each
    valid = number.valid
    get = access.getter(number.source)
    at_message = access.message_level(number.source)
    text, sentinels = access.raw == "text", number.sentinels
    multiplier, divisor = _ratio(number.factor)
    minus = _column(number.minus, name, access, slots, bounded=False) if number.minus is not None else None
    low, high = QUANTITIES[name] if bounded else (None, None)

    def column(message: Message, records: list[Any]) -> list[float | None]:
        raws = [get(message)] * len(records) if at_message else list(map(get, records))
        numbers = _numbers(raws, text)
        if numbers is None or (sentinels and not (sentinels.isdisjoint(raws) and sentinels.isdisjoint(numbers))):
            return each(message, records)
        if valid is not None and numbers and not _within(numbers, valid):
            return each(message, records)
        values: list[Any] = _scaled(numbers, multiplier, divisor)
        for slot in stated:
            times, by, refusal = message.factors[slot]  # type: ignore[index]
            if refusal is not None:
                raise HubError(BAD, refusal.message)
            values = _scaled(values, times, by)
        if minus is not None:
            others = minus(message, records)
            if None in others:
                return each(message, records)
            values = list(map(sub, values, others))
        # A sum is finite only if every value is (a false alarm, a sum too large, only costs the slow way).
        if (
            bounded
            and values
            and not (
                math.isfinite(sum(values))
                and (low is None or min(values) >= low)
                and (high is None or max(values) <= high)
            )
        ):
            return each(message, records)
        return values

    return column


def _scaled(values: list[Any], multiplier: float, divisor: float) -> list[float]:
    """``value * multiplier / divisor`` for each value, as one pass when either is 1 (``_ratio`` makes one so):
    x * 1.0 is float(x) and x / 1.0 is x, exactly."""
    if multiplier == 1.0:
        return list(map(truediv, values, repeat(divisor)))
    if divisor == 1.0:
        return list(map(mul, values, repeat(multiplier)))
    return [value * multiplier / divisor for value in values]


def _numbers(raws: list[Any], text: bool) -> list[Any] | None:
    """The raw values as numbers, if every one is (a CSV cell: its text reads as one); else None."""
    if text:
        try:
            return list(map(float, raws))
        except (TypeError, ValueError):
            return None
    return raws if set(map(type, raws)) <= _NUMBER_TYPES else None


_NUMBER_TYPES = {int, float}


def _within(numbers: list[Any], valid: tuple[float, float]) -> bool:
    """Whether every number is within the valid range (false for NaN: its sum is not finite)."""
    try:
        finite = math.isfinite(sum(numbers))
    except OverflowError:  # an integer too large for a float
        return False
    return finite and valid[0] <= min(numbers) and max(numbers) <= valid[1]


def factors_of(number: Number) -> list[Factor]:
    """The factors the payload states for ``number``, with those of what it is minus."""
    found = list(number.factors)
    if number.minus is not None:
        found += factors_of(number.minus)
    return found


def message_factor(factor: Factor, name: str, access: Access) -> Callable[[Message], Resolved]:
    """A factor the message states once, resolved per message: (multiplier, divisor, None) or its refusal."""
    get = access.getter(factor.source)
    label = factor.source.label

    def resolve(message: Message) -> Resolved:
        try:
            return (*_ratio(_factor(get(message), factor, label, name)), None)
        except HubError as exc:
            return 1.0, 1.0, exc

    return resolve


def _value(number: Number, name: str, access: Access, slots: dict[int, int] | None, bounded: bool) -> Value:
    """The value: read, 'not available', scaled, minus the other value, and if ``bounded`` held to the bounds
    (what a quantity is minus is not: only the difference is).

    A number as it stands skips the conversion (the common case of JSON and binary payloads); anything else
    (a JSON text or null, a CSV cell, a missing EPC) goes through the kind's conversion.
    """
    get = access.getter(number.source)
    at_message = access.message_level(number.source)  # read from the message, else from the record
    sentinels = number.sentinels
    convert = _RAW[access.raw](sentinels, name, number.source.label)
    valid = number.valid
    valid_low, valid_high = valid if valid is not None else (0.0, 0.0)  # unpacked once, not per value
    multiplier, divisor = _ratio(number.factor)  # 830 / 1000 is 0.83, 830 * 0.001 is 0.8300000000000001
    scales = [_scale(factor, name, access, slots) for factor in number.factors]
    minus = _value(number.minus, name, access, slots, bounded=False) if number.minus is not None else None
    low, high = QUANTITIES[name] if bounded else (None, None)
    # One chained comparison, false outside the bounds and for NaN and ±inf (no bound: the largest finite float).
    lowest = float(low) if low is not None else -sys.float_info.max
    highest = float(high) if high is not None else sys.float_info.max

    def value(message: Message, record: Any, der_id: str | None) -> float | None:
        found = get(message if at_message else record)
        if found.__class__ is float or found.__class__ is int:
            if sentinels and found in sentinels:
                return None
        else:
            found = convert(found)
            if found is None:
                return None
        if valid is not None and not valid_low <= found <= valid_high:
            return None  # outside the valid range: not available
        result: float = found * multiplier / divisor
        for slot, fetch, from_message, plain, low_raw, high_raw, known, slow in scales:
            if slot is not None:  # stated once for the message
                times, by, refusal = message.factors[slot]
                if refusal is not None:
                    raise HubError(BAD, refusal.message)
                result = result * times / by
                continue
            raw = fetch(message if from_message else record)
            if plain:  # a binary multiplier: an integer within its valid range as it stands
                result *= raw if raw.__class__ is int and low_raw <= raw <= high_raw else slow(raw)
            else:  # a unit code or a power of ten by one lookup, else the long way
                times, by = (known and known.get(raw)) or _ratio(slow(raw))
                result = result * times / by
        if minus is not None:
            other = minus(message, record, der_id)
            if other is None:
                return None  # one side not available: so is the difference
            result -= other
        if bounded and not lowest <= result <= highest:
            raise HubError(BAD, _bad_number(name, result))
        return result

    return value


def _json(sentinels: frozenset[Any], name: str, label: str) -> Callable[[Any], Any]:
    """A JSON number as it stands; a sentinel (a number or a text) is not available, anything else refused."""

    def raw(found: Any) -> Any:
        if found.__class__ is not float and found.__class__ is not int and found is not None:
            if found.__class__ is str and found in sentinels:
                return None
            raise HubError(BAD, _not_a_number(name, label, found))
        if sentinels and found in sentinels:
            return None
        return found

    return raw


def _text(sentinels: frozenset[Any], name: str, label: str) -> Callable[[Any], Any]:
    """A CSV cell: a sentinel (as written, or as the number it reads as) is not available, else a number."""

    def raw(found: Any) -> Any:
        if found is None or found in sentinels:
            return None
        try:
            number = float(found)
        except ValueError:
            raise HubError(BAD, _not_a_number(name, label, found)) from None
        return None if number in sentinels else number

    return raw


def _number(sentinels: frozenset[Any], name: str, label: str) -> Callable[[Any], Any]:
    """A binary field or an EPC: a number already (None: the frame lacks the EPC)."""
    if not sentinels:
        return _as_is

    def raw(found: Any) -> Any:
        return None if found in sentinels else found

    return raw


def _as_is(found: Any) -> Any:
    return found


_RAW = {"json": _json, "text": _text, "number": _number}


class _Scale(NamedTuple):
    """One factor from the payload, as ``_value`` applies it."""

    slot: int | None  # where in Message.factors the message states it once, else read per value:
    fetch: Getter
    from_message: bool  # fetch reads the message, not the record
    plain: bool  # a binary multiplier (no table, no power of ten): taken as it stands, not as a ratio
    low: float  # plain: the valid range of an integer taken as it stands
    high: float
    known: dict[Any, tuple[float, float]]  # a binary unit code or power of ten: its (multiplier, divisor)
    slow: Callable[[Any], float]  # the factor from its raw value, the long way (_factor)


def _scale(factor: Factor, name: str, access: Access, slots: dict[int, int] | None) -> _Scale:
    slot = slots.get(id(factor)) if slots is not None else None
    plain = access.raw == "number" and factor.table is None and not factor.pow10
    low, high = factor.valid if factor.valid is not None else (-math.inf, math.inf)
    known: dict[Any, tuple[float, float]] = {}
    if access.raw == "number" and factor.table is not None:
        known = {key: _ratio(value) for key, value in factor.table.items()}
    elif access.raw == "number" and factor.pow10 and factor.valid is None:
        known = _POW10
    get = access.getter(factor.source)
    slow = partial(_factor, factor=factor, label=factor.source.label, name=name)
    return _Scale(slot, get, access.message_level(factor.source), plain, low, high, known, slow)


def _factor(raw: Any, factor: Factor, label: str, name: str) -> float:
    """One factor from the payload: the value, its row in the table, or 10 to its power."""
    if raw is None:
        if factor.default is None:
            raise HubError(BAD, f"{name}: its scale {label} is missing")
        return factor.default
    if factor.table is not None:
        found = factor.table.get(raw.strip() if raw.__class__ is str else raw) if raw.__class__ in _SCALARS else None
        if found is None:
            raise HubError(BAD, f"{name}: {label} {show(raw)} is not one of {', '.join(map(str, factor.table))}")
        return found
    if raw.__class__ is str:
        with suppress(ValueError):
            raw = float(raw)
    if (raw.__class__ is not int and raw.__class__ is not float) or not math.isfinite(raw):
        raise HubError(BAD, f"{name}: its scale {label} is {show(raw)}, not a number")
    if factor.valid is not None and not factor.valid[0] <= raw <= factor.valid[1]:
        if factor.default is None:
            raise HubError(BAD, f"{name}: its scale {label} {show(raw)} is outside {list(factor.valid)}")
        return factor.default
    if factor.pow10:
        if not -30 <= raw <= 30 or raw != int(raw):
            raise HubError(BAD, f"{name}: its scale {label} {show(raw)} is no power of ten the hub takes")
        return float(10.0 ** int(raw))
    return float(raw)


_SCALARS = frozenset({int, float, str})


def _ratio(factor: float) -> tuple[float, float]:
    """A factor as (multiplier, divisor): 0.1 is (1, 10), so that 123456 x 0.1 is 12345.6, not 12345.600000000002."""
    if factor != 0:
        divisor = 1 / factor
        if abs(divisor) > 1 and abs(divisor - round(divisor)) < 1e-9 * abs(divisor):
            return 1.0, float(round(divisor))
    return float(factor), 1.0


_POW10 = {exponent: _ratio(10.0**exponent) for exponent in range(-30, 31)}


def _not_a_number(name: str, label: str, value: Any) -> str:
    return f"{name}: {label} is {show(value)}, not a number"


def _bad_number(name: str, value: float) -> str:
    """The messages of check_reading, for a value out of range or not finite."""
    if not math.isfinite(value):
        return f"{name} must be a finite number"
    return out_of_range(name, value)
