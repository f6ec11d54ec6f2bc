"""One suite of extraction queries run against both backends holding the same readings: every page of every
answer must be the same, cursors included.

The readings are chosen to find disagreements: three DERs with readings at the same instants (the order
among DERs at one time), fields some readings lack (a condition on a missing field; ``ne``), readings from a
clock known to be off, the day London's clocks go forward (46 half-hour slots), readings sent again with an
older and a newer send time (the newer one with fewer fields replaces the whole earlier reading), and a DER
with hours of no readings and more fields (voltage, state of charge).

Bucket queries InfluxDB can aggregate itself run there (hubd.store.influx.pushdown); the last tests check
that they did, and that the rest fell back to the hub's own computation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from influx_server import InfluxServer, fresh_database, influxd, sqlite_and_influx  # noqa: F401 - the fixture
from test_influx_slots import only_open_slots_from_readings

from hubd.auth.registry import Registry
from hubd.config import Config, MarketConfig, QueryConfig
from hubd.market import plans, settle
from hubd.market.data import MarketData
from hubd.query.buckets import zone
from hubd.query.conditions import parse_query
from hubd.query.execute import run
from hubd.store import CLOCK_COLUMNS, ReadingQuery, Rows
from hubd.store.factory import open_query, open_sink
from hubd.store.influx.pushdown import ders_regex

DST_DAY = 1743292800000  # 2025-03-30T00:00:00Z: London goes from GMT to BST at 01:00 UTC
MINUTE = 60_000
DERS = ("BAT-1", "GAP-1", "PV-1", "PV-2")
CONFIG = QueryConfig(max_limit=1000, default_limit=1000, max_der_ids=10)


def dataset() -> list[Rows]:
    """Batches as the hub's writer hands them over: two days of readings, then re-sent ones."""
    plain: list[tuple[Any, ...]] = []
    partial: list[tuple[Any, ...]] = []
    flagged: list[tuple[Any, ...]] = []
    for i in range(0, 2 * 24 * 60, 7):  # every 7 minutes: buckets never hold the same number of readings
        t = DST_DAY - 3 * 60 * MINUTE + i * MINUTE
        for n, der_id in enumerate(("BAT-1", "PV-1", "PV-2")):
            power = round(((i * 13 + n * 29) % 50) / 10 - 1.0, 3)
            energy = 1000.0 * n + i * 0.125
            tail = (t + 500, "edge-1", "hub.v1", t + 400)
            if der_id == "PV-2" and i % 5 == 0:  # some readings carry only power
                partial.append((der_id, t, power, *tail))
            elif der_id == "BAT-1" and i % 11 == 0:  # a clock known to be off
                flagged.append((der_id, t, power, energy, "check", 42.5, *tail))
            else:
                plain.append((der_id, t, power, energy, *tail))
    gappy: list[tuple[Any, ...]] = []
    for i in range(0, 2 * 24 * 60, 3):  # GAP-1: every 3 minutes, but silent for hours at a time
        t = DST_DAY - 3 * 60 * MINUTE + i * MINUTE
        if 240 <= i < 480 or 1500 <= i < 1590:  # 01:00-05:00 UTC on the DST day, then 1.5 h the next
            continue
        values = (round((i % 17) * 0.3 - 2, 2), 500.0 + i * 0.02, 230.0 + (i % 9) * 0.7, float(20 + i % 60))
        gappy.append(("GAP-1", t, *values, t + 300, "edge-2", "hub.v1", None))
    first: Rows = [
        (("power_kw", "energy_kwh"), plain),
        (("power_kw", "energy_kwh", "voltage_v", "soc_pct"), gappy),
        (("power_kw",), partial),
        (("power_kw", "energy_kwh", *CLOCK_COLUMNS), flagged),
    ]
    t = DST_DAY + 72 * MINUTE  # PV-1's reading at 01:12 (i = 252): sent again
    older: Rows = [(("power_kw", "energy_kwh"), [("PV-1", t, 99.0, 9999.0, t + 900, "edge-1", "hub.v1", t + 100)])]
    newer: Rows = [(("power_kw",), [("PV-1", t, 7.5, t + 950, "edge-2", "hub.v1", t + 800)])]
    return [first, newer, older]  # the older one comes last: it must not replace the newer


QUERIES: list[dict[str, Any]] = [
    {"start": "2025-03-29T20:00:00Z", "end": "2025-03-30T04:00:00Z", "limit": 37},
    {
        "start": "2025-03-29T20:00:00Z",
        "end": "2025-03-31T00:00:00Z",
        "der_ids": ["PV-1", "BAT-1"],
        "fields": ["power_kw"],
        "where": {"power_kw": {"gt": 2.0}},
        "limit": 50,
    },
    {
        "start": "2025-03-29T20:00:00Z",
        "end": "2025-03-30T12:00:00Z",
        "fields": ["energy_kwh", "power_kw"],
        "where": {"energy_kwh": {"ne": 1080.0}, "power_kw": {"lte": 1.5}},
        "limit": 1000,
    },
    {"start": "2025-03-29T00:00:00Z", "end": "2025-04-01T00:00:00Z", "clock_flagged": True, "limit": 9},
    {
        "start": "2025-03-30T00:00:00Z",
        "end": "2025-03-30T06:00:00Z",
        "clock_flagged": False,
        "limit": 25,
        "der_ids": ["BAT-1"],
    },
    {"at": "2025-03-30T01:10:00Z", "at_tolerance_s": 300},
    {"at": "2025-03-30T13:00:00Z", "at_tolerance_s": 240, "fields": ["energy_kwh"], "limit": 2},
    {"at": "2025-03-30T13:00:00Z", "at_tolerance_s": 600, "where": {"power_kw": {"gte": 0}}},
    {
        "start": "2025-03-30T00:00:00Z",
        "end": "2025-03-31T00:00:00Z",
        "interval": "30m",
        "tz": "Europe/London",
        "agg": {"power_kw": ["mean", "min", "max", "count", "first", "last", "sum"], "energy_kwh": "delta"},
        "limit": 40,
    },
    {
        "start": "2025-03-29T00:00:00Z",
        "end": "2025-04-01T00:00:00Z",
        "interval": "1d",
        "tz": "Asia/Tokyo",
        "agg": {"energy_kwh": ["delta", "first", "last"], "power_kw": "mean"},
        "where": {"power_kw": {"gt": -0.5}},
    },
    {
        "start": "2025-03-29T22:00:00Z",
        "end": "2025-03-30T05:00:00Z",
        "interval": "1h",
        "clock_flagged": False,
        "agg": {"power_kw": "mean", "energy_kwh": "delta"},
        "der_ids": ["BAT-1", "PV-2"],
    },
    {
        "start": "2025-03-29T23:00:00Z",
        "end": "2025-03-30T02:00:00Z",
        "interval": "15m",
        "agg": {"power_kw": "max"},
        "limit": 5,
    },
    {"start": "2025-03-30T00:00:00Z", "end": "2025-03-30T02:00:00Z", "interval": "5m", "clock_flagged": True},
    {
        "start": "2025-03-29T21:17:00Z",
        "end": "2025-03-31T20:00:00Z",
        "interval": "30m",
        "tz": "Europe/London",
        "agg": {
            "energy_kwh": ["delta", "first", "last"],
            "power_kw": ["mean", "sum", "count"],
            "voltage_v": ["min", "max", "mean"],
            "soc_pct": ["first", "last"],
        },
        "limit": 120,
    },
    {
        "start": "2025-03-28T00:00:00Z",
        "end": "2025-04-01T00:00:00Z",
        "interval": "1d",
        "tz": "Europe/London",
        "agg": {"energy_kwh": "delta", "voltage_v": ["min", "max", "count"], "power_kw": ["first", "last"]},
        "where": {"power_kw": {"gte": -1.0}},
    },
    {
        "start": "2025-03-29T22:00:00Z",
        "end": "2025-03-30T22:00:00Z",
        "interval": "1h",
        "tz": "Asia/Kathmandu",
        "agg": {"power_kw": ["mean", "max"], "energy_kwh": "delta"},
        "der_ids": ["GAP-1", "PV-2"],
        "where": {"energy_kwh": {"lt": 1100.0}, "power_kw": {"gt": -1.5}},
    },
    {
        "start": "2025-03-29T21:00:00Z",
        "end": "2025-03-31T21:00:00Z",
        "interval": "30m",
        "tz": "Asia/Tokyo",
        "agg": {
            "power_kw": ["mean", "min", "max", "sum", "count"],
            "energy_kwh": "delta",
            "voltage_v": ["mean", "count"],
            "soc_pct": ["min", "max"],
        },
        "limit": 100,
    },
    {
        "start": "2025-03-30T00:00:00Z",
        "end": "2025-03-31T00:00:00Z",
        "interval": "30m",
        "tz": "Asia/Kolkata",
        "agg": {"energy_kwh": "delta", "power_kw": "mean"},
        "der_ids": ["PV-1", "GAP-1"],
    },
]
PUSHED = [8, 11, 13, 14, 15]  # the bucket queries InfluxDB aggregates itself (the others fall back)
SUMMARIZED = [16, 17]  # whole 30-minute slots, no condition, no first/last: the slot summaries answer


async def fill(config: Config, batches: list[Rows]) -> None:
    sink = open_sink(config)
    await sink.start()
    try:
        for batch in batches:
            await sink.write_rows(batch, stored_at=0)
    finally:
        await sink.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, influxd: InfluxServer) -> Iterator[dict[str, Any]]:  # noqa: F811
    """Both backends with the same readings, and the registry that knows the DERs."""
    tmp_path = tmp_path_factory.mktemp("parity")
    registry = Registry(tmp_path / "hub.sqlite3")
    for der_id in DERS:
        registry.add_der(der_id, 0, {"type": "pv"})
    ders = registry.ders()
    registry.close()
    opened: dict[str, ReadingQuery] = {}
    for name, config in sqlite_and_influx(tmp_path, influxd).items():
        asyncio.run(fill(config, dataset()))
        opened[name] = open_query(config)
    yield {"ders": ders, **opened}
    for query in opened.values():
        query.close()


def pages(request: dict[str, Any], ders: Any, store: ReadingQuery) -> list[dict[str, Any]]:
    """Every page of the answer, following the cursor."""
    out = []
    cursor = None
    while True:
        answer = run(parse_query({**request, **({"cursor": cursor} if cursor else {})}, CONFIG, ders), store)
        out.append(answer)
        cursor = answer["next_cursor"]
        if cursor is None or len(out) > 500:
            return out


@pytest.mark.parametrize("request_", QUERIES, ids=[f"q{i}" for i in range(len(QUERIES))])
def test_both_backends_give_the_same_pages(stores: dict[str, Any], request_: dict[str, Any]) -> None:
    on_sqlite = pages(request_, stores["ders"], stores["sqlite"])
    on_influx = pages(request_, stores["ders"], stores["influxdb"])
    assert sum(page["count"] for page in on_sqlite) > 0  # a query that finds nothing would prove nothing
    assert on_influx == on_sqlite


def test_the_stores_agree_on_counts_and_on_the_replace_rule(stores: dict[str, Any]) -> None:
    """The re-sent reading: the older version did not replace, the newer replaced it whole (no energy left)."""
    for name in ("sqlite", "influxdb"):
        store = stores[name]
        t = DST_DAY + 72 * MINUTE
        assert store.raw(t, t + 1, ("PV-1",), ("power_kw", "energy_kwh"), (), None, 10) == [
            ("PV-1", t, 7.5, None, None, None)
        ], name
    gappy = len([i for i in range(0, 2 * 24 * 60, 3) if not (240 <= i < 480 or 1500 <= i < 1590)])
    assert stores["influxdb"].count() == stores["sqlite"].count() == 3 * len(range(0, 2 * 24 * 60, 7)) + gappy


def test_a_dst_day_has_46_settlement_slots_on_both(stores: dict[str, Any]) -> None:
    request = {
        "start": "2025-03-30T00:00:00Z",
        "end": "2025-03-30T23:00:00Z",
        "interval": "30m",
        "tz": "Europe/London",
        "der_ids": ["PV-1"],
        "agg": {"energy_kwh": "delta"},
    }
    for name in ("sqlite", "influxdb"):
        rows = pages(request, stores["ders"], stores[name])[0]["rows"]
        assert [row["slot"] for row in rows] == list(range(1, 47)), name


def test_the_same_pages_when_influxdb_answers_in_small_chunks(
    stores: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """InfluxDB is asked a chunk of points at a time; chunks of 5 cut through instants (three DERs read at
    the same time) everywhere, and the answers must not change."""
    monkeypatch.setattr("hubd.store.influx.query._CHUNK", 5)
    for request in QUERIES:
        assert pages(request, stores["ders"], stores["influxdb"]) == pages(request, stores["ders"], stores["sqlite"])


def test_bucket_queries_influxql_can_answer_are_answered_by_influxdb(
    stores: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the hub's own computation (loading points into memory) taken away, the pushed-down queries still
    give SQLite's pages; the others (a clock_flagged filter, a mean over a bucket across a shard boundary)
    need it."""

    def no_points(*_: Any) -> None:
        raise AssertionError("bucket statistics computed from the points")

    monkeypatch.setattr("hubd.store.influx.query.InfluxQuery._load", no_points)
    for index in PUSHED:
        request = QUERIES[index]
        assert pages(request, stores["ders"], stores["influxdb"]) == pages(request, stores["ders"], stores["sqlite"])
    for index in (9, 10, 12):  # Tokyo's days cross Monday 00:00 UTC, the week's shard boundary; flagged
        with pytest.raises(AssertionError, match="from the points"):
            pages(QUERIES[index], stores["ders"], stores["influxdb"])


def test_whole_slot_queries_are_answered_from_the_slot_summaries(
    stores: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the readings' aggregation (but for each DER's open slot) and the hub's own computation taken away,
    the slot-shaped queries (the settlement's) still give SQLite's pages: the summaries written with the
    readings answered them, the replaced reading and the clock flags included."""

    only_open_slots_from_readings(monkeypatch)
    for index in SUMMARIZED:
        request = QUERIES[index]
        assert pages(request, stores["ders"], stores["influxdb"]) == pages(request, stores["ders"], stores["sqlite"])
    with pytest.raises(AssertionError, match="from the readings"):  # first/last: not in the summaries
        pages(QUERIES[8], stores["ders"], stores["influxdb"])


def test_a_group_of_ders_named_in_one_regular_expression_matches_exactly_them(influxd: InfluxServer) -> None:  # noqa: F811
    """Every character the registry allows in a DER id besides letters and digits is taken literally."""
    database = fresh_database(influxd)
    ids = ("A.1", "A:1", "A-1", "Ax1", "A11", "A.10")
    influxd.write(database, "\n".join(f"readings,der_id={d} received_at=1i {i + 1}000000" for i, d in enumerate(ids)))
    condition = ders_regex(("A.1", "A:1", "A-1"))
    assert condition is not None and ders_regex(("A 1",)) is None  # not an id the registry takes: the OR instead
    found = influxd.query(f'SELECT count("received_at") FROM "readings" WHERE {condition} GROUP BY "der_id"', database)
    assert sorted(s["tags"]["der_id"] for s in found) == ["A-1", "A.1", "A:1"]


def test_the_settlement_view_is_the_same_on_both(stores: dict[str, Any], tmp_path: Path) -> None:
    """Actual energy, completeness (some of PV-2's readings lack the register) and the clock-flagged energy
    (BAT-1) per slot of London's short day, for each DER and a group of them all, with a plan."""
    market = MarketData(tmp_path / "hub.sqlite3")
    try:
        market.add_group("ALL", DERS, DERS, 0)
        slots = plans.entries(
            [{"group": "ALL", "date": "2025-03-30", "slot": k, "kwh": 0.2} for k in range(1, 47)],
            zone("Europe/London"),
            DERS,
            market.groups(),
        )
        market.store_plans(slots, "test", 0)
        request = {"start": "2025-03-30T00:00:00Z", "end": "2025-03-30T23:00:00Z", "tz": "Europe/London"}
        request |= {"der_ids": list(DERS), "groups": ["ALL"], "limit": 50, "max_gap_s": 600}
        answers = {}
        for name in ("sqlite", "influxdb"):
            parsed = settle.parse(request, CONFIG, MarketConfig(), stores["ders"], market.groups())
            rows = []
            while True:
                answer = settle.settle(parsed, stores[name], market, stores["ders"], MarketConfig())
                rows += answer["rows"]
                if answer["next_cursor"] is None:
                    break
                parsed = replace(parsed, cursor=settle.parse_cursor(answer["next_cursor"]))
            answers[name] = rows
    finally:
        market.close()
    assert len(answers["sqlite"]) == (len(DERS) + 1) * 46  # each DER and the group
    assert any(r["clock_flagged_kwh"] > 0 for r in answers["sqlite"])
    assert any(0 < r["completeness"] < 1 for r in answers["sqlite"])  # PV-2: register readings 14 min apart
    assert answers["influxdb"] == answers["sqlite"]
