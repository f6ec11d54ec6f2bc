"""The InfluxDB sink against a real ``influxd`` that is killed, frozen or refusing: every batch it
acknowledged is in InfluxDB exactly once in the end, a full spool slows intake instead of dropping, the spool
outlives the hub, and readings InfluxDB refuses are quarantined alone with its message."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from influx_server import InfluxServer, drained, fresh_database, own_influxd  # noqa: F401 - the fixture

from hubd.broker import free_port
from hubd.cli import main
from hubd.config import Config, ConfigError, parse_config
from hubd.model import ErrorCode, HubError
from hubd.quarantine import Quarantine
from hubd.store import Rows
from hubd.store.influx.query import InfluxQuery
from hubd.store.influx.sink import InfluxSink

T0 = 1748736000000  # 2025-06-01T00:00:00Z


def batch(der_id: str, first: int, count: int, **extra: float) -> Rows:
    run = [
        (der_id, T0 + i * 1000, float(i), T0 + i * 1000 + 5, "edge", "hub.v1", T0 + i * 1000 + 1)
        for i in range(first, first + count)
    ]
    return [(("power_kw",), run)]


def config_for(tmp_path: Path, server: InfluxServer, **influx: Any) -> Config:
    section = {"url": server.url, "database": fresh_database(server), "retry_s": 0.05, "write_timeout_s": 1.0, **influx}
    return parse_config({"data_dir": str(tmp_path / "data"), "store": {"backend": "influxdb", "influxdb": section}})


def stored(server: InfluxServer, config: Config) -> list[list[Any]]:
    series = server.query('SELECT "power_kw" FROM "readings"', config.store.influxdb.database)
    return [row for s in series for row in s["values"]]


def status(config: Config, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "hubd.yaml"
    influx = {k: v for k, v in {"url": config.store.influxdb.url, "database": config.store.influxdb.database}.items()}
    path.write_text(json.dumps({"data_dir": config.data_dir, "store": {"backend": "influxdb", "influxdb": influx}}))
    result = CliRunner().invoke(main, ["--config", str(path), "store", "status", "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_batches_written_while_influxdb_is_down_are_spooled_then_replayed_in_order_once(
    tmp_path: Path,
    own_influxd: InfluxServer,  # noqa: F811
) -> None:
    config = config_for(tmp_path, own_influxd)

    async def scenario() -> None:
        sink = InfluxSink(config)
        await sink.start()
        await sink.write_rows(batch("PV-1", 0, 100), 0)  # straight in
        own_influxd.kill()
        for first in range(100, 1000, 100):  # acknowledged from the spool
            await sink.write_rows(batch("PV-1", first, 100), 0)
        # a reading sent again while spooled: the later, newer copy wins once replayed
        await sink.write_rows([(("power_kw",), [("PV-1", T0 + 5000, 55.5, T0 + 9000, "edge", "hub.v1", T0 + 8000)])], 0)
        down = status(config, tmp_path)
        assert down["mode"] == "spooling" and down["spooled_readings"] == 901 and down["spooled_batches"] == 10
        assert down["oldest_age_s"] is not None
        own_influxd.start()
        await drained(sink)
        await sink.write_rows(batch("PV-1", 1000, 100), 0)  # straight in again
        await sink.close()

    asyncio.run(scenario())
    rows = stored(own_influxd, config)
    assert [t for t, _ in rows] == [T0 + i * 1000 for i in range(1100)]  # every reading, once, none lost
    assert rows[5][1] == 55.5 and rows[6][1] == 6.0
    after = status(config, tmp_path)
    assert after["mode"] == "direct" and after["spooled_readings"] == 0 and after["replayed_readings"] == 901
    assert after["replay_rate_per_s"] > 0


def test_a_full_spool_slows_intake_and_drops_nothing(tmp_path: Path, own_influxd: InfluxServer) -> None:  # noqa: F811
    config = config_for(tmp_path, own_influxd, spool_max_readings=150)

    async def scenario() -> None:
        sink = InfluxSink(config)
        await sink.start()
        own_influxd.kill()
        await sink.write_rows(batch("PV-1", 0, 100), 0)
        await sink.write_rows(batch("PV-1", 100, 100), 0)  # the spool now holds 200, past its bound
        held = asyncio.create_task(sink.write_rows(batch("PV-1", 200, 100), 0))
        await asyncio.sleep(1.0)
        assert not held.done()  # intake waits while the spool is full …
        own_influxd.start()
        await asyncio.wait_for(held, 30)  # … and goes on once the replay makes room
        await sink.close()
        again = InfluxSink(config)  # whatever was left in the spool is replayed by the next start
        await again.start()
        for _ in range(200):
            if not again.spooled:
                break
            await asyncio.sleep(0.05)
        await again.close()

    asyncio.run(scenario())
    assert len(stored(own_influxd, config)) == 300


def test_the_spool_outlives_the_hub(tmp_path: Path, own_influxd: InfluxServer) -> None:  # noqa: F811
    config = config_for(tmp_path, own_influxd)

    async def down() -> None:
        sink = InfluxSink(config)
        await sink.start()
        own_influxd.kill()
        await sink.write_rows(batch("PV-1", 0, 50), 0)
        await sink.write_rows(batch("PV-2", 0, 50), 0)
        await sink.close()  # the hub stops with InfluxDB still away

    async def back() -> None:
        sink = InfluxSink(config)
        await sink.start()  # replays what the last run spooled
        await drained(sink)
        await sink.close()

    asyncio.run(down())
    assert status(config, tmp_path)["spooled_readings"] == 100
    own_influxd.start()
    asyncio.run(back())
    assert len(stored(own_influxd, config)) == 100
    assert status(config, tmp_path)["spooled_readings"] == 0


def test_a_frozen_influxdb_times_out_into_the_spool(tmp_path: Path, own_influxd: InfluxServer) -> None:  # noqa: F811
    config = config_for(tmp_path, own_influxd, write_timeout_s=0.5)

    async def scenario() -> None:
        sink = InfluxSink(config)
        await sink.start()
        own_influxd.pause()
        try:
            await asyncio.wait_for(sink.write_rows(batch("PV-1", 0, 20), 0), 10)  # answered from the spool
            assert sink.spooled == 20
        finally:
            own_influxd.resume()
        await drained(sink)
        await sink.close()

    asyncio.run(scenario())
    assert len(stored(own_influxd, config)) == 20


def test_readings_influxdb_refuses_are_quarantined_alone_with_its_message(
    tmp_path: Path,
    own_influxd: InfluxServer,  # noqa: F811
) -> None:
    config = config_for(tmp_path, own_influxd)
    # Someone else wrote power_kw as an integer in this shard: InfluxDB refuses it as a float from now on.
    own_influxd.write(config.store.influxdb.database, f"readings,der_id=OTHER power_kw=1i {T0 - 1000}")
    rows: Rows = [
        (("energy_kwh",), [("PV-1", T0 + i * 1000, 10.0 + i, T0, "edge", "hub.v1", T0) for i in range(10)]),
        (("power_kw",), [("PV-2", T0 + 3000, 2.5, T0, "edge", "hub.v1", T0)]),
        (("energy_kwh",), [("PV-3", T0 + i * 1000, 20.0 + i, T0, "edge", "hub.v1", T0) for i in range(10)]),
    ]

    async def scenario() -> None:
        sink = InfluxSink(config)
        await sink.start()
        await sink.write_rows(rows, 0)  # not an error for the batch: the rest is stored
        assert sink.refused == 1
        await sink.close()

    asyncio.run(scenario())
    series = own_influxd.query(
        'SELECT "energy_kwh" FROM "readings" WHERE "der_id" =~ /PV/', config.store.influxdb.database
    )
    assert len(series[0]["values"]) == 20
    quarantine = Quarantine(config.registry_path)
    try:
        entries = quarantine.list()
        assert len(entries) == 1
        assert "field type conflict" in entries[0]["reason"] and entries[0]["topic"] == "store/influxdb"
        kept = quarantine.get(entries[0]["id"])
        assert kept is not None and json.loads(kept[1])["der_id"] == "PV-2"
    finally:
        quarantine.close()


def test_a_database_that_does_not_exist_stops_the_start_naming_the_key(
    tmp_path: Path,
    own_influxd: InfluxServer,  # noqa: F811 - the fixture
) -> None:
    config = config_for(tmp_path, own_influxd, database="not_made")

    async def start() -> None:
        await InfluxSink(config).start()

    with pytest.raises(ConfigError, match=r"^InfluxDB has no database 'not_made' \(store.influxdb.database\)"):
        asyncio.run(start())
    # hubd run: one line, the status of a value to change (docs/operations.md, Exit statuses), no traceback
    path = tmp_path / "hubd.yaml"
    path.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "run"),
                "broker": {"embedded_port": free_port()},
                "http": {"bind": "127.0.0.1:0"},
                "store": {"backend": "influxdb", "influxdb": {"url": own_influxd.url, "database": "not_made"}},
            }
        ),
        encoding="utf-8",
    )
    hubd = Path(sys.executable).with_name("hubd")
    done = subprocess.run([str(hubd), "--config", str(path), "run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: InfluxDB has no database 'not_made' (store.influxdb.database): create it (docs/operations.md, InfluxDB)"
    ], done.stderr
    assert "Traceback" not in done.stderr


def test_a_retention_policy_that_does_not_exist_stops_the_start_naming_the_key(
    tmp_path: Path,
    own_influxd: InfluxServer,  # noqa: F811 - the fixture
) -> None:
    config = config_for(tmp_path, own_influxd, retention_policy="nope")

    async def start() -> None:
        await InfluxSink(config).start()

    with pytest.raises(
        ConfigError, match=r"has no retention policy 'nope' \(store.influxdb.retention_policy\); it has: autogen"
    ):
        asyncio.run(start())


class Crash(BaseException):
    """The hub stopping dead (kill -9)."""


def test_a_batch_cut_short_between_deleting_a_replaced_reading_and_writing_it_is_written_at_the_next_start(
    tmp_path: Path,
    own_influxd: InfluxServer,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newer version without the energy of the stored one: hubd deletes the stored point, then writes the new
    one. Killed in between, the acknowledged old version is gone from InfluxDB; the batch was held in the
    spool's file before the delete, so the next start writes the new version."""
    config = config_for(tmp_path, own_influxd)
    database = config.store.influxdb.database
    old: Rows = [(("power_kw", "energy_kwh"), [("PV-1", T0, 1.0, 5.0, T0 + 5, "edge", "hub.v1", T0 + 1)])]
    newer: Rows = [(("power_kw",), [("PV-1", T0, 2.0, T0 + 9, "edge", "hub.v1", T0 + 2)])]

    async def crashing() -> None:
        sink = InfluxSink(config)
        await sink.start()
        await sink.write_rows(old, 0)

        async def die(*_: Any) -> None:
            raise Crash

        monkeypatch.setattr(InfluxSink, "_write_all", die)  # after the delete, before the write
        with pytest.raises(Crash):
            await sink.write_rows(newer, 0)
        monkeypatch.undo()
        await sink._client.close()  # nothing else is closed: it died

    asyncio.run(crashing())
    assert own_influxd.query('SELECT * FROM "readings"', database) == []  # the old version deleted

    async def restart() -> None:
        sink = InfluxSink(config)
        await sink.start()
        await drained(sink)
        await sink.close()

    asyncio.run(restart())
    found = own_influxd.query('SELECT "power_kw", "energy_kwh" FROM "readings"', database)
    assert found[0]["values"] == [[T0, 2.0, None]]
    assert status(config, tmp_path)["spooled_readings"] == 0


def test_a_query_while_influxdb_is_away_is_answered_unavailable(tmp_path: Path, own_influxd: InfluxServer) -> None:  # noqa: F811
    config = config_for(tmp_path, own_influxd)
    query = InfluxQuery(config.store.influxdb)
    try:
        own_influxd.kill()
        with pytest.raises(HubError) as caught:
            query.raw(T0, T0 + 1000, None, ("power_kw",), (), None, 10)
        assert caught.value.code == ErrorCode.UNAVAILABLE and "InfluxDB" in caught.value.message
    finally:
        query.close()


def test_an_older_version_sent_after_a_restart_does_not_replace_the_stored_one(
    tmp_path: Path,
    own_influxd: InfluxServer,  # noqa: F811 - the fixture
) -> None:
    """The sink skips the look at stored versions for readings later than their DER's latest stored time;
    that time comes from InfluxDB when the sink starts, so a restarted hub still checks."""
    config = config_for(tmp_path, own_influxd)
    newer: Rows = [(("power_kw", "energy_kwh"), [("PV-1", T0, 2.0, 7.0, T0 + 900, "edge", "hub.v1", T0 + 800)])]
    older: Rows = [(("power_kw",), [("PV-1", T0, 1.0, T0 + 950, "edge", "hub.v1", T0 + 100)])]
    resent: Rows = [(("power_kw",), [("PV-1", T0, 3.0, T0 + 990, "edge", "hub.v1", T0 + 850)])]

    async def once(rows: Rows) -> None:
        sink = InfluxSink(config)
        await sink.start()
        await sink.write_rows(rows, 0)
        await sink.close()

    asyncio.run(once(newer))
    asyncio.run(once(older))  # a new sink, as after a restart: the older version is left out
    series = own_influxd.query('SELECT "power_kw", "energy_kwh" FROM "readings"', config.store.influxdb.database)
    assert series[0]["values"] == [[T0, 2.0, 7.0]]
    asyncio.run(once(resent))  # a newer one without energy replaces the whole reading
    series = own_influxd.query('SELECT "power_kw", "energy_kwh" FROM "readings"', config.store.influxdb.database)
    assert series[0]["values"] == [[T0, 3.0, None]]
