"""Extraction against independently computed expectations: slots, zones, energy, instants, filters, paging."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from pathlib import Path
from statistics import mean
from typing import Any

import pytest

from hubd.auth.registry import Registry
from hubd.config import QueryConfig
from hubd.model import parse_time
from hubd.query.conditions import decode_cursor, parse_query
from hubd.query.execute import run
from hubd.store import StoredReading
from hubd.store.sqlite import SqliteStore

CONFIG = QueryConfig(max_limit=100_000, default_limit=100_000, max_der_ids=100)
HOUR = 3_600_000


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "readings.sqlite3", synchronous="normal")


def put(store: SqliteStore, der_id: str, at: int, **values: float) -> None:
    store.write([StoredReading(der_id, at, values, 0, "test", "hub.v1")], stored_at=0)


def ask(store: SqliteStore, ders: dict[str, Any] | None = None, **request: Any) -> list[dict[str, Any]]:
    """All pages of a query, following next_cursor."""
    query = parse_query(request, CONFIG, ders or {})
    rows: list[dict[str, Any]] = []
    while True:
        answer = run(query, store)
        rows += answer["rows"]
        if answer["next_cursor"] is None:
            return rows
        query = replace(query, cursor=decode_cursor(answer["next_cursor"], query.mode))


def test_slot_energy_from_a_register_read_at_odd_times_out_of_order(store: SqliteStore) -> None:
    day = parse_time("2026-11-27T00:00:00+09:00")
    # 1 kWh per hour, read every 7 minutes (never on a slot edge), written shuffled and partly twice.
    times = list(range(day - 20 * 60_000, day + 24 * HOUR + 20 * 60_000, 7 * 60_000))
    random.Random(1).shuffle(times)
    for at in times + times[:50]:
        put(store, "M-1", at, energy_kwh=1000.0 + (at - day) / HOUR)
    rows = ask(
        store,
        start="2026-11-27T00:00:00+09:00",
        end="2026-11-28T00:00:00+09:00",
        interval="30m",
        agg={"energy_kwh": "delta"},
        tz="Asia/Tokyo",
    )
    assert [r["slot"] for r in rows] == list(range(1, 49))
    assert rows[0]["bucket_start"] == "2026-11-26T15:00:00.000Z"
    for row in rows:
        assert math.isclose(row["energy_kwh"], 0.5, rel_tol=1e-9), row
    assert sum(r["n"] for r in rows) == len([t for t in set(times) if day <= t < day + 24 * HOUR])


def test_register_reset_gives_no_negative_slot(store: SqliteStore) -> None:
    readings = [(0, 10.0), (10, 10.5), (20, 11.0), (35, 0.25), (50, 1.0), (70, 2.0)]  # reset between 20 and 35
    for minute, value in readings:
        put(store, "M-1", minute * 60_000, energy_kwh=value)
    rows = ask(store, start=0, end=90 * 60_000, interval="15m", agg={"energy_kwh": "delta"})
    assert all(r["energy_kwh"] >= 0 for r in rows)
    # Independent: the register shows 1.0 kWh before the reset and 2.0 kWh after it, counted from zero.
    assert math.isclose(sum(r["energy_kwh"] for r in rows), 1.0 + 2.0)


def test_reset_inside_one_bucket(store: SqliteStore) -> None:
    for minute, value in [(0, 5.0), (5, 6.0), (10, 0.5), (20, 1.5), (40, 2.5)]:
        put(store, "M-1", minute * 60_000, energy_kwh=value)
    rows = ask(store, start=0, end=60 * 60_000, interval="30m", agg={"energy_kwh": "delta"})
    assert math.isclose(sum(r["energy_kwh"] for r in rows), 1.0 + 2.5)
    assert math.isclose(rows[1]["energy_kwh"], 0.5)  # 20→40 min: 1.0 kWh, half of it after 30 min


def test_reset_in_the_only_bucket(store: SqliteStore) -> None:
    for minute, value in [(0, 5.0), (5, 6.0), (10, 0.5), (20, 1.5)]:
        put(store, "M-1", minute * 60_000, energy_kwh=value)
    rows = ask(store, start=0, end=30 * 60_000, interval="30m", agg={"energy_kwh": "delta"})
    assert math.isclose(rows[0]["energy_kwh"], 1.0 + 1.5)


@pytest.mark.parametrize(
    ("midnight", "last_second", "slots"),
    [
        ("2026-03-29T00:00:00+01:00", "2026-03-29T23:59:59+02:00", 46),  # Berlin springs forward
        ("2026-10-25T00:00:00+02:00", "2026-10-25T23:59:59+01:00", 50),  # and falls back
        ("2026-06-01T00:00:00+02:00", "2026-06-01T23:59:59+02:00", 48),
    ],
)
def test_daylight_saving_days_have_46_or_50_slots(
    store: SqliteStore, midnight: str, last_second: str, slots: int
) -> None:
    start = parse_time(midnight) - 3 * HOUR
    for step in range(0, 30 * HOUR, 5 * 60_000):
        put(store, "PV-1", start + step, power_kw=1.0)
    rows = ask(store, start=midnight, end=last_second, interval="30m", agg={"power_kw": "count"}, tz="Europe/Berlin")
    assert [r["slot"] for r in rows] == list(range(1, slots + 1))
    assert all(r["power_kw"] == 6 == r["n"] for r in rows[:-1])
    starts = [parse_time(r["bucket_start"]) for r in rows]
    assert all(b - a == 1_800_000 for a, b in itertools.pairwise(starts))


def test_one_day_buckets_follow_the_local_day(store: SqliteStore) -> None:
    for step in range(0, 72 * HOUR, HOUR):
        put(store, "PV-1", parse_time("2026-10-24T00:00:00+02:00") + step, power_kw=2.0)
    rows = ask(
        store,
        start="2026-10-24T00:00:00+02:00",
        end="2026-10-27T00:00:00+01:00",
        interval="1d",
        agg={"power_kw": "sum"},
        tz="Europe/Berlin",
    )
    assert [(r["bucket_start"], r["n"]) for r in rows] == [
        ("2026-10-23T22:00:00.000Z", 24),
        ("2026-10-24T22:00:00.000Z", 25),
        ("2026-10-25T23:00:00.000Z", 23),
    ]


def test_aggregations_match_a_plain_computation(store: SqliteStore) -> None:
    rng = random.Random(7)
    samples: dict[int, list[tuple[int, float]]] = {}
    for minute in rng.sample(range(0, 240), 150):
        value = round(rng.uniform(-5, 5), 3)
        put(store, "ESS-1", minute * 60_000, power_kw=value)
        samples.setdefault(minute // 60, []).append((minute, value))
    for how, expected in [
        ("mean", lambda v: mean(x for _, x in v)),
        ("min", lambda v: min(x for _, x in v)),
        ("max", lambda v: max(x for _, x in v)),
        ("sum", lambda v: sum(x for _, x in v)),
        ("count", len),
        ("first", lambda v: min(v)[1]),
        ("last", lambda v: max(v)[1]),
    ]:
        rows = ask(store, start=0, end=240 * 60_000, interval="1h", agg={"power_kw": how})
        assert len(rows) == 4
        for row in rows:
            hour = parse_time(row["bucket_start"]) // HOUR
            assert math.isclose(row["power_kw"], expected(samples[hour]), abs_tol=1e-9), (how, row)


def test_interval_energies_are_split_across_slot_edges(store: SqliteStore) -> None:
    # A meter reporting each slot's energy at the slot's end, and one 45-minute reading that straddles an edge.
    for slot in range(1, 5):
        put(store, "MTR-1", slot * 1_800_000, energy_interval_kwh=float(slot), interval_s=1800)
    put(store, "MTR-2", 3_600_000 + 900_000, energy_interval_kwh=3.0, interval_s=2700)
    rows = ask(store, start=0, end=7_200_000, interval="30m", agg={"energy_interval_kwh": "sum"})
    by = {(r["der_id"], r["slot"]): r["energy_interval_kwh"] for r in rows}
    assert [by[("MTR-1", s)] for s in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.0]  # the end-of-slot reading counts back
    assert math.isclose(by[("MTR-2", 2)], 2.0) and math.isclose(by[("MTR-2", 3)], 1.0)


def test_instant_takes_the_nearest_reading_per_der_within_tolerance(store: SqliteStore) -> None:
    at = parse_time("2026-11-27T03:00:00Z")
    for der_id, offset_s, volts in [
        ("A", -20, 201.0),
        ("A", 30, 202.0),
        ("B", 0, 203.0),
        ("C", 50, 204.0),
        ("C", -50, 205.0),
        ("D", 200, 206.0),
    ]:
        put(store, der_id, at + offset_s * 1000, voltage_v=volts)
    rows = ask(store, at="2026-11-27T12:00:00+09:00", at_tolerance_s=60, fields=["voltage_v"])
    assert [(r["der_id"], r["voltage_v"]) for r in rows] == [("A", 201.0), ("B", 203.0), ("C", 205.0)]
    exact = ask(store, at="2026-11-27T03:00:00Z")
    assert [r["der_id"] for r in exact] == ["B"]
    assert ask(store, at="2026-11-27T03:00:00Z", at_tolerance_s=60, where={"voltage_v": {"gt": 202}}) == [
        {"der_id": "B", "measured_at": "2026-11-27T03:00:00.000Z", "voltage_v": 203.0},
        {"der_id": "C", "measured_at": "2026-11-27T02:59:10.000Z", "voltage_v": 205.0},
    ]


def test_type_area_and_bbox_filters_use_the_registry(store: SqliteStore, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "hub.sqlite3")
    fleet = [
        ("PV-1", "pv", "feeder-1", 35.6, 139.7),
        ("PV-2", "pv", "feeder-2", 35.7, 139.9),
        ("ESS-1", "ess", "feeder-1", 35.65, 139.75),
        ("MTR-1", "meter", "feeder-2", 34.0, 135.0),
    ]
    for der_id, der_type, area, lat, lon in fleet:
        registry.add_der(der_id, 0, {"type": der_type, "area": area, "lat": lat, "lon": lon})
        put(store, der_id, 0, power_kw=1.0)
    ders = registry.ders()

    def who(**request: Any) -> list[str]:
        return [r["der_id"] for r in ask(store, ders, start=0, end=1, **request)]

    assert who(types=["pv"]) == ["PV-1", "PV-2"]
    assert who(areas=["feeder-1"]) == ["ESS-1", "PV-1"]
    assert who(bbox=[139.5, 35.5, 139.8, 35.9]) == ["ESS-1", "PV-1"]
    assert who(types=["pv"], areas=["feeder-2"]) == ["PV-2"]
    assert who(der_ids=["MTR-1", "PV-1"], types=["pv"]) == ["PV-1"]
    assert who(types=["ev"]) == []
    registry.close()


def test_where_conditions_combine_with_and(store: SqliteStore) -> None:
    for minute, power, volts in [(0, 0.5, 200.0), (1, 1.5, 199.0), (2, 2.5, 205.0), (3, 3.5, None)]:
        values = {"power_kw": power} | ({"voltage_v": volts} if volts else {})
        put(store, "PV-1", minute * 60_000, **values)
    rows = ask(store, start=0, end=HOUR, where={"power_kw": {"gte": 1.0, "lt": 3.0}, "voltage_v": {"ne": 205.0}})
    assert [r["power_kw"] for r in rows] == [1.5]
    buckets = ask(store, start=0, end=HOUR, interval="1h", agg={"power_kw": "sum"}, where={"power_kw": {"gt": 1}})
    assert buckets[0]["power_kw"] == 7.5 and buckets[0]["n"] == 3


def test_bucket_pages_lose_and_repeat_nothing(store: SqliteStore) -> None:
    for der in range(7):
        for minute in range(0, 180, 10):
            put(store, f"PV-{der}", minute * 60_000, power_kw=float(der))
    whole = ask(store, start=0, end=3 * HOUR, interval="30m", agg={"power_kw": "mean"})
    query = parse_query(
        {"start": 0, "end": 3 * HOUR, "interval": "30m", "agg": {"power_kw": "mean"}, "limit": 4}, CONFIG, {}
    )
    paged: list[dict[str, Any]] = []
    while True:
        answer = run(query, store)
        assert answer["count"] <= 4
        paged += answer["rows"]
        if answer["next_cursor"] is None:
            break
        query = replace(query, cursor=decode_cursor(answer["next_cursor"], "buckets"))
    assert paged == whole and len(whole) == 7 * 6
