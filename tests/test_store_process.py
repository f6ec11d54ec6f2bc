"""The store's writer process: commits before it answers, survives what it should, and a failed commit is
answered ``unavailable``, audited and kept in quarantine while the hub goes on serving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningHub
from helpers import at, quarantined, quarantined_bytes, reading, records

from hubd.audit import AuditLog
from hubd.store import Rows
from hubd.store import writer as writer_module
from hubd.store.process import StoreProcessError, WriterProcess
from hubd.store.sqlite import SqliteStore
from hubd.store.writer import BatchWriter, Write

NAMES = ("power_kw",)


def rows(*items: tuple[str, int, float]) -> Rows:
    return [(NAMES, [(der_id, minute * 60_000, power, 0, "edge", "hub.v1", None) for der_id, minute, power in items])]


class Writer:
    """A WriterProcess on an event loop of its own, driven from a plain test."""

    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.process = WriterProcess(path)
        self.loop.run_until_complete(self.process.start())

    def write_rows(self, rows: Rows, stored_at: int) -> None:
        self.loop.run_until_complete(self.process.write_rows(rows, stored_at))

    def close(self) -> None:
        self.loop.run_until_complete(self.process.close())
        self.loop.close()


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    process = Writer(tmp_path / "readings.sqlite3")
    try:
        yield process
    finally:
        process.close()


def stored(path: Path) -> list[tuple[str, int, float, int]]:
    reader = SqliteStore(path)
    try:
        found = reader.raw(0, 10**12, None, ("power_kw",), (), None, 100)
        stamps = reader._db.execute("SELECT DISTINCT stored_at FROM readings").fetchall()
    finally:
        reader.close()
    return [(d, t, p, len(stamps)) for d, t, p, *_ in found]


def child_pid(writer: Writer) -> int:
    assert writer.process._child is not None
    return writer.process._child.pid


def test_a_batch_is_readable_once_write_returns_and_a_resend_replaces(writer: Writer, tmp_path: Path) -> None:
    writer.write_rows(rows(("A", 1, 1.0), ("B", 1, 2.0)), stored_at=111)
    writer.write_rows(rows(("A", 1, 5.0)), stored_at=222)
    assert [r[:3] for r in stored(tmp_path / "readings.sqlite3")] == [("A", 60_000, 5.0), ("B", 60_000, 2.0)]


def test_of_two_readings_of_a_der_and_time_in_one_batch_the_later_wins(writer: Writer, tmp_path: Path) -> None:
    """Also when they carry different quantities, so are written by different statements."""
    tail = (0, "edge", "hub.v1", None)
    writer.write_rows(
        [
            (("power_kw",), [("A", 0, 1.0, *tail), ("B", 0, 1.0, *tail)]),
            (("power_kw", "energy_kwh"), [("A", 0, 2.0, 50.0, *tail)]),
            (("power_kw",), [("A", 0, 3.0, *tail)]),
        ],
        stored_at=1,
    )
    db = sqlite3.connect(tmp_path / "readings.sqlite3")
    found = db.execute("SELECT der_id, power_kw, energy_kwh FROM readings ORDER BY der_id").fetchall()
    db.close()
    assert found == [("A", 3.0, None), ("B", 1.0, None)]


def test_sigterm_and_sigint_leave_the_writer_serving(writer: Writer, tmp_path: Path) -> None:
    """systemd and a terminal's Ctrl-C signal the whole process group; the hub drains, so its writer must stay."""
    pid = child_pid(writer)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    writer.write_rows(rows(("A", 2, 1.0)), stored_at=1)
    assert child_pid(writer) == pid
    assert len(stored(tmp_path / "readings.sqlite3")) == 1


def test_a_dead_writer_is_replaced_for_the_next_batch(writer: Writer, tmp_path: Path) -> None:
    first = child_pid(writer)
    os.kill(first, signal.SIGKILL)
    assert writer.process._child is not None
    writer.process._child.wait()
    writer.write_rows(rows(("A", 3, 1.0)), stored_at=1)
    assert child_pid(writer) != first
    assert [r[:2] for r in stored(tmp_path / "readings.sqlite3")] == [("A", 180_000)]


def test_a_refused_batch_raises_and_the_writer_keeps_serving(writer: Writer, tmp_path: Path) -> None:
    pid = child_pid(writer)
    with pytest.raises(StoreProcessError, match="not quantities of the unified schema"):
        bad = ("A", 0, 1.0, 0, "edge", "hub.v1", None)
        writer.write_rows([(("power_kw; DROP TABLE readings",), [bad])], stored_at=1)
    writer.write_rows(rows(("A", 4, 1.0)), stored_at=1)
    assert child_pid(writer) == pid
    assert len(stored(tmp_path / "readings.sqlite3")) == 1


def test_a_store_that_cannot_be_opened_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the store's folder should be")
    with pytest.raises(StoreProcessError):
        Writer(tmp_path / "taken" / "readings.sqlite3")


def test_a_failed_commit_is_answered_unavailable_audited_and_quarantined(hub: RunningHub) -> None:
    """A commit SQLite refuses (here a trigger standing in for a full disk): the message is not lost."""
    pv1, pv2 = hub.register("PV-1"), hub.register("PV-2")
    db = sqlite3.connect(hub.config.readings_path)
    db.execute(
        "CREATE TRIGGER full_disk BEFORE INSERT ON readings WHEN NEW.der_id = 'PV-2' "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    db.commit()
    message = {"source_id": "edge-1", "readings": [reading("PV-2", pv2, at(0))]}
    answer = hub.rr("hub/v1/data", message)
    assert answer["ok"] is False and answer["error"]["code"] == "unavailable"
    assert "disk" not in answer["error"]["message"]  # the operator's detail goes to the log and audit only
    failed = records(hub, "store.failed")
    assert len(failed) == 1 and "database or disk is full" in str(failed[0]["reason"])
    [entry] = [e for e in quarantined(hub).values() if e["code"] == "unavailable"]
    assert pv2 not in entry["reason"]
    assert b'"PV-2"' in quarantined_bytes(hub, entry["id"])

    # The hub goes on serving others, and the same message is stored once the store takes writes again.
    assert hub.rr("hub/v1/data", {"readings": [reading("PV-1", pv1, at(60))]})["accepted"] == 1
    db.execute("DROP TRIGGER full_disk")
    db.commit()
    db.close()
    assert hub.rr("hub/v1/data", message)["accepted"] == 1
    query = {"client_id": "market-1", "password": hub.consumer(), "start": at(0), "end": at(3600)}
    assert sorted(r["der_id"] for r in hub.rr("hub/v1/query", query)["rows"]) == ["PV-1", "PV-2"]


def test_a_full_queue_holds_writers_back_and_then_takes_them_all(tmp_path: Path) -> None:
    """``store.queue_max_messages``: past it, a message waits for room instead of queueing; none is lost."""

    async def main() -> list[int]:
        store = WriterProcess(tmp_path / "readings.sqlite3")
        await store.start()
        audit = AuditLog(tmp_path / "audit.jsonl")
        writer = BatchWriter(store, audit, max_readings=1, queue_max_messages=1)
        writer.start()
        queued: list[int] = []

        async def one(minute: int) -> None:
            await writer.write([Write("edge", rows(("A", minute, 1.0)), 1, {"A"}, 1)])

        tasks = [asyncio.create_task(one(minute)) for minute in range(30)]
        while not all(t.done() for t in tasks):
            queued.append(writer._queued)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        await writer.close()
        await store.close()
        audit.close()
        reader = SqliteStore(tmp_path / "readings.sqlite3")
        count = reader.count()
        reader.close()
        return [max(queued), count]

    most_queued, count = asyncio.run(main())
    assert most_queued == 1 and count == 30


def test_a_reading_received_earlier_never_replaces_one_received_later(writer: Writer, tmp_path: Path) -> None:
    """A message that waited for bcrypt can commit after a later one of the same DER and time."""
    writer.write_rows([(("power_kw",), [("A", 0, 2.0, 200, "edge", "hub.v1", None)])], stored_at=1)
    writer.write_rows([(("power_kw", "energy_kwh"), [("A", 0, 1.0, 5.0, 100, "edge", "hub.v1", None)])], stored_at=2)
    writer.write_rows([(("energy_kwh",), [("B", 0, 7.0, 100, "edge", "hub.v1", None)])], stored_at=3)
    writer.write_rows([(("power_kw",), [("B", 0, 3.0, 300, "edge", "hub.v1", None)])], stored_at=4)
    db = sqlite3.connect(tmp_path / "readings.sqlite3")
    found = db.execute("SELECT der_id, power_kw, energy_kwh, received_at, stored_at FROM readings ORDER BY der_id")
    assert found.fetchall() == [("A", 2.0, None, 200, 1), ("B", 3.0, None, 300, 4)]
    db.close()


def test_across_quantity_sets_in_one_batch_a_row_received_earlier_never_replaces(
    writer: Writer, tmp_path: Path
) -> None:
    """A message that waited for bcrypt lands in the same batch as one received after it, with other quantities."""
    writer.write_rows(
        [
            (("power_kw",), [("A", 0, 2.0, 200, "edge", "hub.v1", None)]),
            (("power_kw", "energy_kwh"), [("A", 0, 1.0, 5.0, 100, "edge", "hub.v1", None)]),
        ],
        stored_at=1,
    )
    db = sqlite3.connect(tmp_path / "readings.sqlite3")
    found = db.execute("SELECT der_id, power_kw, energy_kwh, received_at FROM readings").fetchall()
    db.close()
    assert found == [("A", 2.0, None, 200)]


def test_in_a_batch_of_one_quantity_set_the_last_to_arrive_of_a_der_and_time_stays(
    writer: Writer, tmp_path: Path
) -> None:
    """Rows are sorted by key for the write; among rows of one key, the later arrival wins (same receive time),
    and a row received earlier never replaces one received later, wherever it sits in the batch."""
    writer.write_rows(
        [
            (NAMES, [("B", 0, 1.0, 100, "edge", "hub.v1", None), ("A", 0, 3.0, 100, "edge", "hub.v1", None)]),
            (NAMES, [("A", 0, 2.0, 100, "edge", "hub.v1", None), ("B", 0, 9.0, 50, "edge", "hub.v1", None)]),
            (NAMES, [("A", 0, 1.0, 100, "edge", "hub.v1", None)]),
        ],
        stored_at=1,
    )
    db = sqlite3.connect(tmp_path / "readings.sqlite3")
    found = db.execute("SELECT der_id, power_kw, received_at FROM readings ORDER BY der_id").fetchall()
    db.close()
    assert found == [("A", 1.0, 100), ("B", 1.0, 100)]


def test_writers_that_find_the_child_dead_together_share_one_new_child_in_call_order(tmp_path: Path) -> None:
    """Two batches in flight (as the batch writer sends them) when the child is found dead: one new child is
    started for both, both are committed, in the order they were written, and writing goes on."""

    async def main() -> tuple[list[int], list[int]]:
        process = WriterProcess(tmp_path / "readings.sqlite3")
        await process.start()
        try:
            pids = []
            for minute in range(3):
                assert process._child is not None
                pids.append(process._child.pid)
                os.kill(process._child.pid, signal.SIGKILL)
                await asyncio.to_thread(process._child.wait)
                first = asyncio.create_task(process.write_rows(rows(("A", minute, 1.0)), stored_at=1))
                await asyncio.sleep(0.01)  # the first is starting the new child when the second comes
                second = asyncio.create_task(process.write_rows(rows(("A", minute, 2.0)), stored_at=2))
                await asyncio.gather(first, second)
            await process.write_rows(rows(("B", 0, 3.0)), stored_at=3)
            assert process._child is not None
            return pids, [process._child.pid]
        finally:
            await process.close()

    pids, last = asyncio.run(main())
    assert len(set(pids + last)) == 4  # a new child after each death, one only
    db = sqlite3.connect(tmp_path / "readings.sqlite3")
    found = db.execute("SELECT der_id, measured_at, power_kw, stored_at FROM readings ORDER BY 1, 2").fetchall()
    db.close()
    assert found == [("A", 0, 2.0, 2), ("A", 60_000, 2.0, 2), ("A", 120_000, 2.0, 2), ("B", 0, 3.0, 3)]


def test_under_load_commits_gather_readings_and_alone_a_message_is_not_held(tmp_path: Path) -> None:
    """Writes of 300 readings every 20 ms: after the first, each commit waits for more (up to _TARGET_ROWS
    readings, or _WINDOW_S after the last commit), so there are a few large commits, not one per write; and
    once the load is over, a lone write is committed at once."""

    async def main() -> tuple[list[int], float, float]:
        store = WriterProcess(tmp_path / "readings.sqlite3")
        await store.start()
        audit = AuditLog(tmp_path / "audit.jsonl")
        writer = BatchWriter(store, audit, max_readings=20000, queue_max_messages=20000)
        writer.start()
        try:
            tasks = []
            for n in range(40):
                batch = rows(*((f"D{k:04d}", n, 1.0) for k in range(300)))
                tasks.append(asyncio.create_task(writer.write([Write("edge", batch, 300, set(), 300)])))
                await asyncio.sleep(0.02)
            last_write = asyncio.get_running_loop().time()
            await asyncio.gather(*tasks)
            tail = asyncio.get_running_loop().time() - last_write  # the last writes wait one window at most
            await asyncio.sleep(writer_module._WINDOW_S + 0.2)  # the load is over
            began = asyncio.get_running_loop().time()
            await writer.write([Write("edge", rows(("LONE", 0, 1.0)), 1, {"LONE"}, 1)])
            took = asyncio.get_running_loop().time() - began
        finally:
            await writer.close()
            await store.close()
            audit.close()
        stored = [r["readings"] for r in records_in(tmp_path / "audit.jsonl", "data.stored")]
        return stored, took, tail

    stored, took, tail = asyncio.run(main())
    assert sum(stored) == 40 * 300 + 1
    assert len(stored) <= 12 and max(stored) >= 3000  # gathered: not 40 commits of 300
    assert took < 0.3  # alone: not held for the window
    assert tail < writer_module._WINDOW_S + 0.5


def records_in(path: Path, event: str) -> list[dict[str, Any]]:
    return [r for r in (json.loads(line) for line in path.read_text().splitlines()) if r.get("event") == event]
