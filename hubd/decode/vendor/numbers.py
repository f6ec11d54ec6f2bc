"""A quantity's value, from the raw payload value to the unified unit: built once per definition into closures.

A value is read, told 'not available' by its sentinels and valid range, scaled by its constant factor (unit,
scale and sign folded at load) and by the factors the payload states, less what it is minus. A scale the
message states once (a unit for the whole series) is resolved once per message (``message_factor``), into
``Message.factors``. Refusals carry the messages of ``hubd.decode.native.check_reading``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from hubd.decode.vendor.access import Access, Message, Resolved
from hubd.decode.vendor.language import Factor, Number
from hubd.decode.vendor.times import show
from hubd.model import QUANTITIES, ErrorCode, HubError, out_of_range

BAD = ErrorCode.BAD_REQUEST

# (the message, the record) -> the value in the unified unit, or None when it is not available.
Value = Callable[[Message, Any], float | None]
# (the message, the record, the value so far) -> the value times one factor.
Scale = Callable[[Message, Any, float], float]


def quantity(number: Number, name: str, access: Access, slots: dict[int, int] | None) -> Value:
    """``name``'s value, held to the native bounds: finite, within the quantity's range.

    ``slots``: for a quantity read per record, where in ``Message.factors`` each factor the message states once
    was resolved (by ``id`` of the Factor); None for a quantity read once per message.
    """
    value = _value(number, name, access, slots)
    low, high = QUANTITIES[name]
    # One chained comparison, false outside the bounds and for NaN and ±inf (no bound: the largest finite float).
    lowest = float(low) if low is not None else -sys.float_info.max
    highest = float(high) if high is not None else sys.float_info.max

    def judged(message: Message, record: Any) -> float | None:
        result = value(message, record)
        if result is not None and not lowest <= result <= highest:
            raise HubError(BAD, _bad_number(name, result))
        return result

    return judged


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
            return (*_ratio(_factor(get(message, None), factor, label, name)), None)
        except HubError as exc:
            return 1.0, 1.0, exc

    return resolve


def _value(number: Number, name: str, access: Access, slots: dict[int, int] | None) -> Value:
    """The value before the quantity's bounds: read, 'not available', scaled, minus the other value."""
    get = access.getter(number.source)
    raw = _RAW[access.raw](number.sentinels, name, number.source.label)
    valid = number.valid
    multiplier, divisor = _ratio(number.factor)  # 830 / 1000 is 0.83, 830 * 0.001 is 0.8300000000000001
    scales = [_scale(factor, name, access, slots) for factor in number.factors]
    minus = _value(number.minus, name, access, slots) if number.minus is not None else None

    def value(message: Message, record: Any) -> float | None:
        found = raw(get(message, record))
        if found is None or (valid is not None and not valid[0] <= found <= valid[1]):
            return None  # not available
        result: float = found * multiplier / divisor
        for scale in scales:
            result = scale(message, record, result)
        if minus is not None:
            other = minus(message, record)
            if other is None:
                return None  # one side not available: so is the difference
            result -= other
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


def _scale(factor: Factor, name: str, access: Access, slots: dict[int, int] | None) -> Scale:
    """One factor from the payload, applied to a value: resolved for the message (a slot), or per value."""
    slot = slots.get(id(factor)) if slots is not None else None
    if slot is not None:

        def stated(message: Message, record: Any, value: float) -> float:
            multiplier, divisor, refusal = message.factors[slot]
            if refusal is not None:
                raise HubError(BAD, refusal.message)
            return value * multiplier / divisor

        return stated
    get = access.getter(factor.source)
    label = factor.source.label
    if access.raw == "number" and factor.table is None and not factor.pow10:
        # A binary multiplier is an integer, or a float taken as it stands.
        def times(message: Message, record: Any, value: float) -> float:
            return value * _factor(get(message, record), factor, label, name)

        return times

    def ratio(message: Message, record: Any, value: float) -> float:
        multiplier, divisor = _ratio(_factor(get(message, record), factor, label, name))
        return value * multiplier / divisor

    return ratio


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


def _not_a_number(name: str, label: str, value: Any) -> str:
    return f"{name}: {label} is {show(value)}, not a number"


def _bad_number(name: str, value: float) -> str:
    """The messages of check_reading, for a value out of range or not finite."""
    if not math.isfinite(value):
        return f"{name} must be a finite number"
    return out_of_range(name, value)
