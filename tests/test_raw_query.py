"""Raw extraction on the SQLite store: order, filters and a cursor that survives new data between pages."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hubd.auth.registry import Registry
from hubd.config import QueryConfig
from hubd.model import HubError
from hubd.query.conditions import decode_cursor, parse_query
from hubd.query.execute import run
from hubd.store import StoredReading
from hubd.store.sqlite import SqliteStore

CONFIG = QueryConfig(max_limit=50, default_limit=10, max_der_ids=3)


def stored(der_id: str, minute: int, power: float = 1.0) -> StoredReading:
    return StoredReading(der_id, minute * 60_000, {"power_kw": power}, 0, "edge", "hub.v1")


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    db = SqliteStore(tmp_path / "readings.sqlite3")
    # Written out of order, as readings arrive in the field.
    db.write([stored(d, m) for m in (5, 1, 3, 0, 4, 2) for d in ("B", "A", "C")], stored_at=1)
    return db


def request(**extra: object) -> dict[str, object]:
    return {"start": 0, "end": 10 * 60_000, **extra}


def test_rows_come_in_measurement_order_and_replace_on_resend(store: SqliteStore) -> None:
    store.write([stored("A", 0, power=9.0)], stored_at=2)
    rows = run(parse_query(request(limit=50), CONFIG, {}), store)["rows"]
    assert [(r["der_id"], r["measured_at"][11:16]) for r in rows[:4]] == [
        ("A", "00:00"),
        ("B", "00:00"),
        ("C", "00:00"),
        ("A", "00:01"),
    ]
    assert len(rows) == 18 and rows[0]["power_kw"] == 9.0


def test_paging_loses_and_repeats_nothing_while_data_arrives(store: SqliteStore) -> None:
    query = parse_query(request(limit=4), CONFIG, {})
    seen: list[tuple[str, str]] = []
    answer = run(query, store)
    while True:
        seen += [(r["der_id"], r["measured_at"]) for r in answer["rows"]]
        if answer["next_cursor"] is None:
            break
        # A late reading lands before the cursor, one after it: the first is not repeated, the second is seen.
        store.write([stored("D", 0), stored("D", 9)], stored_at=3)
        answer = run(replace(query, cursor=decode_cursor(answer["next_cursor"], "raw")), store)
    assert len(seen) == len(set(seen)) == 19
    assert ("D", "1970-01-01T00:09:00.000Z") in seen


def test_filters_by_der_and_field(store: SqliteStore, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "hub.sqlite3")
    for der_id in ("A", "B", "C"):
        registry.add_der(der_id, 0, {"type": "pv"})
    rows = run(parse_query(request(der_ids=["C"], fields=["power_kw"]), CONFIG, registry.ders()), store)["rows"]
    registry.close()
    assert {r["der_id"] for r in rows} == {"C"}
    assert all(set(r) == {"der_id", "measured_at", "power_kw"} for r in rows)


@pytest.mark.parametrize(
    ("conditions", "fragment"),
    [
        ({"end": 0}, "end must be after start"),
        ({"fields": ["power"]}, "fields: unknown value 'power'"),
        ({"der_ids": ["A", "B", "C", "D"]}, "at most 3 der_ids"),
        ({"cursor": "not-a-cursor"}, "cursor is not one this hub issued"),
        ({"limit": 0}, "limit must be a positive integer"),
        ({"start": "2026-11-27T00:00:00"}, "no UTC offset"),
        ({"colour": "red"}, "unknown condition 'colour'"),
        ({"interval": "7m"}, "interval must be one of"),
        ({"interval": "30m", "agg": {"power_kw": "median"}}, "unknown aggregation 'median'"),
        ({"interval": "30m", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"interval": "30m", "agg": {"power_kw": "delta"}}, "delta is for energy_kwh"),
        ({"where": {"power_kw": {"about": 1}}}, "unknown operator 'about'"),
        ({"types": ["spaceship"]}, "types: unknown value 'spaceship'"),
        ({"bbox": [140, 35, 139, 36]}, "min <= max"),
        ({"tz": "Asia/Tokyo"}, "tz goes with interval"),
        ({"interval": "1h", "fields": ["power_kw"], "agg": {"soc_pct": "mean"}}, "agg names 'soc_pct'"),
    ],
)
def test_bad_conditions_are_named(conditions: dict[str, object], fragment: str) -> None:
    with pytest.raises(HubError) as caught:
        parse_query(request(**conditions), CONFIG, {})
    assert caught.value.code.value == "bad_request"
    assert fragment in caught.value.message


def test_limit_is_capped_by_config() -> None:
    assert parse_query(request(limit=10_000), CONFIG, {}).limit == 50
