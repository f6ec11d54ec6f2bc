"""Replays: a reading's version is its sender's send time (``sent_at``), not the order messages arrive in.

Against a real hub and a real Mosquitto: a captured message published again later, byte for byte, must not undo
the DER's correction; the same message sent twice stores it once; a message without a send time cannot beat
one that had it; a send time far ahead of the hub's clock is refused, since it would outrank every correction.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningHub
from helpers import quarantined, records, rr_bytes

from hubd import client as client_module
from hubd.client import HubClient
from hubd.model import format_time, now_ms, parse_time
from hubd.store import StoredReading
from hubd.store.sqlite import SqliteStore

MEASURED = "2026-11-27T09:05:00+09:00"


def message(password: str, power: float, sent_at: str | None, der_id: str = "PV-R1") -> bytes:
    body: dict[str, Any] = {
        "source_id": "edge-r",
        "readings": [{"der_id": der_id, "password": password, "measured_at": MEASURED, "power_kw": power}],
    }
    if sent_at is not None:
        body["sent_at"] = sent_at
    return json.dumps(body).encode()


def stored(hub: RunningHub, der_id: str = "PV-R1") -> list[tuple[Any, ...]]:
    """What the store holds for the DER: (power_kw, sent_at) per reading, read as a user with sqlite3 would."""
    db = sqlite3.connect(hub.config.readings_path)
    try:
        return db.execute("SELECT power_kw, sent_at FROM readings WHERE der_id = ?", (der_id,)).fetchall()
    finally:
        db.close()


def queried(hub: RunningHub, market: str) -> list[tuple[str, float]]:
    """The DER's readings as the market system's query returns them."""
    answer = hub.rr(
        f"{hub.prefix}/query",
        {"client_id": "market-1", "password": market, "start": "2026-11-27T00:00:00Z", "end": "2026-11-28T00:00:00Z"},
    )
    assert answer["ok"], answer
    return [(row["measured_at"], row["power_kw"]) for row in answer["rows"]]


def test_a_replayed_old_message_never_overwrites_the_later_correction(hub: RunningHub, tmp_path: Path) -> None:
    password = hub.register("PV-R1")
    market = hub.consumer()
    data = f"{hub.prefix}/data"
    first = message(password, 1.0, "2026-11-27T00:06:00Z")
    correction = message(password, 2.0, "2026-11-27T00:07:00.000Z")
    assert rr_bytes(hub, data, first, tmp_path) == {"ok": True, "accepted": 1, "rejected": []}
    assert rr_bytes(hub, data, correction, tmp_path) == {"ok": True, "accepted": 1, "rejected": []}

    # The captured first message, published again byte for byte: answered like any reading the hub already has
    # in a newer version (accepted: nothing for the sender to send again), and the correction stays.
    assert rr_bytes(hub, data, first, tmp_path) == {"ok": True, "accepted": 1, "rejected": []}
    assert queried(hub, market) == [("2026-11-27T00:05:00.000Z", 2.0)]
    assert stored(hub) == [(2.0, 1795738020000)]


def test_the_same_message_sent_again_is_stored_once(hub: RunningHub, tmp_path: Path) -> None:
    """An edge that got no answer sends the same message again (same sent_at): one reading, the same value."""
    password = hub.register("PV-R1")
    market = hub.consumer()
    sent = message(password, 4.5, "2026-11-27T00:06:00Z")
    for _ in range(3):
        assert rr_bytes(hub, f"{hub.prefix}/data", sent, tmp_path) == {"ok": True, "accepted": 1, "rejected": []}
    assert queried(hub, market) == [("2026-11-27T00:05:00.000Z", 4.5)]
    assert stored(hub) == [(4.5, 1795737960000)]


def test_a_message_without_a_send_time_never_replaces_one_with_it(hub: RunningHub, tmp_path: Path) -> None:
    """A replay stripped of its sent_at (or an old edge's message) is older than any reading sent with one; between
    messages without one, the later arrival wins, as before versions."""
    password = hub.register("PV-R1")
    other = hub.register("PV-R2")
    data = f"{hub.prefix}/data"
    rr_bytes(hub, data, message(password, 2.0, "2026-11-27T00:07:00Z"), tmp_path)
    assert rr_bytes(hub, data, message(password, 1.0, None), tmp_path) == {"ok": True, "accepted": 1, "rejected": []}
    assert stored(hub) == [(2.0, 1795738020000)]

    rr_bytes(hub, data, message(other, 1.0, None, "PV-R2"), tmp_path)
    rr_bytes(hub, data, message(other, 3.0, None, "PV-R2"), tmp_path)
    assert stored(hub, "PV-R2") == [(3.0, None)]
    # and any send time, even one older than the hub's own clock by years, beats no send time
    rr_bytes(hub, data, message(other, 5.0, "2020-01-01T00:00:00Z", "PV-R2"), tmp_path)
    assert stored(hub, "PV-R2") == [(5.0, 1577836800000)]


def test_a_send_time_ahead_of_the_hub_or_not_a_time_refuses_the_message(hub: RunningHub, tmp_path: Path) -> None:
    """A sent_at far ahead would make its readings the newest version for good: refused whole, kept, audited."""
    password = hub.register("PV-R1")
    data = f"{hub.prefix}/data"
    ahead = format_time(now_ms() + 3_600_000)
    for sent_at, reason in ((ahead, "sent_at is more than 300 s in the future"), ("yesterday", "not an RFC 3339")):
        answer = rr_bytes(hub, data, message(password, 9.0, sent_at), tmp_path)
        assert answer["ok"] is False and answer["error"]["code"] == "bad_request", answer
        assert reason in answer["error"]["message"]
    assert stored(hub) == []
    kept = quarantined(hub)
    assert [entry["code"] for entry in kept.values()] == ["bad_request", "bad_request"]
    assert [r["outcome"] for r in records(hub, "data.quarantined")] == ["bad_request", "bad_request"]
    # the hub keeps serving: the same reading with an honest send time is stored
    assert rr_bytes(hub, data, message(password, 9.0, format_time(now_ms())), tmp_path)["accepted"] == 1


def test_the_user_property_sent_at_versions_a_message_without_one_in_its_body(hub: RunningHub) -> None:
    """For payloads with no place for it (vendor formats), the MQTT v5 user property ``sent_at`` carries it:
    RFC 3339 or epoch milliseconds. The body's own ``sent_at`` wins over the property."""
    password = hub.register("PV-R1")
    data = f"{hub.prefix}/data"

    async def send() -> list[dict[str, Any]]:
        async with HubClient(hub.broker.url, "edge") as edge:
            return [
                await edge.request(data, message(password, 2.0, None), properties={"sent_at": "1795738020000"}),
                await edge.request(data, message(password, 1.0, None), properties={"sent_at": "2026-11-27T00:06:00Z"}),
                await edge.request(
                    data, message(password, 0.5, "2026-11-27T00:05:00Z"), properties={"sent_at": "1795738080000"}
                ),
                await edge.request(data, message(password, 3.0, None), properties={"sent_at": "soon"}),
            ]

    first, older, body_wins, bad = asyncio.run(send())
    assert first["accepted"] == older["accepted"] == body_wins["accepted"] == 1
    assert bad["ok"] is False and bad["error"]["code"] == "bad_request"
    assert stored(hub) == [(2.0, 1795738020000)]


def test_the_edge_client_sends_its_send_time_and_a_resend_keeps_it(hub: RunningHub) -> None:
    password = hub.register("PV-R1")
    body: dict[str, Any] = {
        "source_id": "edge-r",
        "readings": [{"der_id": "PV-R1", "password": password, "measured_at": MEASURED, "power_kw": 1.0}],
    }

    async def send() -> tuple[str, str]:
        async with HubClient(hub.broker.url, "edge") as edge:
            await edge.request(f"{hub.prefix}/data", body)
            first = body["sent_at"]
            await asyncio.sleep(0.01)
            await edge.request(f"{hub.prefix}/data", body)  # sent again: the same version
            return first, body["sent_at"]

    first, again = asyncio.run(send())
    assert first == again and first.endswith("Z")
    assert stored(hub) == [(1.0, parse_time(first))]
    assert abs(parse_time(first) - now_ms()) < 60_000


def test_a_database_made_before_versions_gains_the_column_and_keeps_its_readings(tmp_path: Path) -> None:
    """An existing readings table (no sent_at) is migrated when the store opens it: its readings stay, count as
    sent without a version, and a reading sent with one replaces them."""
    path = tmp_path / "readings.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE readings (der_id TEXT NOT NULL, measured_at INTEGER NOT NULL, energy_kwh REAL, "
        "energy_interval_kwh REAL, interval_s REAL, power_kw REAL, reactive_power_kvar REAL, voltage_v REAL, "
        "current_a REAL, power_factor REAL, frequency_hz REAL, soc_pct REAL, received_at INTEGER NOT NULL, "
        "stored_at INTEGER NOT NULL, source_id TEXT NOT NULL, format_code TEXT NOT NULL, "
        "PRIMARY KEY (der_id, measured_at)) WITHOUT ROWID;"
        "INSERT INTO readings (der_id, measured_at, power_kw, received_at, stored_at, source_id, format_code) "
        "VALUES ('PV-1', 60000, 1.0, 5000, 5000, 'edge', 'hub.v1'), ('PV-2', 60000, 1.0, 5000, 5000, 'edge', 'hub.v1');"
    )
    db.close()
    store = SqliteStore(path)
    again = SqliteStore(path)  # a second connection (the hub's query side) finds it done
    try:
        assert store.count() == 2
        store.write([StoredReading("PV-1", 60_000, {"power_kw": 2.0}, 1_000, "edge", "hub.v1", sent_at=900)], 1)
        store.write([StoredReading("PV-2", 60_000, {"power_kw": 2.0}, 1_000, "edge", "hub.v1")], 1)
        rows = again.raw(0, 120_000, None, ("power_kw",), (), None, 10)
    finally:
        store.close()
        again.close()
    # PV-1: a versioned reading replaces the unversioned one; PV-2: unversioned, received earlier, does not
    assert [row[:3] for row in rows] == [("PV-1", 60_000, 2.0), ("PV-2", 60_000, 1.0)]


def test_a_correction_sent_after_the_edges_clock_stepped_back_still_wins(
    hub: RunningHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge's system clock is stepped back a minute between a reading and its correction (NTP, or the hub's
    set command): HubClient's send times never go backwards, so the correction is still the newer version."""
    password = hub.register("PV-R1")
    clock = [now_ms()]
    monkeypatch.setattr(client_module, "now_ms", lambda: clock[0])

    def body(power: float) -> dict[str, Any]:
        sent = {"der_id": "PV-R1", "password": password, "measured_at": MEASURED, "power_kw": power}
        return {"source_id": "edge-r", "readings": [sent]}

    async def send() -> tuple[str, str]:
        async with HubClient(hub.broker.url, "edge") as edge:
            first, correction = body(1.0), body(2.0)
            await edge.request(f"{hub.prefix}/data", first)
            clock[0] -= 60_000
            await edge.request(f"{hub.prefix}/data", correction)
            return first["sent_at"], correction["sent_at"]

    first, correction = asyncio.run(send())
    assert parse_time(correction) == parse_time(first) + 1
    assert stored(hub) == [(2.0, parse_time(correction))]
