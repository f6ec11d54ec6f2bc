"""The example configs in deploy/ load as they are (a key misspelled there would stop a host copying them),
and the InfluxDB one is the production example with only its store section changed."""

from __future__ import annotations

from pathlib import Path

import msgspec

from hubd.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_the_production_example_loads() -> None:
    config = load_config(DEPLOY / "hubd.yaml")
    assert config.store.backend == "sqlite" and config.data_dir == "/var/lib/hubd"


def test_the_influxdb_example_loads_and_differs_only_in_its_store() -> None:
    sqlite, influx = load_config(DEPLOY / "hubd.yaml"), load_config(DEPLOY / "hubd-influxdb.yaml")
    assert influx.store.backend == "influxdb"
    section = influx.store.influxdb
    assert (section.url, section.database, section.username) == ("http://127.0.0.1:8086", "hubd", "hubd")
    assert section.password_file == "/etc/hubd/influx.password" and section.token_file is None
    assert section.spool_path == "/var/lib/hubd/influx-spool.sqlite3"
    assert msgspec.structs.replace(influx, store=sqlite.store) == sqlite
