"""The store factory: ``store.backend`` gives a sink and a query side that meet in the same readings, and a
backend nobody registered is refused with one line naming the key."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import get_args, get_type_hints

import msgspec
import pytest

from hubd.config import Config, ConfigError, StoreConfig, parse_config
from hubd.store import Rows, StoredReading, add_rows
from hubd.store.factory import BACKENDS, open_query, open_sink


def rows(*readings: StoredReading) -> Rows:
    out: Rows = []
    for r in readings:
        add_rows(out, (r,), (r.received_at, r.source_id, r.format_code, r.sent_at))
    return out


async def write(config: Config, *batches: Rows) -> None:
    sink = open_sink(config)
    await sink.start()
    try:
        for batch in batches:
            await sink.write_rows(batch, stored_at=2_000)
    finally:
        await sink.close()


def test_sqlite_sink_and_query_meet_in_the_same_readings(tmp_path: Path) -> None:
    config = parse_config({"data_dir": str(tmp_path), "store": {"backend": "sqlite"}})
    first = StoredReading("PV-1", 60_000, {"power_kw": 1.5, "energy_kwh": 10.0}, 1_000, "edge", "hub.v1")
    again = dataclasses.replace(first, values={"power_kw": 2.5, "energy_kwh": 10.25}, received_at=1_500)
    other = StoredReading("PV-2", 60_000, {"power_kw": 0.5}, 1_000, "edge", "hub.v1")
    # The same DER and time sent twice, the second time with other values: the later one stays, once.
    asyncio.run(write(config, rows(first, other), rows(again), rows(again)))
    query = open_query(config)
    try:
        assert query.count() == 2
        assert query.raw(0, 120_000, None, ("power_kw", "energy_kwh"), (), None, 10) == [
            ("PV-1", 60_000, 2.5, 10.25, None, None),  # no clock flag, no offset
            ("PV-2", 60_000, 0.5, None, None, None),
        ]
        assert query.der_ids(0, 120_000, "") == ["PV-1", "PV-2"]
        assert query.nearest("PV-1", "energy_kwh", 120_000, before=True) == (60_000, 10.25)
    finally:
        query.close()


def test_a_backend_the_config_does_not_know_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": {"backend": "cassandra"}}, "hubd.yaml")
    assert "store.backend" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("opener", [open_sink, open_query])
def test_a_backend_built_in_code_but_not_registered_is_refused(opener: Callable[[Config], object]) -> None:
    config = Config()
    config = msgspec.structs.replace(config, store=msgspec.structs.replace(config.store, backend="nosuch"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^store\.backend: no such backend 'nosuch' \(known: influxdb, sqlite\)$"):
        opener(config)


def test_every_backend_the_config_accepts_has_a_factory_entry() -> None:
    """``store.backend``'s values and the factory's registry are one list kept in two places."""
    assert sorted(get_args(get_type_hints(StoreConfig)["backend"])) == sorted(BACKENDS)


def test_store_status_names_the_backend_and_its_file(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hubd.cli import main

    path = tmp_path / "hubd.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["--config", str(path), "store", "status"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["backend: sqlite", f"path: {tmp_path / 'data' / 'readings.sqlite3'}"]
