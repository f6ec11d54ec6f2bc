"""The 30-minute slot summaries InfluxDB keeps beside the readings (hubd.store.influx.slots): the settlement's
bucket queries read them, so they must stay what the readings say through everything a batch can do: extend
a slot across batches, start a new one, come late into an old one, replace a reading with one of fewer
fields, hold a reading InfluxDB refuses, and a restart of the hub in the middle of a slot. Each scenario's
answers are compared with SQLite's for the same readings, with the readings' own aggregation taken away."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from influx_server import InfluxServer, influxd, sqlite_and_influx  # noqa: F401 - the fixture

from hubd.auth.registry import Registry
from hubd.cli import main
from hubd.config import Config, QueryConfig
from hubd.query.conditions import parse_query
from hubd.query.execute import run
from hubd.store import Rows
from hubd.store.factory import open_query, open_sink
from hubd.store.influx import slots
from hubd.store.influx.sink import InfluxSink

DAY = 1748736000000  # 2025-06-01T00:00:00Z
MINUTE = 60_000
CONFIG = QueryConfig(max_limit=1000, default_limit=1000, max_der_ids=10)
SLOTS = {
    "start": "2025-06-01T00:00:00Z",
    "end": "2025-06-01T03:00:00Z",
    "interval": "30m",
    "agg": {"power_kw": ["mean", "min", "max", "sum", "count"], "energy_kwh": "delta", "voltage_v": "count"},
}
NAMES = ("power_kw", "energy_kwh")


def reading(der_id: str, minute: int, power: float, energy: float, sent: int = 0) -> tuple[Any, ...]:
    t = DAY + minute * MINUTE
    return (der_id, t, power, energy, t + 500, "edge-1", "hub.v1", t + 100 + sent)


def batch(*readings: tuple[Any, ...], names: tuple[str, ...] = NAMES) -> Rows:
    return [(names, list(readings))]


async def write(config: Config, batches: list[Rows]) -> None:
    """Each batch through a sink; a batch of None closes the sink and opens a new one (a restart)."""
    sink = open_sink(config)
    await sink.start()
    try:
        for rows in batches:
            if rows is None:
                await sink.close()
                sink = open_sink(config)
                await sink.start()
            else:
                await sink.write_rows(rows, stored_at=0)
    finally:
        await sink.close()


def answer(config: Config, request: dict[str, Any], ders: Any) -> list[dict[str, Any]]:
    store = open_query(config)
    try:
        return run(parse_query(request, CONFIG, ders), store)["rows"]  # type: ignore[no-any-return]
    finally:
        store.close()


def status(config: Config, tmp_path: Path) -> dict[str, Any]:
    """``hubd store status --json`` for this InfluxDB store."""
    path = tmp_path / "hubd.yaml"
    influx = {"url": config.store.influxdb.url, "database": config.store.influxdb.database}
    path.write_text(json.dumps({"data_dir": config.data_dir, "store": {"backend": "influxdb", "influxdb": influx}}))
    result = CliRunner().invoke(main, ["--config", str(path), "store", "status", "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def ders_of(tmp_path: Path, der_ids: tuple[str, ...]) -> Any:
    registry = Registry(tmp_path / "registry.sqlite3")
    for der_id in der_ids:
        registry.add_der(der_id, 0, {"type": "pv"})
    found = registry.ders()
    registry.close()
    return found


def only_open_slots_from_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bucket statistics from the summaries, but for the slots after each DER's last summary (its open
    slot), whose readings are read; any aggregation of the readings fails."""

    def not_from_readings(*_: Any) -> None:
        raise AssertionError("bucket statistics computed from the readings")

    monkeypatch.setattr("hubd.store.influx.query.InfluxQuery._load", not_from_readings)
    monkeypatch.setattr("hubd.store.influx.pushdown.Plan.statements", not_from_readings)


@pytest.fixture
def summaries_only(monkeypatch: pytest.MonkeyPatch) -> None:
    only_open_slots_from_readings(monkeypatch)


def test_summaries_stay_exact_through_late_replaced_and_restarted_writes(
    tmp_path: Path,
    influxd: InfluxServer,  # noqa: F811
    summaries_only: None,
) -> None:
    minutes = range(0, 45)
    batches: list[Any] = [
        # PV-1 every minute to 00:44 (a slot and a half), PV-2 every 7 minutes
        batch(*(reading("PV-1", m, 1.0 + (m % 7) * 0.1, 100.0 + m * 0.02) for m in minutes)),
        batch(*(reading("PV-2", m, 3.3 - m * 0.01, 500.0 + m * 0.05) for m in range(0, 60, 7))),
        # the rest of PV-1's second slot, out of order within the batch: the sink extends what it holds
        batch(*(reading("PV-1", m, 0.7 + (m % 5) * 0.3, 100.0 + m * 0.02) for m in reversed(range(45, 60)))),
        None,  # a restart: the sink no longer holds PV-2's newest slot and must read it from InfluxDB
        batch(
            reading("PV-2", 58, 9.9, 502.95),  # into that slot, later than what it has
            *(reading("PV-1", m, 2.0, 100.0 + m * 0.02) for m in range(60, 75)),  # a new slot
        ),
        batch(reading("PV-1", 10, 0.5, 100.2, sent=-50)),  # late and older than the stored one: not taken
        batch(reading("PV-1", 10, 8.5, 100.2, sent=50)),  # late and newer: replaces it
        batch(
            ("PV-1", DAY + 20 * MINUTE, 4.25, DAY + 40 * MINUTE, "edge-2", "hub.v1", DAY + 21 * MINUTE),
            names=("power_kw",),
        ),
        # PV-1 alone in its slot with a voltage, then replaced by a reading without one: the slot has none
        batch(
            (*reading("PV-1", 140, 1.4, 103.0, sent=-50)[:4], 231.5, *reading("PV-1", 140, 0, 0, sent=-50)[4:]),
            names=(*NAMES, "voltage_v"),
        ),
        batch(reading("PV-2", 95, 1.0, 504.0), reading("PV-1", 140, 1.5, 103.0)),  # gaps: slots with nothing
    ]
    stores = sqlite_and_influx(tmp_path, influxd)
    for config in stores.values():
        asyncio.run(write(config, batches))
    ders = ders_of(tmp_path, ("PV-1", "PV-2"))
    expected = answer(stores["sqlite"], SLOTS, ders)
    assert len(expected) == 9 and any(row["n"] == 1 for row in expected)  # delta spreads over the gaps
    # PV-1's 00:20 reading now has no register: its first slot counts 29 energy readings of 30
    first = next(r for r in expected if r["der_id"] == "PV-1" and r["slot"] == 1)
    assert first["power_kw_count"] == 30 and first["power_kw_max"] == 8.5
    assert answer(stores["influxdb"], SLOTS, ders) == expected
    summary = influxd.query(
        'SELECT "energy_kwh_n", "power_kw_n", "n" FROM "readings_30m" WHERE "der_id" = \'PV-1\' AND time = '
        f"{DAY * 1_000_000}",
        stores["influxdb"].store.influxdb.database,
    )
    assert summary[0]["values"][0][1:] == [29, 30, 30]
    last = next(r for r in expected if r["der_id"] == "PV-1" and r["slot"] == 5)
    assert last["n"] == 1 and last["voltage_v"] == 0  # voltage_v: its count


def test_a_reading_influxdb_refuses_is_not_in_its_slot(
    tmp_path: Path,
    influxd: InfluxServer,  # noqa: F811
    summaries_only: None,
) -> None:
    stores = sqlite_and_influx(tmp_path, influxd)
    database = stores["influxdb"].store.influxdb.database
    # Someone else wrote voltage_v as an integer the day before (same shard): InfluxDB refuses floats now.
    influxd.write(database, f"readings,der_id=OTHER voltage_v=230i {DAY - 86_400_000}")
    good = [reading("PV-1", m, 1.0 + m * 0.1, 100.0 + m) for m in range(0, 30, 3)]
    t = DAY + 16 * MINUTE
    refused = batch((("PV-1", t, 9.0, 230.5, t + 500, "edge-1", "hub.v1", None)), names=("power_kw", "voltage_v"))
    asyncio.run(write(stores["influxdb"], [batch(*good) + refused]))
    asyncio.run(write(stores["sqlite"], [batch(*good)]))  # what InfluxDB holds: the refused one quarantined
    ders = ders_of(tmp_path, ("PV-1",))
    rows = answer(stores["influxdb"], SLOTS, ders)
    assert rows == answer(stores["sqlite"], SLOTS, ders)
    assert rows[0]["n"] == 10 and "voltage_v_count" not in rows[0]


def test_a_store_filled_before_the_summaries_answers_its_old_slots_from_the_readings(
    tmp_path: Path,
    influxd: InfluxServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Readings an earlier hubd wrote (no summaries): the summaries are complete from the slot after the
    newest of them; queries before that are answered from the readings, and both agree with SQLite."""
    stores = sqlite_and_influx(tmp_path, influxd)
    influx = stores["influxdb"].store.influxdb
    old = [reading("PV-1", m, 1.0 + m * 0.1, 100.0 + m) for m in range(0, 60, 5)]
    influxd.write(
        influx.database,
        "\n".join(
            f'readings,der_id=PV-1 power_kw={p},energy_kwh={e},received_at={r}i,source="edge-1",format="hub.v1",'
            f"sent_at={s}i {t}"
            for _, t, p, e, r, _, _, s in old
        ),
    )
    new = [reading("PV-1", m, 2.0, 200.0 + m) for m in range(60, 120, 5)]
    asyncio.run(write(stores["influxdb"], [batch(*new)]))
    asyncio.run(write(stores["sqlite"], [batch(*old, *new)]))
    assert slots.complete_from(stores["influxdb"].registry_path, influx) == DAY + 60 * MINUTE
    ders = ders_of(tmp_path, ("PV-1",))
    later = {**SLOTS, "start": "2025-06-01T01:00:00Z"}
    assert answer(stores["influxdb"], SLOTS, ders) == answer(stores["sqlite"], SLOTS, ders)
    assert answer(stores["influxdb"], later, ders) == answer(stores["sqlite"], later, ders)

    only_open_slots_from_readings(monkeypatch)
    assert answer(stores["influxdb"], later, ders) == answer(stores["sqlite"], later, ders)
    with pytest.raises(AssertionError, match="from the readings"):
        answer(stores["influxdb"], SLOTS, ders)


def test_the_documented_grafana_query_gives_the_slot_means(
    tmp_path: Path,
    influxd: InfluxServer,  # noqa: F811
) -> None:
    """docs/operations.md's query of the summaries: a slot's mean power is power_kw_sum / power_kw_n, for
    every slot but the open one (the DER's newest, summarized when a later reading arrives)."""
    stores = sqlite_and_influx(tmp_path, influxd)
    readings = [reading("PV-1", m, 1.0 + (m % 9) * 0.37, 100.0 + m) for m in range(0, 90)]
    for config in stores.values():
        asyncio.run(write(config, [batch(*readings)]))
    ders = ders_of(tmp_path, ("PV-1",))
    means = [row["power_kw_mean"] for row in answer(stores["sqlite"], SLOTS, ders)]
    docs = (Path(__file__).parent.parent / "docs" / "operations.md").read_text(encoding="utf-8")
    statement = next(line for line in docs.splitlines() if line.startswith('SELECT "power_kw_sum" / "power_kw_n"'))
    statement = statement.replace("$timeFilter", "time >= '2025-06-01T00:00:00Z' AND time < '2025-06-01T03:00:00Z'")
    found = influxd.query(statement.replace("$der", "PV-1"), stores["influxdb"].store.influxdb.database)
    assert len(means) == 3 and [value for _, value in found[0]["values"]] == means[:2]


class Crash(BaseException):
    """The hub stopping dead (kill -9) at a chosen point."""


def test_summaries_a_crash_left_unwritten_are_made_at_the_next_start(
    tmp_path: Path,
    influxd: InfluxServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub dies after a batch's readings are in InfluxDB but before the summaries of the slots it closed
    are: the slots noted in the spool's file are summarized when the hub starts again, before any reading arrives."""
    stores = sqlite_and_influx(tmp_path, influxd)
    first = batch(*(reading("PV-1", m, 1.0 + m * 0.01, 100.0 + m) for m in range(0, 40)))
    closing = batch(*(reading("PV-1", m, 2.0 - m * 0.01, 100.0 + m) for m in range(40, 75)))
    asyncio.run(write(stores["sqlite"], [first, closing]))

    async def crashing() -> None:
        sink = open_sink(stores["influxdb"])
        await sink.start()
        await sink.write_rows(first, stored_at=0)
        summarize = InfluxSink._summarize

        async def die_before_summaries(*_: Any) -> None:
            raise Crash

        monkeypatch.setattr(InfluxSink, "_summarize", die_before_summaries)
        with pytest.raises(Crash):
            await sink.write_rows(closing, stored_at=0)
        monkeypatch.setattr(InfluxSink, "_summarize", summarize)
        await sink._client.close()  # type: ignore[attr-defined]  # nothing else is closed: it died

    asyncio.run(crashing())
    assert status(stores["influxdb"], tmp_path)["slot_summaries_pending"] == 1  # PV-1 00:30, closed by minute 60
    asyncio.run(write(stores["influxdb"], []))  # the next start, with nothing to write
    after = status(stores["influxdb"], tmp_path)
    assert after["slot_summaries_pending"] == 0 and after["slot_summaries"] == "complete"
    ders = ders_of(tmp_path, ("PV-1",))
    only_open_slots_from_readings(monkeypatch)
    rows = answer(stores["influxdb"], SLOTS, ders)
    assert rows == answer(stores["sqlite"], SLOTS, ders)
    assert [r["n"] for r in rows if r["der_id"] == "PV-1"] == [30, 30, 15]
