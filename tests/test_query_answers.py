"""What a user reads back from a query: one column per aggregation, unknown DERs named, CSV with its header,
and command-line errors that name the option as it was typed."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from hubd.auth.registry import Registry
from hubd.cli import main
from hubd.config import QueryConfig, load_config
from hubd.model import HubError
from hubd.query.conditions import parse_query
from hubd.query.execute import run
from hubd.store import StoredReading
from hubd.store.sqlite import SqliteStore

CONFIG = QueryConfig(max_limit=1000, default_limit=1000, max_der_ids=10)
START, END = "1970-01-01T00:00:00Z", "1970-01-01T02:00:00Z"
DAY = ["--start", START, "--end", END]


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """A hub's files with PV-1 registered and two hours of readings every 10 minutes (power_kw = the minute)."""
    path = tmp_path / "hubd.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data")}), encoding="utf-8")
    config = load_config(str(path))
    registry = Registry(config.registry_path)
    registry.add_der("PV-1", 0, {"type": "pv"})
    registry.close()
    store = SqliteStore(config.readings_path)
    readings = [
        StoredReading("PV-1", m * 60_000, {"power_kw": float(m), "energy_kwh": 100.0 + m}, 0, "test", "hub.v1")
        for m in range(0, 120, 10)
    ]
    store.write(readings, stored_at=0)
    store.close()
    return path


def hubd_query(config_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config_path), "query", *args])


def ask(config_path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One answer as hub/v1/query gives it, against the registry and store of ``config_path``."""
    config = load_config(str(config_path))
    registry, store = Registry(config.registry_path), SqliteStore(config.readings_path)
    try:
        return run(parse_query(request, CONFIG, registry.ders()), store)
    finally:
        store.close()
        registry.close()


# -- several aggregations of one field -----------------------------------------------------------------------------


def test_several_aggregations_of_a_field_get_a_column_each(config_path: Path) -> None:
    hourly = {"start": START, "end": END, "interval": "1h"}
    answer = ask(config_path, {**hourly, "agg": {"power_kw": ["min", "max", "mean", "count"], "energy_kwh": "max"}})
    first = answer["rows"][0]
    assert first == {
        "der_id": "PV-1",
        "bucket_start": "1970-01-01T00:00:00.000Z",
        "power_kw_min": 0.0,
        "power_kw_max": 50.0,
        "power_kw_mean": 25.0,
        "power_kw_count": 6,
        "energy_kwh": 150.0,  # aggregated one way: the field's own name, as before
        "n": 6,
    }
    # delta comes from the register's edges, max from the readings: neither stands in for the other.
    both = ask(config_path, {**hourly, "agg": {"energy_kwh": ["delta", "max"]}})["rows"][0]
    assert both["energy_kwh_max"] == 150.0 and both["energy_kwh_delta"] == pytest.approx(60.0)


def test_the_command_line_gives_each_aggregation_its_column(config_path: Path) -> None:
    hourly = [*DAY, "--interval", "1h", "--agg", "power_kw=min", "--agg", "power_kw=max"]
    result = hubd_query(config_path, *hourly, "--format", "csv")
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["power_kw_min"], r["power_kw_max"]) for r in table] == [("0.0", "50.0"), ("60.0", "110.0")]

    counted = hubd_query(config_path, *DAY, "--interval", "1h", "--agg", "power_kw=mean", "--agg", "power_kw=count")
    assert '"power_kw_mean":25.0,"power_kw_count":6' in counted.stdout

    shown = hubd_query(config_path, *hourly, "--table")
    lines = shown.stdout.splitlines()
    assert lines[0] == "power_kw_min by bucket (UTC)"
    assert lines[2].split() == ["PV-1", "0.000", "60.000"]


# -- unknown DERs -------------------------------------------------------------------------------------------------


def test_unknown_der_ids_are_named_beside_the_rows(config_path: Path) -> None:
    answer = ask(config_path, {"start": START, "end": END, "der_ids": ["PV-1", "NOPE-1"], "limit": 5})
    assert answer["unknown_der_ids"] == ["NOPE-1"] and answer["count"] == 5 and answer["next_cursor"]
    assert "unknown_der_ids" not in ask(config_path, {"start": START, "end": END, "der_ids": ["PV-1"]})


def test_a_query_naming_only_unknown_ders_is_refused_not_empty(config_path: Path) -> None:
    with pytest.raises(HubError) as caught:
        ask(config_path, {"start": START, "end": END, "der_ids": ["NOPE-1", "NOPE-2"]})
    assert caught.value.code.value == "unknown_der"
    assert "NOPE-1, NOPE-2" in caught.value.message

    result = hubd_query(config_path, *DAY, "--der", "NOPE-1")
    assert result.exit_code == 1
    assert "--der names no DER this hub knows: NOPE-1" in result.stderr


def test_the_command_line_names_unknown_ders_on_stderr(config_path: Path) -> None:
    result = hubd_query(config_path, *DAY, "--der", "NOPE-1", "--der", "PV-1")
    assert result.exit_code == 0
    assert result.stderr == "unknown DER, left out: NOPE-1\n"
    assert len(result.stdout.splitlines()) == 12


# -- CSV header ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "header"),
    [
        (["--field", "power_kw"], "der_id,measured_at,power_kw"),
        (
            ["--interval", "30m", "--agg", "power_kw=min", "--agg", "power_kw=max"],
            "der_id,bucket_start,slot,power_kw_min,power_kw_max,n",
        ),
        (["--interval", "1h"], "der_id,bucket_start,power_kw,n"),
    ],
)
def test_csv_has_its_header_also_without_rows(config_path: Path, options: list[str], header: str) -> None:
    result = hubd_query(
        config_path, "--start", "1971-01-01T00:00:00Z", "--end", "1971-01-02T00:00:00Z", *options, "--format", "csv"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [header]


# -- errors name the option ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--end", END], "--start is required (or --at, for one instant)"),
        (["--start", START], "--end is required (or --at, for one instant)"),
        (["--start", END, "--end", START], "--end must be after --start"),
        (["--start", "1970-01-01T00:00:00", "--end", END], "--start"),
        ([*DAY, "--agg", "power_kw=min"], "--agg goes with --interval"),
        ([*DAY, "--tz", "Asia/Tokyo"], "--tz goes with --interval"),
        ([*DAY, "--interval", "1h", "--tz", "Mars/Olympus"], "--tz: unknown time zone 'Mars/Olympus'"),
        ([*DAY, "--interval", "1h", "--agg", "power_kw=median"], "--agg power_kw: unknown aggregation 'median'"),
        ([*DAY, "--interval", "1h", "--agg", "power_kw=delta"], "--agg power_kw: delta is for energy_kwh"),
        ([*DAY, "--interval", "1h", "--agg", "colour=mean"], "--agg: unknown field 'colour'"),
        ([*DAY, "--interval", "1h", "--field", "power_kw", "--agg", "soc_pct=mean"], "which --field leaves out"),
        (["--at", START, "--start", START], "--at asks for one instant: leave out --start, --end and --interval"),
        ([*DAY, "--tolerance", "5"], "--tolerance goes with --at"),
        (["--at", START, "--tolerance", "100000"], "--tolerance must be 0 … 86400"),
        ([*DAY, "--bbox", "140,35,139,36"], "--bbox must be [min_lon, min_lat, max_lon, max_lat] with min <= max"),
        ([*DAY, *[f"--der=PV-{i}" for i in range(1001)]], "at most 1000 --der per query, got 1001"),
    ],
)
def test_command_line_errors_name_the_option(config_path: Path, options: list[str], message: str) -> None:
    result = hubd_query(config_path, *options)
    assert result.exit_code == 1
    assert message in result.stderr, result.stderr
