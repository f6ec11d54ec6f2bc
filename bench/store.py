"""bench/store: the SQLite store's own cost per reading, beside SQLite's floor for the same rows, in one run.

Case B of bench/ingest is paced by the store process; this times that process's work alone: batches of
case B's rows (1,000 DERs, a reading per DER per second, five quantities) through ``SqliteStore.write_rows``
into a store that already holds ``--prefill`` rows, and, alternating batch by batch, the same rows appended
by one ``executemany`` to a table with no key and no index (binding and stepping alone: what any layout pays).
Both with ``synchronous=FULL`` and a commit per batch. Prints CPU and wall time per row, rows per second and
the ratio store ÷ floor; a storage layout that writes fewer B-tree pages per reading shows as a lower ratio.

    .venv/bin/python bench/store.py                      # batches of 20,000 (case B's), 500,000 rows each
    .venv/bin/python bench/store.py --batch 2000         # case A's batch size
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The SQLite backend alone, on purpose (its commit cost beside SQLite's floor): not through the store factory.
from hubd.store.sqlite import SqliteStore

NAMES = ("power_kw", "energy_kwh", "voltage_v", "power_factor", "reactive_power_kvar")
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def batches(ders: int, batch: int, rows: int, first: int = 0) -> list[list[tuple[Any, ...]]]:
    """Rows as the hub makes them, reading k going to DER k mod ``ders`` at BASE + (k div ``ders``) seconds."""
    der_ids = [f"BENCH-{i:05d}" for i in range(ders)]

    def row(k: int) -> tuple[Any, ...]:
        at = BASE_MS + k // ders * 1000
        values = (3.0 + k % 997 / 1000, 1000 + k / 1000, 230.0, 0.98, 0.61)
        return (der_ids[k % ders], at, *values, at, "edge", "hub.v1", at)  # sent_at: the edge's send time

    end = first + rows
    return [[row(k) for k in range(start, min(start + batch, end))] for start in range(first, end, batch)]


class Floor:
    """The same rows appended to a table with no key and no index, a commit per batch."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE rows (der_id TEXT, measured_at INTEGER, power_kw REAL, energy_kwh REAL, voltage_v REAL, "
            "power_factor REAL, reactive_power_kvar REAL, received_at INTEGER, source_id TEXT, format_code TEXT, "
            "sent_at INTEGER)"
        )

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self._db.execute("COMMIT")


def timed(write: Callable[[list[tuple[Any, ...]]], None], rows: list[tuple[Any, ...]]) -> tuple[float, float]:
    """(CPU, wall) seconds of one write."""
    wall, cpu = time.perf_counter(), time.process_time()
    write(rows)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ders", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=20_000, help="rows per commit (default 20000, case B's)")
    parser.add_argument("--rows", type=int, default=500_000, help="rows timed (default 500000)")
    parser.add_argument("--prefill", type=int, default=500_000, help="rows stored before timing (default 500000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hubd-bench-store-") as tmp:
        store = SqliteStore(Path(tmp) / "readings.sqlite3", "full")
        floor = Floor(Path(tmp) / "floor.sqlite3")
        for run in batches(args.ders, args.batch, args.prefill):
            store.write_rows([(NAMES, run)], BASE_MS)
        writers = {"store": lambda run: store.write_rows([(NAMES, run)], BASE_MS), "floor": floor.write}
        totals = {name: [0.0, 0.0] for name in writers}
        for run in batches(args.ders, args.batch, args.rows, first=args.prefill):
            for name, write in writers.items():  # batch by batch in turn, so both meet the same machine
                cpu, wall = timed(write, run)
                totals[name][0] += cpu
                totals[name][1] += wall
        store.close()
    print(f"{args.rows:,} rows in batches of {args.batch:,}, {args.ders:,} DERs, {args.prefill:,} rows stored before")
    print("| writer | CPU µs/row | wall µs/row | rows/s (wall) |")
    print("|---|---:|---:|---:|")
    for name, label in (("store", "SqliteStore.write_rows (upsert, key + time index)"), ("floor", "floor")):
        cpu, wall = totals[name]
        print(f"| {label} | {cpu / args.rows * 1e6:.2f} | {wall / args.rows * 1e6:.2f} | {args.rows / wall:,.0f} |")
    ratio = totals["store"][0] / totals["floor"][0]
    print(f"store ÷ floor (CPU): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
