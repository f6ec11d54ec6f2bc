"""InfluxDB with authentication: the hub's user and password come from a file and reach InfluxDB, and the
password is in no log line, error or status output, also when InfluxDB refuses it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from influx_server import InfluxServer
from loguru import logger

from hubd.cli import main
from hubd.config import Config, ConfigError, parse_config
from hubd.store.influx.query import InfluxQuery
from hubd.store.influx.sink import InfluxSink

ADMIN = ("admin", "admin-secret-4d1f")
PASSWORD = "hub-secret-9c2e7a"
T0 = 1748736000000


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[InfluxServer]:
    """A server with authentication on: an admin, the database, and the hub's user with rights on it."""
    server = InfluxServer(tmp_path / "influxd", auth=True)
    server.start()
    try:
        server.query(f"CREATE USER {ADMIN[0]} WITH PASSWORD '{ADMIN[1]}' WITH ALL PRIVILEGES")
        server.query('CREATE DATABASE "hub"', auth=ADMIN)
        server.query(f"CREATE USER hubd WITH PASSWORD '{PASSWORD}'", auth=ADMIN)
        server.query('GRANT ALL ON "hub" TO hubd', auth=ADMIN)
        yield server
    finally:
        server.stop()


def test_the_password_file_reaches_influxdb_and_no_log_or_output(tmp_path: Path, secured: InfluxServer) -> None:
    """Right: stored. Wrong at start: hubd stops with one line (a configuration to mend). Refused later (the
    password changed in InfluxDB while the hub runs): nothing lost, the batch waits in the spool."""
    lines: list[str] = []
    handler = logger.add(lines.append, level="DEBUG")
    try:
        for name, password in (("right", PASSWORD), ("wrong", "not-the-" + PASSWORD), ("changed", PASSWORD)):
            secret = tmp_path / f"{name}.password"
            secret.write_text(password + "\n")
            influx = {"url": secured.url, "database": "hub", "username": "hubd", "password_file": str(secret)}
            data = tmp_path / name
            config = parse_config({"data_dir": str(data), "store": {"backend": "influxdb", "influxdb": influx}})

            async def write(config: Config, change: bool) -> int:
                sink = InfluxSink(config)
                await sink.start()
                if change:
                    secured.query(f"SET PASSWORD FOR hubd = 'other-{PASSWORD}'", auth=ADMIN)
                await sink.write_rows([(("power_kw",), [("PV-1", T0, 1.5, T0, "edge", "hub.v1", T0)])], 0)
                spooled = sink.spooled
                await sink.close()
                return spooled

            if name == "wrong":
                with pytest.raises(ConfigError, match="InfluxDB answered 401") as refused:
                    asyncio.run(write(config, False))
                assert PASSWORD not in str(refused.value)
                continue
            spooled = asyncio.run(write(config, name == "changed"))
            path = tmp_path / f"{name}.yaml"
            path.write_text(json.dumps({"data_dir": str(data), "store": {"backend": "influxdb", "influxdb": influx}}))
            status = CliRunner().invoke(main, ["--config", str(path), "store", "status"]).output
            if name == "right":
                assert spooled == 0
                query = InfluxQuery(config.store.influxdb)
                try:
                    assert query.count() == 1
                finally:
                    query.close()
            else:  # refused credentials while running: nothing lost, the batch waits in the spool
                assert spooled == 1 and "spooled_readings: 1" in status
            assert PASSWORD not in status
    finally:
        logger.remove(handler)
    assert any("401" in line for line in lines)  # the refusal was logged …
    assert not any(PASSWORD in line for line in lines)  # … without the password, right or wrong
