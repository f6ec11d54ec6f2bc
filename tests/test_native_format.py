"""The native hub.v1 format: every field validated, each bad reading refused alone with its reason."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest

from hubd.decode.native import decode_native
from hubd.decode.registry import Limits
from hubd.model import ErrorCode, HubError, Reading, parse_time

NOW = parse_time("2026-11-27T00:00:00Z")
LIMITS = Limits(now_ms=NOW, max_future_ms=300_000, max_readings=100)


def one(**fields: Any) -> Reading | HubError:
    reading = {"der_id": "PV-1", "password": "pw", "measured_at": "2026-11-27T09:00:00+09:00", **fields}
    return decode_native(orjson.dumps({"readings": [reading]}), LIMITS).items[0]


def test_times_are_stored_in_utc_whatever_the_offset() -> None:
    item = one(power_kw=1.0)
    assert isinstance(item, Reading)
    assert item.measured_at == NOW
    assert parse_time(NOW) == NOW  # epoch milliseconds pass through


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"power_kw": "3.2"}, "power_kw must be a number"),
        ({"power_kw": True}, "power_kw must be a number"),
        ({"power_factor": 1.2}, "power_factor 1.2 is out of range"),
        ({"soc_pct": -1}, "soc_pct -1.0 is out of range [0.0, 100.0]"),
        ({"voltage_v": -1}, "voltage_v -1.0 is out of range: it must be at least 0.0"),
        ({"powr_kw": 1.0}, "unknown field 'powr_kw'"),
        ({}, "at least one quantity"),
        ({"energy_interval_kwh": 0.5}, "energy_interval_kwh and interval_s go together"),
        ({"power_kw": 1.0, "measured_at": "2026-11-27T09:00:00"}, "has no UTC offset"),
        ({"power_kw": 1.0, "measured_at": "yesterday"}, "is not an RFC 3339 time"),
        ({"power_kw": 1.0, "measured_at": "2026-11-27T00:10:00Z"}, "in the future"),
        ({"power_kw": 1.0, "der_id": "bad id with spaces"}, "der_id"),
        ({"power_kw": 1.0, "password": 1234}, "password"),
    ],
)
def test_bad_reading_is_refused_with_a_reason(fields: dict[str, Any], fragment: str) -> None:
    item = one(**fields)
    assert isinstance(item, HubError)
    assert item.code is ErrorCode.BAD_REQUEST
    assert fragment in item.message


def test_nan_and_infinity_fail_only_their_reading() -> None:
    payload = (
        b'{"readings": [{"der_id": "PV-1", "password": "pw", "measured_at": 0, "power_kw": NaN},'
        b' {"der_id": "PV-1", "password": "pw", "measured_at": 1, "power_kw": Infinity},'
        b' {"der_id": "PV-1", "password": "pw", "measured_at": 2, "power_kw": 1.5}]}'
    )
    items = decode_native(payload, LIMITS).items
    assert [type(i).__name__ for i in items] == ["HubError", "HubError", "Reading"]
    assert "finite" in items[0].message  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xfe not json", ErrorCode.DECODE_ERROR),
        (b"[1, 2]", ErrorCode.DECODE_ERROR),
        (b'{"readings": {"der_id": "PV-1"}}', ErrorCode.DECODE_ERROR),
        (b'{"source_id": 7, "readings": []}', ErrorCode.DECODE_ERROR),
        (orjson.dumps({"readings": [{}] * 101}), ErrorCode.TOO_LARGE),
    ],
)
def test_undecodable_message(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(HubError) as caught:
        decode_native(payload, LIMITS)
    assert caught.value.code is code


def test_reactive_power_is_derived_with_the_sign_of_the_power_factor() -> None:
    lagging = one(power_kw=3.0, power_factor=0.8)
    leading = one(power_kw=3.0, power_factor=-0.8)
    sent = one(power_kw=3.0, power_factor=0.8, reactive_power_kvar=1.0)
    assert isinstance(lagging, Reading) and isinstance(leading, Reading) and isinstance(sent, Reading)
    assert math.isclose(lagging.values["reactive_power_kvar"], 2.25)
    assert math.isclose(leading.values["reactive_power_kvar"], -2.25)
    assert sent.values["reactive_power_kvar"] == 1.0


def test_reply_fields_for_mqtt311() -> None:
    decoded = decode_native(b'{"reply_to": "edge/a", "request_id": "r1", "readings": []}', LIMITS)
    assert (decoded.reply_to, decoded.request_id) == ("edge/a", "r1")
    for topic in ("edge/#", "$SYS/x", "", 7):
        payload = b'{"reply_to": %s, "readings": []}' % json.dumps(topic).encode()
        with pytest.raises(HubError) as refused:
            decode_native(payload, LIMITS)
        assert refused.value.code == ErrorCode.BAD_REQUEST and "reply_to" in refused.value.message


def test_a_reading_never_shows_its_password() -> None:
    """Readings reach log lines and error messages; what they print must not carry the DER's password."""
    reading = decode_native(
        orjson.dumps({"readings": [{"der_id": "PV-1", "password": "s3cret-pw", "measured_at": 0, "power_kw": 1.5}]}),
        LIMITS,
    ).items[0]
    assert isinstance(reading, Reading) and reading.password == "s3cret-pw"
    rich = repr(list(reading.__rich_repr__()))  # what rich's pretty-printer shows
    for shown in (repr(reading), str(reading), f"{reading}", repr([reading]), rich):
        assert "s3cret-pw" not in shown and "PV-1" in shown and "1.5" in shown
