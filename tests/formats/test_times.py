"""Vendor times: the per-hour cache gives exactly what parsing each text would, across daylight-saving changes
(including Lord Howe Island's half-hour one), for well-formed and malformed texts alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubd.model import HubError
from hubd.vendor_formats.codegen import _local, _rfc3339, hourly

ZONES = ["Asia/Tokyo", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"]
FORMATS = [None, "%Y/%m/%d %H:%M", "%Y-%m-%d %H:%M:%S", "%d.%m.%Y %H:%M:%S", "%Y%m%d%H%M"]


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

    fast = hourly(slow, fmt)
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


@pytest.mark.parametrize(
    "text", ["2026-11-27T09:05:00+09:00", "2026-11-27T00:05:00Z", "2026-11-27T09:05:59.250-03:30", "2026-11-27"]
)
def test_rfc3339_by_the_hour(text: str) -> None:
    def slow(value: str) -> int:
        return _rfc3339(value, "t", None, None)

    fast = hourly(slow, None)
    assert outcome(fast, text) == outcome(slow, text)
    assert outcome(fast, text) == outcome(fast, text)  # and again, from the cache
