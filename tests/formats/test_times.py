"""Vendor times: the per-hour cache gives exactly what parsing each text would, across daylight-saving changes
(including Lord Howe Island's half-hour one), for well-formed and malformed texts alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hubd.decode.registry import Limits
from hubd.decode.vendor import load_definition
from hubd.decode.vendor.times import HourTable, _local, _rfc3339, hour_table, hourly
from hubd.model import HubError, Reading, parse_time

ZONES = ["Asia/Tokyo", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"]
FORMATS = [None, "%Y/%m/%d %H:%M", "%Y-%m-%d %H:%M:%S", "%d.%m.%Y %H:%M:%S", "%Y%m%d%H%M"]


def table(slow: Callable[[str], int], fmt: str | None, zone: ZoneInfo | None = None) -> HourTable:
    found = hour_table(slow, fmt, zone)
    assert found is not None, fmt
    return found


def outcome(parse: Callable[[str], int], text: str) -> int | str:
    try:
        return parse(text)
    except HubError as exc:
        return exc.message


times = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31)) | st.sampled_from(
    # around daylight-saving changes: Berlin, New York, Lord Howe (30 minutes)
    [datetime(2026, 3, 29, 2, 30), datetime(2026, 10, 25, 2, 30), datetime(2026, 3, 8, 2, 15),
     datetime(2026, 11, 1, 1, 45), datetime(2026, 4, 5, 1, 45), datetime(2026, 10, 4, 2, 15)]
)  # fmt: skip


@settings(max_examples=400, deadline=None, derandomize=True)
@given(zone=st.sampled_from(ZONES), fmt=st.sampled_from(FORMATS), moment=times, shift=st.integers(0, 7200))
def test_local_times_by_the_hour_are_the_times_parsed_one_by_one(
    zone: str, fmt: str | None, moment: datetime, shift: int
) -> None:
    tz = ZoneInfo(zone)

    def slow(text: str) -> int:
        return _local(text, "t", tz, fmt)

    for fast in (hourly(slow, fmt), table(slow, fmt), table(slow, fmt, tz)):
        for step in range(0, 3 * 3600, 997):  # several texts of one series through the same cache
            at = moment + timedelta(seconds=shift + step)
            text = at.strftime(fmt or "%Y-%m-%d %H:%M:%S")
            assert outcome(fast, text) == outcome(slow, text), text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(alphabet="0123456789-:T +Z./", min_size=15, max_size=26), fmt=st.sampled_from(FORMATS))
def test_malformed_texts_are_refused_alike(text: str, fmt: str | None) -> None:
    tz = ZoneInfo("Europe/Berlin")

    def slow(text: str) -> int:
        return _local(text, "t", tz, fmt)

    assert outcome(hourly(slow, fmt), text) == outcome(slow, text)
    for fast in (table(slow, fmt), table(slow, fmt, tz)):
        assert outcome(fast, text) == outcome(slow, text)
        assert outcome(fast, text) == outcome(slow, text)  # and again, from the tables


@pytest.mark.parametrize(
    "text", ["2026-11-27T09:05:00+09:00", "2026-11-27T00:05:00Z", "2026-11-27T09:05:59.250-03:30", "2026-11-27"]
)
def test_rfc3339_by_the_hour(text: str) -> None:
    def slow(value: str) -> int:
        return _rfc3339(value, "t", None, None)

    fast = hourly(slow, None)
    assert outcome(fast, text) == outcome(slow, text)
    assert outcome(fast, text) == outcome(fast, text)  # and again, from the cache


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Australia/Lord_Howe"])
@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25", "2026-04-05", "2026-10-04"])
def test_every_quarter_hour_of_a_daylight_saving_day(zone: str, day: str) -> None:
    """A day of quarter hours, twice through the same tables, as a series of one message and the next."""
    tz = ZoneInfo(zone)

    def slow(text: str) -> int:
        return _local(text, "t", tz, None)

    texts = [f"{day} {q // 4:02d}:{q % 4 * 15:02d}:00" for q in range(96)]
    for fast in (table(slow, None), table(slow, None, tz)):  # hour by hour, and a day at once when it can
        for _ in range(2):
            assert [outcome(fast, text) for text in texts] == [outcome(slow, text) for text in texts]


def test_layouts_the_tables_do_not_take_go_the_long_way() -> None:
    def slow(text: str) -> int:
        return _local(text, "t", ZoneInfo("UTC"), None)

    assert hour_table(slow, "%H:%M %d.%m.%Y") is None  # the date after the hour
    assert hour_table(slow, "%Y-%m-%d %I:%M %p") is None  # not a fixed layout


@pytest.mark.parametrize("day", ["2026-03-29", "2026-10-25", "2026-11-27"])
def test_a_json_series_in_local_time_decodes_to_the_times_parsed_one_by_one(tmp_path: Path, day: str) -> None:
    """The decoder's two lookups, on a day with a daylight-saving change and one without."""
    definition = tmp_path / "site.berlin.yaml"
    definition.write_text(
        yaml.safe_dump(
            {
                "kind": "json",
                "records": "$.values[*]",
                "reading": {
                    "der_id": {"property": "der_id"},
                    "password": {"property": "password"},
                    "measured_at": {"path": "date", "time": "local", "zone": "Europe/Berlin"},
                    "power_kw": {"path": "value", "unit": "W"},
                },
            }
        )
    )
    decode = load_definition(definition).decoder
    texts = [f"{day} {q // 4:02d}:{q % 4 * 15:02d}:{q % 3:02d}" for q in range(96)]
    payload = orjson.dumps({"values": [{"date": text, "value": 1000} for text in texts]})
    limits = Limits(parse_time("2026-12-01T00:00:00Z"), 300_000, 1000, {"der_id": "PV-1", "password": "pw"})
    tz = ZoneInfo("Europe/Berlin")
    for _ in range(2):  # and again, from the tables
        items = decode(payload, limits).items
        assert all(isinstance(item, Reading) and item.values == {"power_kw": 1.0} for item in items)
        assert [item.measured_at for item in items if isinstance(item, Reading)] == [
            _local(text, "t", tz, None) for text in texts
        ]


def test_a_day_without_a_change_of_offset_enters_its_hours_at_once() -> None:
    def slow_in(tz: ZoneInfo) -> Callable[[str], int]:
        return lambda text: _local(text, "t", tz, None)

    tokyo, berlin = ZoneInfo("Asia/Tokyo"), ZoneInfo("Europe/Berlin")
    fast = table(slow_in(tokyo), None, tokyo)
    assert fast("2026-11-27 09:15:00") == _local("2026-11-27 09:15:00", "t", tokyo, None)
    assert len(fast.hours) == 24
    fast = table(slow_in(berlin), None, berlin)  # summer time begins at 02:00: hour by hour
    assert fast("2026-03-29 09:15:00") == _local("2026-03-29 09:15:00", "t", berlin, None)
    assert list(fast.hours) == ["2026-03-29 09"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param(  # a column at a time
            ["01:45", "02:00", "02:15", "02:30", "02:45", "02:00", "02:15", "02:30", "02:45", "03:00"],
            ["23:45", "00:00", "00:15", "00:30", "00:45", "01:00", "01:15", "01:30", "01:45", "02:00"],
            id="series",
        ),
        pytest.param(["02:45", "02:00", "02:15"], ["00:45", "01:00", "01:15"], id="three-records"),
        pytest.param(  # record by record: one value refused
            ["02:30", "02:45", "02:00", "bad", "02:30"], ["00:30", "00:45", "01:00", None, "01:30"], id="one-refused"
        ),
        pytest.param(["03:00", "02:45", "02:30", "02:15"], ["02:00", "00:45", "00:30", "00:15"], id="newest-first"),
    ],
)
def test_the_hour_repeated_when_clocks_go_back_is_told_apart_in_a_series_in_order(
    tmp_path: Path, values: list[str], expected: list[str | None]
) -> None:
    """Europe/Berlin, 2026-10-25: 02:00 … 02:45 come twice; in order, the repeats are the later UTC instants."""
    definition = tmp_path / "site.berlin.yaml"
    definition.write_text(
        yaml.safe_dump(
            {
                "kind": "json",
                "records": "$.values[*]",
                "reading": {
                    "der_id": {"property": "der_id"},
                    "password": {"property": "password"},
                    "measured_at": {"path": "date", "time": "local", "zone": "Europe/Berlin"},
                    "power_kw": {"path": "value", "unit": "W"},
                },
            }
        )
    )
    decode = load_definition(definition).decoder
    records = [
        {"date": f"2026-10-25 {value if value != 'bad' else '02:15'}:00", "value": "x" if value == "bad" else 1000}
        for value in values
    ]
    limits = Limits(parse_time("2026-12-01T00:00:00Z"), 300_000, 1000, {"der_id": "PV-1", "password": "pw"})
    items = decode(orjson.dumps({"values": records}), limits).items
    found = [item.measured_at if isinstance(item, Reading) else None for item in items]
    day = {"23:45": "2026-10-24T23:45:00Z"}
    assert found == [None if at is None else parse_time(day.get(at, f"2026-10-25T{at}:00Z")) for at in expected], [
        None if at is None else datetime.fromtimestamp(at / 1000).isoformat() for at in found
    ]
