"""A batch of several /write requests, two of them in flight, and batches prepared while the one before is
written, against a real ``influxd``: batches still land in the order they were handed over, a refused reading
in any request is quarantined alone, and a batch whose requests time out is spooled whole and replayed once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from influx_server import InfluxServer, drained, fresh_database, influxd, own_influxd  # noqa: F401 - the fixtures

from hubd.config import Config, parse_config
from hubd.quarantine import Quarantine
from hubd.store import Rows
from hubd.store.influx.sink import InfluxSink

T0 = 1748736000000  # 2025-06-01T00:00:00Z


def config_for(tmp_path: Path, server: InfluxServer, **influx: Any) -> Config:
    section = {"url": server.url, "database": fresh_database(server), "retry_s": 0.05, **influx}
    return parse_config({"data_dir": str(tmp_path / "data"), "store": {"backend": "influxdb", "influxdb": section}})


def power(server: InfluxServer, config: Config) -> dict[tuple[str, int], float]:
    series = server.query('SELECT "power_kw" FROM "readings" GROUP BY "der_id"', config.store.influxdb.database)
    return {(s["tags"]["der_id"], t): v for s in series for t, v in s["values"]}


def test_batches_handed_over_at_once_land_in_that_order(tmp_path: Path, influxd: InfluxServer) -> None:  # noqa: F811
    """Three batches of the same readings in one version (so the last written wins), the first far larger: its
    lines take longest to make, yet it is written first and the last batch's values stay."""
    config = config_for(tmp_path, influxd, batch_size=3)
    keys = [(f"PV-{d}", T0 + s * 1000) for d in range(10) for s in range(30)]

    def batch(value: float, count: int) -> Rows:
        return [(("power_kw",), [(d, t, value, T0, "edge", "hub.v1", T0) for d, t in keys[:count]])]

    async def scenario() -> None:
        sink = InfluxSink(config)
        await sink.start()
        try:
            await asyncio.gather(
                sink.write_rows(batch(1.0, 300), 0),
                sink.write_rows(batch(2.0, 6), 0),
                sink.write_rows(batch(3.0, 3), 0),
            )
        finally:
            await sink.close()

    asyncio.run(scenario())
    stored = power(influxd, config)
    assert len(stored) == 300
    assert [stored[k] for k in keys[:3]] == [3.0] * 3
    assert [stored[k] for k in keys[3:6]] == [2.0] * 3
    assert set(stored[k] for k in keys[6:]) == {1.0}


def test_a_refused_reading_in_any_request_is_quarantined_alone(tmp_path: Path, influxd: InfluxServer) -> None:  # noqa: F811
    config = config_for(tmp_path, influxd, batch_size=4)
    # power_kw written as an integer first: InfluxDB refuses it as a float in this shard from now on.
    influxd.write(config.store.influxdb.database, f"readings,der_id=OTHER power_kw=1i {T0 - 1000}")
    rows: Rows = []
    for i in range(30):  # 8 requests; readings 5, 17 and 26 (in three of them) are refused
        names = ("power_kw",) if i in (5, 17, 26) else ("energy_kwh",)
        rows.append((names, [(f"PV-{i}", T0 + i * 1000, float(i), T0, "edge", "hub.v1", T0)]))

    async def scenario() -> None:
        sink = InfluxSink(config)
        await sink.start()
        try:
            await sink.write_rows(rows, 0)
            assert sink.refused == 3 and sink.spooled == 0
        finally:
            await sink.close()

    asyncio.run(scenario())
    series = influxd.query('SELECT "energy_kwh" FROM "readings" WHERE "der_id" =~ /PV/', config.store.influxdb.database)
    assert len(series[0]["values"]) == 27
    quarantine = Quarantine(config.registry_path)
    try:
        entries = quarantine.list()
        assert sorted(e["reason"].count("field type conflict") for e in entries) == [1, 1, 1]
    finally:
        quarantine.close()


def test_a_batch_whose_requests_time_out_is_spooled_whole_and_replayed_once(
    tmp_path: Path,
    own_influxd: InfluxServer,  # noqa: F811
) -> None:
    config = config_for(tmp_path, own_influxd, batch_size=5, write_timeout_s=0.5)
    rows: Rows = [(("power_kw",), [("PV-1", T0 + i * 1000, float(i), T0, "edge", "hub.v1", T0) for i in range(23)])]

    async def scenario() -> None:
        sink = InfluxSink(config)
        await sink.start()
        own_influxd.pause()
        try:
            await asyncio.wait_for(sink.write_rows(rows, 0), 10)  # answered from the spool
            assert sink.spooled == 23
        finally:
            own_influxd.resume()
        await drained(sink)
        assert sink.spooled == 0
        await sink.close()

    asyncio.run(scenario())
    assert power(own_influxd, config) == {("PV-1", T0 + i * 1000): float(i) for i in range(23)}


def test_a_reading_influxdb_cannot_hold_is_quarantined_and_the_rest_of_the_batch_stored(
    tmp_path: Path,
    influxd: InfluxServer,  # noqa: F811
) -> None:
    """A NaN (which no decoder lets through, but a store migrated from elsewhere may hold) never reaches
    InfluxDB: its reading is quarantined before the requests go, whichever request it would have been in."""
    config = config_for(tmp_path, influxd, batch_size=4)
    run = [("PV-1", T0 + i * 1000, float("nan") if i == 9 else float(i), T0, "edge", "hub.v1", T0) for i in range(20)]

    async def scenario() -> None:
        sink = InfluxSink(config)
        await sink.start()
        try:
            await sink.write_rows([(("power_kw",), run)], 0)
            assert sink.refused == 1 and sink.spooled == 0
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert power(influxd, config) == {("PV-1", T0 + i * 1000): float(i) for i in range(20) if i != 9}
    quarantine = Quarantine(config.registry_path)
    try:
        (entry,) = quarantine.list()
        assert "cannot be stored in InfluxDB" in entry["reason"]
    finally:
        quarantine.close()
