"""The market system's view: a fleet sends late, out of order and twice; settlement comes back right over MQTT."""

from __future__ import annotations

import json
import math
import random
from typing import Any

from conftest import RunningHub

from hubd.model import format_time, parse_time

DAY = parse_time("2026-11-26T15:00:00Z")  # midnight of 2026-11-27 in Tokyo
KWH_PER_HOUR = {"PV-A": 2.0, "PV-B": 3.0}


def register_value(der_id: str, at: int) -> float:
    """The register of a DER producing a steady KWH_PER_HOUR, reset to zero at 06:00 Tokyo for PV-B."""
    hours = (at - DAY) / 3_600_000
    if der_id == "PV-B" and hours >= 6:
        return KWH_PER_HOUR[der_id] * (hours - 6)
    return 500.0 + KWH_PER_HOUR[der_id] * hours


def test_settlement_slots_through_mosquitto_rr(hub: RunningHub) -> None:
    passwords = {der_id: hub.register(der_id, "pv", location={"area": "feeder-1"}) for der_id in KWH_PER_HOUR}
    market = hub.consumer()
    readings = [
        {
            "der_id": d,
            "password": passwords[d],
            "measured_at": format_time(t),
            "energy_kwh": register_value(d, t),
            "power_kw": KWH_PER_HOUR[d],
        }
        for d in KWH_PER_HOUR
        for t in range(DAY - 600_000, DAY + 12 * 3_600_000 + 600_000, 5 * 60_000)
    ]
    rng = random.Random(3)
    rng.shuffle(readings)  # late and out of order
    resent = readings[:40]  # and some twice
    for start in range(0, len(readings), 100):
        assert hub.rr("hub/v1/data", {"source_id": "edge", "readings": readings[start : start + 100]})["ok"]
    assert hub.rr("hub/v1/data", {"source_id": "edge", "readings": resent})["accepted"] == 40

    request: dict[str, Any] = {
        "client_id": "market-1",
        "password": market,
        "start": "2026-11-27T00:00:00+09:00",
        "end": "2026-11-27T12:00:00+09:00",
        "interval": "30m",
        "tz": "Asia/Tokyo",
        "agg": {"energy_kwh": "delta", "power_kw": "mean"},
        "types": ["pv"],
        "limit": 20,
    }
    rows: list[dict[str, Any]] = []
    while True:
        answer = hub.rr("hub/v1/query", request)
        assert answer["ok"], answer
        rows += answer["rows"]
        if answer["next_cursor"] is None:
            break
        request["cursor"] = answer["next_cursor"]
    assert len(rows) == 2 * 24
    for row in rows:
        assert row["n"] == 6 and math.isclose(row["power_kw"], KWH_PER_HOUR[row["der_id"]])
        expected = KWH_PER_HOUR[row["der_id"]] / 2
        if row["der_id"] == "PV-B" and row["slot"] == 12:
            # The register reset at 06:00: what it counted between its 05:55 reading and the reset is gone with
            # it, so this slot is short by those 5 minutes (and never negative).
            expected -= KWH_PER_HOUR["PV-B"] * 5 / 60
        assert math.isclose(row["energy_kwh"], expected, rel_tol=1e-9), row
    assert [r["slot"] for r in rows if r["der_id"] == "PV-A"] == list(range(1, 25))

    table = hub.cli(
        "query",
        "--start",
        "2026-11-27T00:00:00+09:00",
        "--end",
        "2026-11-27T03:00:00+09:00",
        "--interval",
        "30m",
        "--agg",
        "energy_kwh=delta",
        "--tz",
        "Asia/Tokyo",
        "--table",
    )
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[1].split() == ["DER", "1", "2", "3", "4", "5", "6"]
    assert lines[2].split() == ["PV-A", *["1.000"] * 6] and lines[3].split() == ["PV-B", *["1.500"] * 6]

    # Several aggregations of one field, and a DER the hub does not know: named beside the rows, not dropped quietly.
    spread = hub.rr(
        "hub/v1/query",
        {
            "client_id": "market-1",
            "password": market,
            "start": "2026-11-27T00:00:00+09:00",
            "end": "2026-11-27T01:00:00+09:00",
            "interval": "1h",
            "der_ids": ["PV-A", "NOPE-1"],
            "agg": {"power_kw": ["min", "max"], "energy_kwh": "delta"},
        },
    )
    assert spread["unknown_der_ids"] == ["NOPE-1"], spread
    (hourly,) = spread["rows"]
    assert hourly["power_kw_min"] == hourly["power_kw_max"] == 2.0 and math.isclose(hourly["energy_kwh"], 2.0)
    nothing_known = hub.rr(
        "hub/v1/query", {"client_id": "market-1", "password": market, "start": 0, "end": 1, "der_ids": ["NOPE-1"]}
    )
    assert nothing_known["error"]["code"] == "unknown_der" and "NOPE-1" in nothing_known["error"]["message"]

    instant = hub.rr(
        "hub/v1/query",
        {
            "client_id": "market-1",
            "password": market,
            "at": "2026-11-27T09:02:00+09:00",
            "at_tolerance_s": 180,
            "fields": ["power_kw"],
        },
    )
    assert [(r["der_id"], r["measured_at"]) for r in instant["rows"]] == [
        ("PV-A", "2026-11-27T00:00:00.000Z"),
        ("PV-B", "2026-11-27T00:00:00.000Z"),
    ]
    assert json.dumps(instant).count(market) == 0
