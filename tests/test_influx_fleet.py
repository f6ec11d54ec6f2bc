"""The status page's figures with the readings in InfluxDB: each DER's last reading and a day's energy per
30-minute slot by DER type are the same as with the same readings in SQLite, and the page keeps serving (with
what it read last) while InfluxDB is away."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from influx_server import InfluxServer, fresh_database, own_influxd  # noqa: F401 - the fixture

from hubd.auth.registry import Registry
from hubd.config import Config, parse_config
from hubd.ops.fleet import Fleet
from hubd.store import Rows
from hubd.store.factory import open_sink

DAY = 1748736000000  # 2025-06-01T00:00:00Z
MINUTE = 60_000
TYPES = {"PV-1": "pv", "PV-2": "pv", "BAT-1": "ess", "SILENT-1": "pv"}


def readings() -> list[Rows]:
    """Registers with a reset (PV-2 at 10:00), interval energies (BAT-1) and a DER that never sent."""
    register: list[tuple[Any, ...]] = []
    interval: list[tuple[Any, ...]] = []
    for m in range(0, 14 * 60, 5):  # 00:00 to 14:00, every 5 minutes
        t = DAY + m * MINUTE
        tail = (t + 300, "edge-1", "hub.v1", None)
        register.append(("PV-1", t, 1.0, 100.0 + m * 0.1, *tail))
        register.append(("PV-2", t, 2.0, (m - 600) * 0.2 if m >= 600 else 50.0 + m * 0.05, *tail))
        interval.append(("BAT-1", t, 0.25, 300.0, *tail))
    return [[(("power_kw", "energy_kwh"), register), (("energy_interval_kwh", "interval_s"), interval)]]


async def fill(config: Config) -> None:
    sink = open_sink(config)
    await sink.start()
    try:
        for batch in readings():
            await sink.write_rows(batch, stored_at=0)
    finally:
        await sink.close()


def fleet_for(config: Config) -> Fleet:
    registry = Registry(config.registry_path)
    for der_id, der_type in TYPES.items():
        registry.add_der(der_id, 0, {"type": der_type})
    registry.close()
    asyncio.run(fill(config))
    return Fleet(config)


def test_last_readings_and_the_day_chart_match_sqlite(tmp_path: Path, own_influxd: InfluxServer) -> None:  # noqa: F811
    influx = {"url": own_influxd.url, "database": fresh_database(own_influxd)}
    on_sqlite = fleet_for(parse_config({"data_dir": str(tmp_path / "s")}))
    on_influx = fleet_for(
        parse_config({"data_dir": str(tmp_path / "i"), "store": {"backend": "influxdb", "influxdb": influx}})
    )
    now = DAY + 14 * 60 * MINUTE
    try:
        ders = on_influx.ders(now, "", 10)
        assert ders == on_sqlite.ders(now, "", 10)
        assert {d.der_id: d.last_at for d in ders} == {
            "BAT-1": now - 5 * MINUTE,
            "PV-1": now - 5 * MINUTE,
            "PV-2": now - 5 * MINUTE,
            "SILENT-1": None,
        }
        assert on_influx.states(now) == on_sqlite.states(now)
        energy, pending = on_influx.energy(DAY, DAY + 86_400_000, now)
        assert (energy, pending) == on_sqlite.energy(DAY, DAY + 86_400_000, now)
        assert pending == 0 and sum(energy["pv"]) > 0 and sum(energy["ess"]) == 14 * 12 * 0.25
        own_influxd.kill()  # away: the page still answers, with the last times it read
        assert on_influx.ders(now, "", 10) == ders
        _, pending = on_influx.energy(DAY, DAY + 2 * 86_400_000, now + 86_400_000)
        assert pending > 0  # the slots it could not read are left to read later, not shown as empty
    finally:
        on_sqlite.close()
        on_influx.close()
