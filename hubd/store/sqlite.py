"""The embedded default store: one SQLite file in WAL mode, zero setup.

Readings are keyed by (der_id, measured_at) so a re-sent reading replaces the earlier one; a second index on
(measured_at, der_id) serves time-range extraction in the order the protocol promises.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hubd.model import FIELDS
from hubd.store import RawQuery, StoredReading

_COLUMNS = ", ".join(f"{name} REAL" for name in FIELDS)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS readings (
    der_id TEXT NOT NULL,
    measured_at INTEGER NOT NULL,
    {_COLUMNS},
    received_at INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    source_id TEXT NOT NULL,
    format_code TEXT NOT NULL,
    PRIMARY KEY (der_id, measured_at)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS readings_by_time ON readings (measured_at, der_id);
"""
_INSERT = (
    f"INSERT OR REPLACE INTO readings (der_id, measured_at, {', '.join(FIELDS)}, received_at, stored_at, "
    f"source_id, format_code) VALUES ({', '.join('?' * (len(FIELDS) + 6))})"
)


class SqliteStore:
    """Readings in SQLite. Not thread-safe: the hub calls it from one store thread."""

    def __init__(self, path: Path, synchronous: str = "full") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss, which is what "acknowledged after commit" promises.
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)

    def write(self, readings: list[StoredReading], stored_at: int) -> None:
        rows = [
            (
                r.der_id,
                r.measured_at,
                *[r.values.get(name) for name in FIELDS],
                r.received_at,
                stored_at,
                r.source_id,
                r.format_code,
            )
            for r in readings
        ]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_INSERT, rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def raw(self, query: RawQuery) -> list[dict[str, Any]]:
        where = ["measured_at >= ?", "measured_at < ?"]
        params: list[Any] = [query.start, query.end]
        if query.der_ids:
            where.append(f"der_id IN ({', '.join('?' * len(query.der_ids))})")
            params.extend(query.der_ids)
        if query.after is not None:
            where.append("(measured_at, der_id) > (?, ?)")
            params.extend(query.after)
        sql = (
            f"SELECT der_id, measured_at, {', '.join(query.fields)} FROM readings "
            f"WHERE {' AND '.join(where)} ORDER BY measured_at, der_id LIMIT ?"
        )
        params.append(query.limit)
        names = ("der_id", "measured_at", *query.fields)
        return [dict(zip(names, row, strict=True)) for row in self._db.execute(sql, params)]

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM readings").fetchone()[0])

    def close(self) -> None:
        self._db.close()
