"""Market data and the settlement view, against numbers worked out independently in each test.

Readings go into a real SQLite store, plans, groups and prices into a real state file; the settlement view is
asked for exactly as ``hub/v1/query`` asks (``hubd.market.settle``). The expected figures are computed here
from the readings' own rule (a register rising at a steady rate, prices from the sample's formula), never
from the hub's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from hubd.audit import AuditLog
from hubd.audit import tail as audit_tail
from hubd.auth.registry import Registry
from hubd.config import MarketConfig, QueryConfig, WeatherFetchConfig
from hubd.market import jepx, plans, settle, weather
from hubd.market.data import MarketData
from hubd.market.fetch import WeatherFetch
from hubd.model import ErrorCode, HubError, parse_time
from hubd.query.buckets import zone
from hubd.store import CLOCK_COLUMNS, StoredReading
from hubd.store.sqlite import SqliteStore

DATA = Path(__file__).parent / "data"
DAY = parse_time("2026-11-27T00:00:00+09:00")  # the sample's first day, Japan time
NEXT_DAY = DAY + 86_400_000
MINUTE, HOUR = 60_000, 3_600_000
QUERY = QueryConfig(max_limit=10_000, default_limit=10_000, max_der_ids=100)
MARKET = MarketConfig(price_areas={"feeder-k": "kansai"}, register_max_gap_s=900)


def tokyo_price(slot: int) -> float:
    return round(10 + 0.25 * slot, 2)  # the sample file's rule for 2026-11-27


def kansai_price(slot: int) -> float:
    return round(8 + 0.2 * slot, 2)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


class World:
    """A registry, a readings store and the market tables, with the sample's prices imported."""

    def __init__(self, base: Path) -> None:
        self.state = base / "hub.sqlite3"
        self.registry = Registry(self.state)
        self.store = SqliteStore(base / "readings.sqlite3", synchronous="normal")
        self.market = MarketData(self.state)
        for der_id, area in (("PV-T", "tokyo"), ("PV-K", "feeder-k"), ("PV-GAP", "Tokyo"), ("M-I", "tokyo")):
            self.registry.add_der(der_id, 0, {"type": "pv", "area": area})
        self.registry.add_der("PV-NOWHERE", 0, {"type": "pv", "area": "feeder-unmapped"})
        self.market.replace_series("jepx", jepx.parse((DATA / "jepx_spot_sample.csv").read_bytes()), "test", 0)

    def close(self) -> None:
        self.market.close()
        self.store.close()
        self.registry.close()

    def register(self, der_id: str, kwh_per_hour: float, start: int, end: int, every: int = 5 * MINUTE) -> None:
        readings = [
            StoredReading(der_id, t, {"energy_kwh": 100.0 + kwh_per_hour * (t - DAY) / HOUR}, 0, "t", "hub.v1")
            for t in range(start, end, every)
        ]
        self.store.write(readings, stored_at=0)

    def plan(self, items: list[dict[str, Any]], tz: str = "Asia/Tokyo") -> list[float | None]:
        entries = plans.entries(items, zone(tz), self.registry.ders(), self.market.groups())
        return self.market.store_plans(entries, "market-1", 0)

    def settle(self, **request: Any) -> list[dict[str, Any]]:
        ders = self.registry.ders()
        parsed = settle.parse(request, QUERY, MARKET, ders, self.market.groups())
        rows: list[dict[str, Any]] = []
        while True:
            answer = settle.settle(parsed, self.store, self.market, ders, MARKET)
            rows += answer["rows"]
            if answer["next_cursor"] is None:
                return rows
            parsed = settle.Settlement(**{**parsed.__dict__, "cursor": settle.parse_cursor(answer["next_cursor"])})


def day_request(**extra: Any) -> dict[str, Any]:
    return {"start": "2026-11-27T00:00:00+09:00", "end": "2026-11-28T00:00:00+09:00", **extra}


# -- JEPX -------------------------------------------------------------------------------------------------


def test_jepx_spot_csv_in_shift_jis_gives_every_area_price_and_the_volumes() -> None:
    raw = (DATA / "jepx_spot_sample.csv").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # the sample really is Shift_JIS
    points = jepx.parse(raw)
    prices = {(p.place, p.start): p.value for p in points if p.quantity == jepx.PRICE}
    assert {place for place, _ in prices} == {"system", *jepx.AREAS}
    assert len(prices) == 2 * 48 * 10
    assert prices[("tokyo", DAY)] == 10.25  # slot 1 of 2026-11-27 begins at midnight Japan time
    assert prices[("kansai", DAY + 47 * 30 * MINUTE)] == kansai_price(48)
    assert prices[("tokyo", NEXT_DAY)] == 11.25  # the second day's slot 1
    volumes = {(p.quantity, p.start): p.value for p in points if p.place == "system" and p.quantity != jepx.PRICE}
    assert volumes[("sell_bid_kwh", DAY)] == 12_010_000
    assert volumes[("contract_kwh", DAY)] == 11_509_000 - 300_000  # the buy volume less 300,000
    # The same file in UTF-8 (with a byte-order mark) reads the same.
    assert jepx.parse(b"\xef\xbb\xbf" + raw.decode("cp932").encode()) == points


def test_reimporting_prices_replaces_them(world: World) -> None:
    before = world.market.series_summary()
    text = (DATA / "jepx_spot_sample.csv").read_bytes().decode("cp932")
    lines = text.split("\r\n")
    cells = lines[1].split(",")
    cells[8] = "99.99"  # Tokyo's price of slot 1 corrected
    lines[1] = ",".join(cells)
    world.market.replace_series("jepx", jepx.parse("\r\n".join(lines).encode("cp932")), "again", 1)
    assert world.market.series_summary() == before  # as many values as before: replaced, not added
    assert world.market.series("jepx", "tokyo", jepx.PRICE, DAY, DAY + 1) == [(DAY, DAY + 30 * MINUTE, 99.99)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"time,temperature_c\n2026-11-27T00:00:00+09:00,3.5\n", "年月日 and 時刻コード"),
        (
            "年月日,時刻コード,エリアプライス沖縄(円/kWh)\n2026/11/27,1,10\n".encode("cp932"),
            "unknown price area '沖縄'",
        ),
        ("年月日,時刻コード,システムプライス(円/kWh)\n2026/11/27,49,10\n".encode("cp932"), "line 2: slot code 49"),
        ("年月日,時刻コード,システムプライス(円/kWh)\n2026/11/27,1,abc\n".encode("cp932"), "line 2, column 3"),
        ("年月日,時刻コード,システムプライス(円/kWh)\n27.11.2026,1,10\n".encode("cp932"), "is not a date"),
        (b"\x81\x7f,\x85\x40", "neither UTF-8 nor Shift_JIS"),
    ],
)
def test_a_bad_jepx_file_is_refused_whole_naming_the_problem(world: World, content: bytes, message: str) -> None:
    before = world.market.series_summary()
    with pytest.raises(HubError) as refused:
        jepx.parse(content)
    assert refused.value.code == ErrorCode.BAD_REQUEST
    assert message in refused.value.message
    assert world.market.series_summary() == before


# -- settlement of one DER ------------------------------------------------------------------------------


def test_one_der_settled_against_a_plan_revised_during_the_day(world: World) -> None:
    world.register("PV-T", 1.0, DAY - HOUR, NEXT_DAY + HOUR)  # 0.5 kWh in every slot
    world.plan([{"der_id": "PV-T", "date": "2026-11-27", "slot": k, "kwh": 0.4} for k in range(1, 49)])
    # At noon the market system revises the afternoon: 0.7 kWh for slots 25-48.
    replaced = world.plan([{"der_id": "PV-T", "date": "2026-11-27", "slot": k, "kwh": 0.7} for k in range(25, 49)])
    assert replaced == [0.4] * 24
    rows = world.settle(**day_request(der_ids=["PV-T"]))
    assert [r["slot"] for r in rows] == list(range(1, 49))
    for row in rows:
        k = row["slot"]
        plan = 0.4 if k < 25 else 0.7
        assert row["actual_kwh"] == pytest.approx(0.5, abs=1e-6)
        assert row["plan_kwh"] == plan
        assert row["imbalance_kwh"] == pytest.approx(0.5 - plan, abs=1e-6)
        assert row["price_area"] == "tokyo"
        assert row["price_yen_kwh"] == tokyo_price(k)
        assert row["imbalance_yen"] == pytest.approx((0.5 - plan) * tokyo_price(k), abs=0.005)
        assert row["completeness"] == 1.0
        assert row["clock_flagged_kwh"] == 0.0
    assert math.fsum(r["imbalance_yen"] for r in rows) == pytest.approx(
        math.fsum((0.5 - (0.4 if k < 25 else 0.7)) * tokyo_price(k) for k in range(1, 49)), abs=0.01
    )


def test_a_40_minute_gap_lowers_completeness_where_it_is_and_energy_is_still_interpolated(world: World) -> None:
    gap_from, gap_to = DAY + 10 * HOUR + 5 * MINUTE, DAY + 10 * HOUR + 45 * MINUTE  # 10:05 … 10:45, no readings
    world.register("PV-GAP", 1.0, DAY - HOUR, gap_from + 1)
    world.register("PV-GAP", 1.0, gap_to, NEXT_DAY + HOUR)
    rows = {r["slot"]: r for r in world.settle(**day_request(der_ids=["PV-GAP"]))}
    assert rows[21]["completeness"] == pytest.approx(5 / 30, abs=1e-4)  # 10:00-10:30: covered 10:00-10:05
    assert rows[22]["completeness"] == pytest.approx(15 / 30, abs=1e-4)  # 10:30-11:00: covered 10:45-11:00
    assert all(r["completeness"] == 1.0 for k, r in rows.items() if k not in (21, 22))
    assert rows[21]["actual_kwh"] == pytest.approx(0.5, abs=1e-6)  # the register rose steadily across the gap
    assert rows[21]["price_area"] == "tokyo"  # the area "Tokyo", in any case, is JEPX's
    # A gap of up to an hour still counts as complete when the operator (or the asker) says so.
    wide = {r["slot"]: r for r in world.settle(**day_request(der_ids=["PV-GAP"], max_gap_s=3600))}
    assert wide[21]["completeness"] == wide[22]["completeness"] == 1.0


def test_interval_energies_count_the_share_of_each_slot_they_cover(world: World) -> None:
    readings = [
        StoredReading("M-I", t, {"energy_interval_kwh": 0.25, "interval_s": 900}, 0, "t", "hub.v1")
        for t in range(DAY + 15 * MINUTE, NEXT_DAY + 1, 15 * MINUTE)
        if t != DAY + 3 * HOUR + 15 * MINUTE  # the interval 03:00-03:15 never came
    ]
    world.store.write(readings, stored_at=0)
    rows = {r["slot"]: r for r in world.settle(**day_request(der_ids=["M-I"]))}
    assert rows[7]["completeness"] == 0.5 and rows[7]["actual_kwh"] == pytest.approx(0.25)
    assert rows[8]["completeness"] == 1.0 and rows[8]["actual_kwh"] == pytest.approx(0.5)


def test_energy_from_clock_flagged_readings_is_shown_apart(world: World) -> None:
    names = ("energy_kwh", *CLOCK_COLUMNS)
    flagged = [
        ("PV-T", t, 100.0 + (t - DAY) / HOUR, "check", 42.0, 0, "t", "hub.v1", None)
        for t in range(DAY + 2 * HOUR + 5 * MINUTE, DAY + 2 * HOUR + 31 * MINUTE, 5 * MINUTE)  # 02:05 … 02:30
    ]
    world.register("PV-T", 1.0, DAY - HOUR, DAY + 2 * HOUR + 1)
    world.register("PV-T", 1.0, DAY + 2 * HOUR + 35 * MINUTE, NEXT_DAY + HOUR)
    world.store.write_rows([(names, flagged)], stored_at=0)
    rows = {r["slot"]: r for r in world.settle(**day_request(der_ids=["PV-T"]))}
    # Slot 5 (02:00-02:30): every reading after 02:00 is flagged, so all its energy is flagged.
    assert rows[5]["clock_flagged_kwh"] == pytest.approx(0.5, abs=1e-4)
    # Slot 6 (02:30-03:00): the flagged reading at 02:30 measured nothing of it; 02:35 measured 02:30-02:35.
    assert rows[6]["clock_flagged_kwh"] == pytest.approx(0.0, abs=1e-4)
    assert rows[4]["clock_flagged_kwh"] == 0.0


def test_a_der_without_a_price_area_gets_no_price_and_no_value(world: World) -> None:
    world.register("PV-NOWHERE", 1.0, DAY - HOUR, NEXT_DAY + HOUR)
    world.plan([{"der_id": "PV-NOWHERE", "date": "2026-11-27", "slot": 1, "kwh": 0.3}])
    row = world.settle(**day_request(der_ids=["PV-NOWHERE"]))[0]
    assert row["imbalance_kwh"] == pytest.approx(0.2)
    assert row["price_area"] is None and row["price_yen_kwh"] is None and row["imbalance_yen"] is None


# -- groups ---------------------------------------------------------------------------------------------


def test_a_group_across_two_price_areas(world: World) -> None:
    world.market.add_group("VPP-1", ["PV-T", "PV-K"], world.registry.ders(), 0)
    world.register("PV-T", 1.0, DAY - HOUR, NEXT_DAY + HOUR)  # 0.5 kWh per slot, Tokyo
    world.register("PV-K", 2.0, DAY - HOUR, NEXT_DAY + HOUR)  # 1.0 kWh per slot, Kansai (feeder-k)
    world.plan([{"group": "VPP-1", "date": "2026-11-27", "slot": k, "kwh": 1.2} for k in range(1, 49)])
    rows = world.settle(**day_request(groups=["VPP-1"], der_ids=["PV-K"]))
    assert [r.get("der_id") for r in rows[:48]] == ["PV-K"] * 48
    assert rows[0]["price_area"] == "kansai" and rows[0]["plan_kwh"] is None
    group = [r for r in rows if r.get("group") == "VPP-1"]
    assert len(group) == 48
    for row in group:
        k = row["slot"]
        price = (0.5 * tokyo_price(k) + 1.0 * kansai_price(k)) / 1.5
        assert row["members"] == 2
        assert row["actual_kwh"] == pytest.approx(1.5, abs=1e-6)
        assert row["imbalance_kwh"] == pytest.approx(0.3, abs=1e-6)
        assert row["price_area"] == "kansai,tokyo"
        assert row["price_yen_kwh"] == pytest.approx(price, abs=1e-5)
        assert row["imbalance_yen"] == pytest.approx(0.3 * price, abs=0.005)
        assert row["completeness"] == 1.0


def test_a_group_on_a_daylight_saving_day_in_berlin(world: World) -> None:
    world.market.add_group("DE-1", ["PV-T"], world.registry.ders(), 0)
    for day, slots in (("2026-03-29", 46), ("2026-10-25", 50)):
        start = parse_time(f"{day}T00:00:00+01:00" if slots == 46 else f"{day}T00:00:00+02:00")
        end = start + slots * 30 * MINUTE
        world.register("PV-T", 1.0, start - HOUR, end + HOUR)
        world.plan([{"group": "DE-1", "date": day, "slot": slots, "kwh": 0.5}], tz="Europe/Berlin")
        with pytest.raises(HubError, match=f"slot must be 1 … {slots}"):
            world.plan([{"group": "DE-1", "date": day, "slot": slots + 1, "kwh": 0.5}], tz="Europe/Berlin")
        rows = world.settle(start=start, end=end, tz="Europe/Berlin", groups=["DE-1"])
        assert [r["slot"] for r in rows] == list(range(1, slots + 1))
        assert math.fsum(r["actual_kwh"] for r in rows) == pytest.approx(slots / 2, abs=1e-6)
        assert rows[-1]["plan_kwh"] == 0.5 and rows[-1]["imbalance_kwh"] == pytest.approx(0.0, abs=1e-9)
        assert rows[0]["price_yen_kwh"] is None  # no JEPX prices for those days


def test_paging_resumes_exactly(world: World) -> None:
    world.market.add_group("VPP-1", ["PV-T", "PV-K"], world.registry.ders(), 0)
    world.register("PV-T", 1.0, DAY - HOUR, NEXT_DAY + HOUR)
    ders, groups = world.registry.ders(), world.market.groups()
    whole = world.settle(**day_request(der_ids=["PV-T", "PV-K"], groups=["VPP-1"]))
    parsed = settle.parse(day_request(der_ids=["PV-T", "PV-K"], groups=["VPP-1"], limit=7), QUERY, MARKET, ders, groups)
    paged: list[dict[str, Any]] = []
    while True:
        answer = settle.settle(parsed, world.store, world.market, ders, MARKET)
        paged += answer["rows"]
        if answer["next_cursor"] is None:
            break
        assert answer["count"] == 7
        parsed = settle.Settlement(**{**parsed.__dict__, "cursor": settle.parse_cursor(answer["next_cursor"])})
    assert paged == whole and len(whole) == 3 * 48


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        ({"der_ids": ["NOPE"]}, ErrorCode.UNKNOWN_DER, "names no DER"),
        ({"groups": ["NOPE"]}, ErrorCode.BAD_REQUEST, "no such group"),
        ({}, ErrorCode.BAD_REQUEST, "needs der_ids or groups"),
        ({"der_ids": ["PV-T"], "interval": "1h"}, ErrorCode.BAD_REQUEST, "interval does not go with"),
        ({"der_ids": ["PV-T"], "start": "2026-11-27T00:10:00+09:00"}, ErrorCode.BAD_REQUEST, "slot edges"),
        ({"der_ids": ["PV-T"], "max_gap_s": 0}, ErrorCode.BAD_REQUEST, "max_gap_s"),
        ({"der_ids": ["PV-T"], "weather": "yes"}, ErrorCode.BAD_REQUEST, "weather"),
        ({"der_ids": ["PV-T"], "cursor": "abc"}, ErrorCode.BAD_REQUEST, "cursor"),
    ],
)
def test_bad_settlement_requests(world: World, request_: dict[str, Any], code: ErrorCode, message: str) -> None:
    with pytest.raises(HubError) as refused:
        world.settle(**{**day_request(), **request_})
    assert refused.value.code == code and message in refused.value.message


# -- plans ----------------------------------------------------------------------------------------------


def test_a_plan_with_one_bad_entry_stores_nothing(world: World) -> None:
    world.plan([{"der_id": "PV-T", "date": "2026-11-27", "slot": 1, "kwh": 0.4}])
    for items, code in (
        (
            [
                {"der_id": "PV-T", "date": "2026-11-27", "slot": 1, "kwh": 9},
                {"der_id": "NOPE", "date": "2026-11-27", "slot": 2, "kwh": 1},
            ],
            ErrorCode.UNKNOWN_DER,
        ),
        (
            [
                {"der_id": "PV-T", "date": "2026-11-27", "slot": 1, "kwh": 9},
                {"der_id": "PV-T", "date": "27.11.", "slot": 2, "kwh": 1},
            ],
            ErrorCode.BAD_REQUEST,
        ),
        ([{"der_id": "PV-T", "group": "G", "date": "2026-11-27", "slot": 1, "kwh": 1}], ErrorCode.BAD_REQUEST),
        ([{"der_id": "PV-T", "date": "2026-11-27", "slot": 1, "kwh": "1"}], ErrorCode.BAD_REQUEST),
        ([], ErrorCode.BAD_REQUEST),
    ):
        with pytest.raises(HubError) as refused:
            world.plan(items)
        assert refused.value.code == code
    assert world.market.plans("der:PV-T", DAY, NEXT_DAY) == {DAY: 0.4}


# -- weather --------------------------------------------------------------------------------------------


OPEN_METEO = {
    "latitude": 35.7,
    "longitude": 139.7,
    "utc_offset_seconds": 32400,
    "timezone": "Asia/Tokyo",
    "hourly_units": {"time": "iso8601", "temperature_2m": "°C", "shortwave_radiation": "W/m²", "cloud_cover": "%"},
    "hourly": {
        "time": [f"2026-11-27T{h:02d}:00" for h in range(24)],
        "temperature_2m": [5.0 + h / 2 for h in range(24)],
        "shortwave_radiation": [max(0.0, 100.0 * (6 - abs(h - 12))) for h in range(24)],
        "cloud_cover": [10 * (h % 10) for h in range(24)],
    },
}


@pytest.fixture
def weather_server() -> Iterator[tuple[str, list[int]]]:
    """An Open-Meteo-shaped API on a free loopback port, served from a thread of its own; ``status[0]`` is
    the status it answers with."""
    status = [200]
    loop = asyncio.new_event_loop()

    async def forecast(request: web.Request) -> web.Response:
        if status[0] != 200:
            return web.Response(status=status[0], text="busy")
        assert request.query["latitude"] == "35.7"
        return web.json_response(OPEN_METEO)

    app = web.Application()
    app.router.add_get("/v1/forecast", forecast)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="weather-api")
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/v1/forecast?latitude=35.7&longitude=139.7&hourly=temperature_2m", status
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_weather_fetched_from_an_open_meteo_shaped_api_lines_up_with_the_slots(
    world: World, tmp_path: Path, weather_server: tuple[str, list[int]]
) -> None:
    url, _ = weather_server
    with AuditLog(tmp_path / "audit.jsonl") as audit:
        fetch = WeatherFetch(WeatherFetchConfig(place="tokyo", url=url), world.market, audit)
        assert asyncio.run(fetch.once()) == 3 * 24
        assert asyncio.run(fetch.once()) == 3 * 24  # fetched again: replaced, not added
    assert [row[3] for row in world.market.series_summary() if row[0] == "weather"] == [24, 24, 24]
    world.register("PV-T", 1.0, DAY - HOUR, NEXT_DAY + HOUR)
    rows = {r["slot"]: r for r in world.settle(**day_request(der_ids=["PV-T"], weather=True))}
    for k in (25, 26):  # 12:00-13:00 Japan time: the 12:00 hour's values
        assert (rows[k]["temperature_c"], rows[k]["irradiance_w_m2"], rows[k]["cloud_cover_pct"]) == (11.0, 600.0, 20.0)
    assert rows[1]["temperature_c"] == 5.0 and rows[48]["temperature_c"] == 16.5
    assert "temperature_c" not in world.settle(**day_request(der_ids=["PV-T"]))[0]


def test_a_failing_weather_api_is_audited_once_and_its_recovery_once(
    world: World, tmp_path: Path, weather_server: tuple[str, list[int]]
) -> None:
    url, status = weather_server
    status[0] = 503
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        fetch = WeatherFetch(WeatherFetchConfig(place="tokyo", url=url, every_s=0.05), world.market, audit)

        async def run_for(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fetch.run(), seconds)

        asyncio.run(run_for(0.5))
        status[0] = 200
        asyncio.run(run_for(0.3))
    events = [r["event"] for r in audit_tail(path, 1000) if str(r["event"]).startswith("series.")]
    assert events[0] == "series.fetch_failed" and events.count("series.fetch_failed") == 1
    assert events[1:] and set(events[1:]) == {"series.fetched"}
    assert all("url" not in r and "127.0.0.1" not in str(r) for r in audit_tail(path, 1000))


def test_weather_from_a_csv_and_bad_weather_files(world: World) -> None:
    points = weather.parse(b"time,temperature_c,cloud_cover_pct\n2026-11-27T12:00:00+09:00,11.5,\n", "tokyo")
    assert [(p.quantity, p.start, p.value) for p in points] == [("temperature_c", DAY + 12 * HOUR, 11.5)]
    for content, message in (
        (b'{"hourly": {}}', "no hourly.time"),
        (b'{"hourly": {"time": ["2026-11-27T00:00"], "temperature_2m": [1, 2]}}', "as long as hourly.time"),
        (b"time,temperature_c\n2026-11-27T12:00:00,11.5\n", "line 2: time"),
        (b"when,temp\n", "needs a header"),
    ):
        with pytest.raises(HubError, match=message):
            weather.parse(content, "tokyo")
