"""``hubd store migrate --from sqlite --to influxdb``: an embedded store copied whole, and a copy cut short by
InfluxDB going away resumes where it stopped, with the same readings in the end on both."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from influx_server import InfluxServer, fresh_database, own_influxd  # noqa: F401 - the fixture

from hubd.cli import main
from hubd.config import load_config
from hubd.store import StoredReading
from hubd.store.influx.query import InfluxQuery
from hubd.store.sqlite import SqliteStore

T0 = 1748736000000
FIELDS = ("power_kw", "energy_kwh")


def hubd(config_path: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--config", str(config_path), *args])


def test_a_migration_cut_short_resumes_and_copies_every_reading_once(
    tmp_path: Path,
    own_influxd: InfluxServer,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = fresh_database(own_influxd)
    config_path = tmp_path / "hubd.yaml"
    influx = {"url": own_influxd.url, "database": database}
    config_path.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "store": {"influxdb": influx}}))
    config = load_config(str(config_path))
    store = SqliteStore(config.readings_path)
    readings = [
        StoredReading(
            f"PV-{d}", T0 + i * 60_000, {"power_kw": i / 10, "energy_kwh": 100.0 + i}, T0, "edge", "hub.v1", T0 + i
        )
        for d in range(4)
        for i in range(300)
    ]
    store.write(readings, 0)
    monkeypatch.setattr("hubd.store.migrate.CHUNK", 100)

    @contextlib.contextmanager
    def killing_bar(length: int, label: str) -> Iterator[Callable[[int], None]]:
        def reached(copied: int) -> None:
            if copied >= 500:
                own_influxd.kill()  # InfluxDB goes away in the middle of the copy

        yield reached

    with monkeypatch.context() as patched:
        patched.setattr("hubd.store.commands.progress.bar", killing_bar)
        cut = hubd(config_path, "store", "migrate", "--from", "sqlite", "--to", "influxdb")
    assert cut.exit_code == 1 and "run the same command again to resume" in cut.output
    own_influxd.start()
    resumed = hubd(config_path, "store", "migrate", "--from", "sqlite", "--to", "influxdb")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after 500 readings" in resumed.output and "copied 1200 readings" in resumed.output
    again = hubd(config_path, "store", "migrate", "--from", "sqlite", "--to", "influxdb")
    assert "already copied: 1200 readings" in again.output
    query = InfluxQuery(config.store.influxdb)
    try:
        assert query.count() == 1200
        whole = (T0, T0 + 86_400_000, None, FIELDS, (), None, 10_000)
        assert query.raw(*whole) == store.raw(*whole)
    finally:
        query.close()
        store.close()
