"""The native format's fast path (msgspec) gives exactly what the slow path (orjson, rules in Python) gives.

Hypothesis writes hub.v1-like JSON text by hand, so that it can hold what a JSON library would not write:
NaN and Infinity, lone surrogates, invalid UTF-8, duplicate keys, integers past 64 bits and numbers in
every spelling. Each payload goes to both paths; whenever the fast path takes a message, its result must be
the slow path's, value for value and type for type. A reading's values are compared as a mapping: the fast
path lists them in the order of QUANTITIES, the slow path in the sender's (the store takes them by name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubd import decode
from hubd.decode.native import _decode_fast, decode_native, decode_native_slow
from hubd.decode.registry import Decoded, Limits
from hubd.model import MAX_TIME_MS, MIN_TIME_MS, QUANTITIES, HubError, Reading, parse_time

NOW = parse_time("2026-11-27T00:00:00Z")
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Raw:
    """JSON text written as it stands (a number's spelling, NaN, a string with escapes or bad bytes)."""

    text: bytes


@dataclass(frozen=True)
class Obj:
    """A JSON object as its pairs, in order, duplicate keys allowed."""

    pairs: tuple[tuple[str | Raw, Any], ...]


def dump(value: Any) -> bytes:
    """The JSON text of a value built by the strategies below."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        return b"{" + b",".join(dump(key) + b":" + dump(item) for key, item in value.pairs) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(dump(item) for item in value) + b"]"
    return json.dumps(value).encode()  # a lone surrogate in a string comes out as a \ud800 escape


def number_texts(value: float) -> list[bytes]:
    """Spellings of one finite float: shortest, 17 digits, exponent form, with a capital E."""
    return [repr(value).encode(), f"{value:.17g}".encode(), f"{value:e}".encode(), f"{value:E}".encode()]


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], odds: int = 9) -> st.SearchStrategy[Any]:
    """``good`` ``odds`` times in ``odds + 1``, else ``bad``: most messages near-valid, so both paths are tried."""
    return st.integers(0, odds).flatmap(lambda roll: bad if roll == 0 else good)


def maybe(
    noisy: bool, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], odds: int = 9
) -> st.SearchStrategy[Any]:
    """In a clean message always ``good``; in a noisy one, mostly."""
    return mostly(good, bad, odds) if noisy else good


floats = st.floats(allow_nan=False, allow_infinity=False)
spelled_floats = st.builds(lambda v, i: Raw(number_texts(v)[i]), floats, st.integers(0, 3))
odd_numbers = st.sampled_from(
    [
        b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400", b"-1e-400", b"-0", b"-0.0", b"0e0",
        b"1.7976931348623157e308", b"1.7976931348623158e308", b"1.7976931348623159e308", b"4.9e-324",
        b"100.00000000000000000001", b"99.999999999999999999999", b"1.00000000000000000000000001",
        b"0.99999999999999999999", b"-1.0000000000000001", b"18446744073709551615", b"18446744073709551616",
        b"9223372036854775807", b"-9223372036854775808", b"-9223372036854775809", b"9007199254740993",
        b"123456789012345678901234567890", b"-123456789012345678901234567890.5", b"1" + b"0" * 308,
        b"1" + b"0" * 309, b"17976931348623158" + b"0" * 292, b"01", b"1.", b".5", b"+1", b"0x10",
    ]
).map(Raw)  # fmt: skip
big_ints = st.integers(min_value=-(2**80), max_value=2**80).map(lambda n: Raw(str(n).encode()))
numbers = floats | st.integers(-1000, 1000) | spelled_floats | odd_numbers | big_ints

bad_strings = st.sampled_from(
    [b'"\\ud800"', b'"\\udc00"', b'"a\\ud83d"', b'"\\ud83d\\ude00"', b'"\xff"', b'"\xed\xa0\x80"', b'"\xc3\xa9"',
     b'"\x01"', b'"\\u0000"', b'"\x7f"', b'"\\u00e9"', b'"\xf4\x90\x80\x80"', b'"\\u0041"']
).map(Raw)  # fmt: skip
texts = st.text(max_size=6) | bad_strings
scalars = st.none() | st.booleans() | numbers | texts
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=4)

good_ids = st.sampled_from(["PV-0001", "a", "ESS.1:x_y-z", "A" * 64])
bad_ids = st.sampled_from(["", "A" * 65, "bad id", "-a", "a\n", "é", "a/b"]) | values
good_passwords = st.sampled_from(["pw", "an-issued-password-24chr", "é", "\x7f", "\U0001f600"])
bad_passwords = st.just("") | texts | values
good_times = st.sampled_from(
    ["2026-11-27T00:00:00Z", "2026-11-26T23:59:00Z", "2026-11-27T09:00:00+09:00", "2026-11-27T00:00:00z",
     " 2026-11-27T00:00:00Z ", "2026-11-27 00:00:00Z", "2026-11-27T00:00:00.123456Z", "2026-11-27T00:05:00Z",
     "1000-01-01T00:00:00Z", "9998-12-31T23:59:59-12:00", "20261127T000000Z", NOW, NOW - 1, NOW + 300_000,
     MIN_TIME_MS, -1]
)  # fmt: skip
bad_times = st.sampled_from(
    ["2026-11-27T00:05:00.001Z", "2026-11-27T09:00:00", "2026-11-27", "yesterday", "", "0999-12-31T23:59:59Z",
     "9999-01-01T00:00:00Z", "2026-11-27T00:00:00+24:00", NOW + 300_001, MIN_TIME_MS - 1, MAX_TIME_MS - 1,
     MAX_TIME_MS]
) | st.sampled_from([float(NOW), NOW + 0.5, 2**63, 2**64, -(2**63) - 1, 10**30, True]).map(
    lambda v: Raw(dump(v))
) | values  # fmt: skip
quantity_names = st.sampled_from(sorted(QUANTITIES))
field_names = quantity_names | st.sampled_from(["der_id", "password", "measured_at", "powr_kw", "", "Power_kW"])


def quantity(name: str, noisy: bool) -> st.SearchStrategy[Any]:
    """A quantity's value: mostly a number in its range, spelled one of many ways."""
    low, high = QUANTITIES[name]
    low_f = -1e300 if low is None else low
    high_f = 1e300 if high is None else high
    good = (
        st.floats(min_value=low_f, max_value=high_f)
        | st.integers(int(max(low_f, -(2**70))), int(min(high_f, 2**70)))
        | st.floats(min_value=low_f, max_value=high_f).flatmap(lambda v: st.sampled_from(number_texts(v))).map(Raw)
        | st.none()
    )
    return maybe(noisy, good, values, odds=19)


@st.composite
def readings(draw: st.DrawFn, noisy: bool) -> Any:
    """A reading: well-formed, or (noisy) now and then with a field wrong, missing, doubled or unknown."""
    if noisy and draw(st.integers(0, 49)) == 0:
        return draw(values)  # not an object at all
    pairs: list[tuple[str | Raw, Any]] = []
    fields = (
        ("der_id", good_ids, bad_ids),
        ("password", good_passwords, bad_passwords),
        ("measured_at", good_times, bad_times),
    )
    for name, good, bad in fields:
        if not noisy or draw(st.integers(0, 29)):
            pairs.append((name, draw(maybe(noisy, good, bad))))
    names = draw(st.lists(quantity_names, min_size=1, max_size=5, unique=True))
    if "energy_interval_kwh" in names and "interval_s" not in names and (not noisy or draw(st.integers(0, 3))):
        names.append("interval_s")
    if "interval_s" in names and "energy_interval_kwh" not in names and (not noisy or draw(st.integers(0, 3))):
        names.append("energy_interval_kwh")
    pairs += [(name, draw(quantity(name, noisy))) for name in names]
    if noisy and draw(st.integers(0, 19)) == 0:
        pairs.insert(draw(st.integers(0, len(pairs))), (draw(field_names), draw(values)))
    if draw(st.integers(0, 3)) == 0:
        pairs = draw(st.permutations(pairs))
    return Obj(tuple(pairs))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A hub.v1 message: every other one clean, the others noisy, now and then with their bytes cut or spliced."""
    noisy = draw(st.booleans())
    pairs: list[tuple[str | Raw, Any]] = []
    if draw(st.booleans()):
        pairs.append(("source_id", draw(maybe(noisy, st.sampled_from(["edge-1", "A" * 64, None]), values | bad_ids))))
    if draw(st.booleans()):
        topics = st.sampled_from(["edge/answers", "é/ok", None, "a/#", "a/+/b", "", "a\x00b", "\ufdd0"])
        pairs.append(("reply_to", draw(maybe(noisy, topics, values))))
    if draw(st.booleans()):
        request_ids = st.sampled_from(["r-1", 7, -(2**63), 2**64 - 1, None, 2**64, -(2**63) - 1, 1.5, True])
        pairs.append(("request_id", draw(maybe(noisy, request_ids, values))))
    if draw(st.booleans()):  # the send time: the same forms as a reading's time, and the same limit ahead
        pairs.append(("sent_at", draw(maybe(noisy, good_times | st.none(), bad_times))))
    pairs.append(("readings", draw(maybe(noisy, st.lists(readings(noisy), max_size=4), values, odds=29))))
    if noisy and draw(st.integers(0, 9)) == 0:
        top_keys = st.sampled_from(["source_id", "reply_to", "request_id", "readings", "extra", "Readings", "sent_at"])
        pairs.insert(draw(st.integers(0, len(pairs))), (draw(top_keys | texts.map(dump).map(Raw)), draw(values)))
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    payload = dump(Obj(tuple(pairs)))
    cut = draw(st.integers(0, 29)) if noisy else -1
    if cut == 0:
        payload = payload[: draw(st.integers(0, len(payload)))]
    elif cut == 1:
        at = draw(st.integers(0, len(payload)))
        payload = payload[:at] + draw(st.binary(min_size=1, max_size=3)) + payload[at:]
    return payload


def outcome(decode: Any, payload: bytes, limits: Limits) -> Any:
    """What a decoder made of a payload, with every value's type, and nothing that would hide a difference."""
    try:
        decoded = decode(payload, limits)
    except HubError as exc:
        return ("refused", exc.code, exc.message, exc.der_id)
    return described(decoded)


def described(decoded: Decoded) -> Any:
    """A decoded message as plain data: floats by repr (so -0.0 is not 0.0), every value with its type."""
    items = []
    for item in decoded.items:
        if isinstance(item, HubError):
            items.append(("error", item.code, item.message, item.der_id))
        else:
            assert type(item) is Reading
            values = sorted((key, type(value), repr(value)) for key, value in item.values.items())
            items.append(("reading", item.der_id, type(item.measured_at), item.measured_at, values, item.password))
    extra = (decoded.gateway, type(decoded.request_id), decoded.request_id, type(decoded.sent_at), decoded.sent_at)
    return (type(decoded.source_id), decoded.source_id, decoded.reply_to, extra, items)


limits_strategy = st.builds(
    lambda count, future: Limits(NOW, future, count),
    mostly(st.just(100), st.integers(0, 4)),
    mostly(st.just(300_000), st.just(0)),
)


def assert_same(payload: bytes, limits: Limits) -> None:
    """Whatever the fast path takes, it decodes as the slow path does; and decode_native is the slow path's."""
    slow = outcome(decode_native_slow, payload, limits)
    fast = _decode_fast(payload, limits)
    if fast is not None:
        assert described(fast) == slow
    assert outcome(decode_native, payload, limits) == slow


@SETTINGS
@given(messages(), limits_strategy, st.booleans())
def test_fast_path_gives_what_the_slow_path_gives(payload: bytes, limits: Limits, cold: bool) -> None:
    if cold:  # the per-process caches of times and ids are a speed-up only
        decode.native._TIMES.clear()
        decode.native.KNOWN_IDS.clear()
    assert_same(payload, limits)


READING = b'{"der_id": "a", "password": "p", "measured_at": 1795737600000, '
DEEP = b"[" * 300 + b"]" * 300  # deeper than orjson writes: the slow path's second parser refuses it


@pytest.mark.parametrize(
    "payload",
    [
        b'{"readings": [{"der_id": "a", "password": "\\ud800", "measured_at": 0, "power_kw": 1}]}',
        b'{"readings": [], "x": "\xff"}',  # msgspec does not check the UTF-8 of a value it skips
        b'{"readings": [], "x": 1e400, "y": ' + DEEP + b"}",
        b'{"readings": [' + READING + b'"power_kw": 123456789012345678901234567890}], "x": ' + DEEP + b"}",
        b'{"readings": [' + READING + b'"power_kw": 123456789012345678901234567890}]}',
        b'{"readings": [' + READING + b'"power_kw": -0, "soc_pct": 100, "voltage_v": -0.0}]}',
        b'{"readings": [' + READING + b'"power_kw": 2, "power_factor": 1.0000000000000001}]}',
        b'{"readings": [' + READING + b'"power_kw": -2, "power_factor": -1}]}',
        b'{"readings": [' + READING + b'"power_kw": 2, "power_factor": -0.0}]}',
        b'{"readings": [' + READING + b'"power_kw": NaN}]}',
        b'{"readings": [' + READING + b'"power_kw": true}]}',
        b'{"readings": [' + READING + b'"power_kw": 1, "power_kw": null}]}',
        b'{"readings": [' + READING + b'"power_kw": "1", "power_kw": 1}]}',
        b'{"readings": [{"der_id": "a", "password": "p", "measured_at": 1795737600000.0, "power_kw": 1}]}',
        b'{"readings": [], "request_id": 18446744073709551616}',
        b'{"readings": [], "request_id": 18446744073709551615, "reply_to": "a/#"}',
        b'{"readings": [], "source_id": "bad id", "source_id": "good"}',
    ],
)
def test_payloads_where_msgspec_and_orjson_differ(payload: bytes) -> None:
    assert_same(payload, Limits(NOW, 300_000, 5))


def valid_message(count: int) -> bytes:
    readings = [
        {"der_id": f"PV-{k}", "password": "pw", "measured_at": "2026-11-26T23:59:00Z", "power_kw": 3.0 + k,
         "energy_kwh": 1000 + k, "voltage_v": 202.5, "power_factor": 0.98 if k % 2 else -0.5, "soc_pct": None}
        for k in range(count)
    ]  # fmt: skip
    return orjson.dumps({"source_id": "edge-1", "reply_to": "edge/answers", "request_id": 7, "readings": readings})


def test_valid_messages_take_the_fast_path() -> None:
    """Else the property above would hold by falling back every time."""
    limits = Limits(NOW, 300_000, 100)
    for count in (0, 1, 100):
        payload = valid_message(count)
        fast = _decode_fast(payload, limits)
        assert fast is not None and len(fast.items) == count
        assert described(fast) == outcome(decode_native_slow, payload, limits)


def test_a_message_the_fast_path_cannot_vouch_for_goes_to_the_slow_path_whole() -> None:
    limits = Limits(NOW, 300_000, 100)
    readings = orjson.loads(valid_message(3))
    readings["readings"][1]["power_factor"] = 1.5
    payload = orjson.dumps(readings)
    assert _decode_fast(payload, limits) is None
    items = decode_native(payload, limits).items
    assert [type(item) for item in items] == [Reading, HubError, Reading]
