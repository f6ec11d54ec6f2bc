"""Clock flags in the store and the answers: stored with a reading, replaced by a good re-send, filtered on,
counted in buckets, and the share of a settlement slot's energy that flagged readings measured; an older
database without the columns gets them; the offset arithmetic of a check; the passive estimate's window."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hubd.cli import main
from hubd.clock.edges import _sample
from hubd.clock.skew import PassiveSkew
from hubd.clock.state import Clocks
from hubd.config import ConfigError, QueryConfig, TimeConfig, ntp_address, parse_config
from hubd.model import Reading, parse_time
from hubd.query.conditions import decode_cursor, parse_query
from hubd.query.execute import run
from hubd.store import Rows, add_flagged_rows, add_rows
from hubd.store.sqlite import SqliteStore

CONFIG = QueryConfig(max_limit=100_000, default_limit=100_000, max_der_ids=100)
SLOT = 1_800_000
DAY = parse_time("2026-11-27T00:00:00Z")


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "readings.sqlite3", synchronous="normal")


def put(store: SqliteStore, at: int, flag: tuple[str, float] | None = None, received: int = 0, **values: float) -> None:
    rows: Rows = []
    readings = [Reading("M-1", at, values)]
    if flag is None:
        add_rows(rows, readings, (received, "edge", "hub.v1", None))
    else:
        add_flagged_rows(rows, readings, (received, "edge", "hub.v1", None), flag)
    store.write_rows(rows, stored_at=0)


def ask(store: SqliteStore, **request: Any) -> list[dict[str, Any]]:
    query = parse_query({"start": "2026-11-27T00:00:00Z", "end": "2026-11-27T02:00:00Z", **request}, CONFIG, {})
    rows: list[dict[str, Any]] = []
    while True:
        answer = run(query, store)
        rows += answer["rows"]
        if answer["next_cursor"] is None:
            return rows
        query = replace(query, cursor=decode_cursor(answer["next_cursor"], query.mode))


def test_raw_rows_carry_the_flag_and_a_good_resend_clears_it(store: SqliteStore) -> None:
    put(store, DAY, ("passive", 90.2), power_kw=1.0)
    put(store, DAY + 60_000, power_kw=2.0)
    rows = ask(store)
    assert rows[0] == {
        "der_id": "M-1",
        "measured_at": "2026-11-27T00:00:00.000Z",
        "power_kw": 1.0,
        "clock_flag": "passive",
        "clock_offset_s": 90.2,
    }
    assert rows[1] == {"der_id": "M-1", "measured_at": "2026-11-27T00:01:00.000Z", "power_kw": 2.0}
    assert [r["power_kw"] for r in ask(store, clock_flagged=True)] == [1.0]
    assert [r["power_kw"] for r in ask(store, clock_flagged=False)] == [2.0]
    put(store, DAY, received=1, power_kw=1.5)  # sent again from a corrected clock: replaces it whole
    assert ask(store, clock_flagged=True) == []
    assert ask(store)[0] == {"der_id": "M-1", "measured_at": "2026-11-27T00:00:00.000Z", "power_kw": 1.5}


def test_clock_flagged_must_be_a_boolean(store: SqliteStore) -> None:
    with pytest.raises(Exception, match="clock_flagged must be true or false"):
        ask(store, clock_flagged="yes")


def test_slots_report_the_share_of_energy_from_flagged_readings(store: SqliteStore) -> None:
    # A register rising 1 kWh every 10 minutes; the readings at 20 and 30 minutes are flagged: they measured
    # the 2 kWh after the 10- and 20-minute readings, of the first slot's 3 (the one at 30 lies on its end).
    for minute in range(0, 70, 10):
        flag = ("check", -90.0) if minute in (20, 30) else None
        put(store, DAY + minute * 60_000, flag, energy_kwh=100.0 + minute / 10)
    rows = ask(store, interval="30m", agg={"energy_kwh": "delta"})
    first, second, *_ = rows
    assert first["energy_kwh"] == pytest.approx(3.0)
    assert first["clock_flagged"] == 1  # the reading at 20 minutes; the one at 30 is in the second slot
    assert first["clock_flagged_share"] == pytest.approx(2 / 3, abs=1e-4)
    assert second["clock_flagged"] == 1  # it holds the reading at 30, whose energy was all in the first
    assert second["clock_flagged_share"] == 0.0
    assert all("clock_flagged" not in r for r in rows[2:])  # no flagged reading: no key
    # Only the flagged readings: the slot energy they alone give.
    only = ask(store, interval="30m", agg={"energy_kwh": "count"}, clock_flagged=True)
    assert [r["energy_kwh"] for r in only] == [1, 1]


def test_interval_energy_share(store: SqliteStore) -> None:
    put(store, DAY + 10 * 60_000, energy_interval_kwh=1.0, interval_s=600.0)
    put(store, DAY + 20 * 60_000, ("passive", 5.0), energy_interval_kwh=3.0, interval_s=600.0)
    (row,) = ask(store, interval="30m", agg={"energy_interval_kwh": "sum"})
    assert row["energy_interval_kwh"] == pytest.approx(4.0)
    assert row["clock_flagged_share"] == pytest.approx(0.75)


def test_a_database_from_before_the_flags_gets_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE readings (der_id TEXT NOT NULL, measured_at INTEGER NOT NULL, energy_kwh REAL, "
        "energy_interval_kwh REAL, interval_s REAL, power_kw REAL, reactive_power_kvar REAL, voltage_v REAL, "
        "current_a REAL, power_factor REAL, frequency_hz REAL, soc_pct REAL, received_at INTEGER NOT NULL, "
        "stored_at INTEGER NOT NULL, source_id TEXT NOT NULL, format_code TEXT NOT NULL, "
        "PRIMARY KEY (der_id, measured_at)) WITHOUT ROWID"
    )
    old.execute(
        "INSERT INTO readings (der_id, measured_at, power_kw, received_at, stored_at, source_id, format_code) "
        f"VALUES ('M-1', {DAY}, 4.0, 0, 0, 'edge', 'hub.v1')"
    )
    old.commit()
    old.close()
    store = SqliteStore(path)
    try:
        assert ask(store) == [{"der_id": "M-1", "measured_at": "2026-11-27T00:00:00.000Z", "power_kw": 4.0}]
        put(store, DAY + 60_000, ("check", 3.0), power_kw=5.0)
        assert [r.get("clock_flag") for r in ask(store)] == [None, "check"]
    finally:
        store.close()
    SqliteStore(path).close()  # opened again: nothing to add, nothing fails


def test_offset_and_round_trip_from_the_four_timestamps() -> None:
    # The hub sends at 100.000 (t1) and hears back at 100.200 (t4); the source, 90 s ahead, received at
    # 190.050 (t2) and answered at 190.070 (t3): 50 ms out, 130 ms back, 20 ms in the source.
    rtt, offset = _sample(
        {"ok": True, "received_at": "1970-01-01T00:03:10.050Z", "source_time": "1970-01-01T00:03:10.070Z"},
        100.0,
        100.2,
    )
    assert rtt == pytest.approx(0.18)
    assert offset == pytest.approx(((190.05 - 100.0) + (190.07 - 100.2)) / 2)  # 89.96: half the asymmetry
    # Only source_time (the protocol's minimum): t2 = t3.
    rtt, offset = _sample({"ok": True, "source_time": "1970-01-01T00:03:10.100Z"}, 100.0, 100.2)
    assert rtt == pytest.approx(0.2) and offset == pytest.approx(90.0)
    # Not answers to judge by: refused, no time, a time without an offset.
    assert _sample({"ok": False}, 1, 2) is None
    assert _sample({"ok": True}, 1, 2) is None
    assert _sample({"ok": True, "source_time": "2026-11-27T00:00:00"}, 1, 2) is None


def test_passive_estimate_is_the_smallest_delay_and_forgets_after_its_window() -> None:
    skew = PassiveSkew(window_ms=10_000)
    assert skew.offset_ms(0) is None
    skew.add(received_at=1_000, newest_measured_at=91_000 - 500)  # 90 s ahead, 0.5 s in transit
    skew.add(received_at=2_000, newest_measured_at=92_000 - 3_000)  # a slower delivery
    skew.add(received_at=3_000, newest_measured_at=-60_000)  # an old reading sent late: says nothing
    assert skew.offset_ms(3_000) == 89_500
    assert skew.offset_ms(11_500) == 87_000  # the first slice has left the window
    assert skew.offset_ms(12_500) == -63_000  # only the late reading left: behind by at most 63 s
    assert skew.offset_ms(30_000) is None
    skew.add(received_at=31_000, newest_measured_at=30_000)
    skew.forget()
    assert skew.offset_ms(31_000) is None


@pytest.mark.parametrize("server", ["ntp.example:0", "ntp.example:x", "ntp.example/a", "", "user@ntp.example"])
def test_a_bad_ntp_server_stops_the_config_naming_the_key(server: str) -> None:
    with pytest.raises(ConfigError, match=r"time\.ntp\.servers: .* must be host or host:port"):
        parse_config({"time": {"ntp": {"servers": [server]}}})


def test_good_ntp_servers_and_the_bad_clock_choice() -> None:
    time_section = {"ntp": {"servers": ["ntp.example", "[::1]:1123"]}, "edges": {"bad_clock": "refuse"}}
    config = parse_config({"time": time_section})
    assert [ntp_address(s) for s in config.time.ntp.servers] == [("ntp.example", 123), ("::1", 1123)]
    with pytest.raises(ConfigError, match=r"time\.edges\.bad_clock: must be 'flag' or 'refuse'"):
        parse_config({"time": {"edges": {"bad_clock": "drop"}}})


def test_hubd_time_before_the_hub_ever_ran(tmp_path: Path) -> None:
    config = tmp_path / "hubd.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    for command in ("status", "sources"):
        result = CliRunner().invoke(main, ["--config", str(config), "time", command])
        assert result.exit_code == 1
        assert "no clock state" in result.output and "the hub has not run there" in result.output


class _Trail:
    """The audit trail's two calls, kept for the assertions."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def append(self, event: str, outcome: str = "ok", **fields: Any) -> None:
        self.records.append((event, outcome, fields))

    def flush(self) -> None:
        pass


def test_the_flag_follows_the_evidence_and_a_right_check_lifts_it() -> None:
    trail = _Trail()
    clocks = Clocks(TimeConfig(), trail)  # type: ignore[arg-type]
    now = 1_700_000_000_000
    assert clocks.observe("edge-1", now, now - 800) is None  # late data: no flag, nothing looked at
    assert clocks.flags == {}
    assert clocks.observe("edge-1", now + 1000, now + 91_000) == ("passive", 90.0)  # from the future
    assert trail.records[-1] == ("time.flagged", "passive", {"source_id": "edge-1", "offset_s": 90.0})
    source = clocks.sources["edge-1"]
    clocks.checked(source, 0.01, 0.002, "ok")  # corrected, and found right
    assert clocks.flags == {}
    assert [r[:2] for r in trail.records[-1:]] == [("time.unflagged", "passive")]
    assert clocks.observe("edge-1", now + 2000, now + 1990) is None  # the old evidence is forgotten
    polled = clocks.observe("modbus-1", now, now - 5, checkable=False)
    assert polled is None and clocks.sources["modbus-1"].state == "not_checked"
    assert [s["source_id"] for s in clocks.snapshot()["sources"]] == ["edge-1", "modbus-1"]
