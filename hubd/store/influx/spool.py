"""The on-disk spool: batches InfluxDB could not take, kept in order in a SQLite file until it can.

A batch is committed here with ``synchronous=FULL`` before its senders are acknowledged, so what the hub
acknowledged survives a crash of the hub or the machine while InfluxDB is away. The file also keeps the
state ``hubd store status`` shows: since when the hub spools, and how fast the replay went.
"""

from __future__ import annotations

import contextlib
import marshal
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hubd.model import format_time
from hubd.store import Rows

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spooled_at INTEGER NOT NULL,
    readings INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held (id INTEGER PRIMARY KEY AUTOINCREMENT, readings INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pending_slots (der_id TEXT NOT NULL, slot INTEGER NOT NULL, PRIMARY KEY (der_id, slot))
    WITHOUT ROWID;
"""


class Spool:
    """Batches in arrival order; one process uses it (the hub's sink, or the CLI reading its status)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a spooled batch is acknowledged: it must survive power loss
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)

    def append(self, rows: Rows, readings: int) -> int:
        """Commit one batch at the end of the queue (durable when this returns); when, in ms."""
        body = marshal.dumps(rows)  # rows are tuples of str, int, float and None (hubd.store.process)
        spooled_at = int(time.time() * 1000)
        self._db.execute(
            "INSERT INTO batches (spooled_at, readings, body) VALUES (?, ?, ?)", (spooled_at, readings, body)
        )
        return spooled_at

    def oldest(self) -> int | None:
        """When the oldest batch was spooled, in ms."""
        row = self._db.execute("SELECT spooled_at FROM batches ORDER BY id LIMIT 1").fetchone()
        return None if row is None else int(row[0])

    def head(self) -> tuple[int, Rows, int] | None:
        """The oldest batch: (id, rows, readings)."""
        row = self._db.execute("SELECT id, body, readings FROM batches ORDER BY id LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), marshal.loads(row[1]), int(row[2]))

    def remove(self, batch_id: int, readings: int, seconds: float) -> None:
        """Drop a replayed batch and count it into the replay's figures, in one transaction."""
        with self._transaction():
            self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            state = self._state()
            replayed = int(state.get("replayed_readings", 0)) + readings
            busy = float(state.get("replay_seconds", 0.0)) + seconds
            self._db.executemany(
                "INSERT OR REPLACE INTO state VALUES (?, ?)",
                [("replayed_readings", replayed), ("replay_seconds", busy)],
            )

    def depth(self) -> tuple[int, int, int | None]:
        """(batches, readings, when the oldest was spooled in ms)."""
        batches, readings, oldest = self._db.execute(
            "SELECT count(*), coalesce(sum(readings), 0), min(spooled_at) FROM batches"
        ).fetchone()
        return int(batches), int(readings), oldest

    def hold(self, rows: Rows, readings: int) -> int:
        """Keep a batch that replaces stored readings while InfluxDB deletes and rewrites them (committed
        before the first delete); ``release`` drops it. A batch still held at start was cut short by a crash:
        ``requeue_held`` puts it in the queue, so the replay writes it."""
        cursor = self._db.execute("INSERT INTO held (readings, body) VALUES (?, ?)", (readings, marshal.dumps(rows)))
        return int(cursor.lastrowid or 0)

    def release(self, held_id: int) -> None:
        self._db.execute("DELETE FROM held WHERE id = ?", (held_id,))

    def requeue_held(self) -> None:
        """Move the held batches to the end of the queue."""
        with self._transaction():
            found = self._db.execute("SELECT readings, body FROM held ORDER BY id").fetchall()
            now = int(time.time() * 1000)
            self._db.executemany(
                "INSERT INTO batches (spooled_at, readings, body) VALUES (?, ?, ?)", [(now, r, b) for r, b in found]
            )
            self._db.execute("DELETE FROM held")

    def note_slots(self, keys: Iterable[tuple[str, int]]) -> None:
        """Slots whose summaries a batch will write (hubd.store.influx.slots): kept until ``clear_slots``, so
        a crash between the batch's readings and its summaries leaves them to be made at the next start."""
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO pending_slots VALUES (?, ?)", keys)

    def clear_slots(self, keys: Iterable[tuple[str, int]]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM pending_slots WHERE der_id = ? AND slot = ?", keys)

    def pending_slots(self) -> list[tuple[str, int]]:
        return [(str(d), int(s)) for d, s in self._db.execute("SELECT der_id, slot FROM pending_slots")]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def set_state(self, **values: Any) -> None:
        self._db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", list(values.items()))

    def _state(self) -> dict[str, Any]:
        return dict(self._db.execute("SELECT key, value FROM state").fetchall())

    def status(self) -> dict[str, Any]:
        """What ``hubd store status`` shows: depth, age of the oldest batch, the replay's figures."""
        batches, readings, oldest = self.depth()
        state = self._state()
        replayed = int(state.get("replayed_readings", 0))
        seconds = float(state.get("replay_seconds", 0.0))
        return {
            "mode": state.get("mode", "direct"),
            "since": None if state.get("since") is None else format_time(int(state["since"])),
            "reason": state.get("reason"),
            "spooled_batches": batches,
            "spooled_readings": readings,
            "oldest_age_s": None if oldest is None else round(time.time() - oldest / 1000, 1),
            "replayed_readings": replayed,
            "replay_rate_per_s": round(replayed / seconds, 1) if seconds > 0 else None,
            "slot_summaries_pending": self._db.execute("SELECT count(*) FROM pending_slots").fetchone()[0],
        }

    def close(self) -> None:
        self._db.close()
