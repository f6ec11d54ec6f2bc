"""The embedded default store: one SQLite file in WAL mode, zero setup.

Readings are keyed by (der_id, measured_at) so a re-sent reading replaces the earlier one; a second index on
(measured_at, der_id) serves time-range extraction in the order the protocol promises.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hubd.model import FIELDS
from hubd.query.buckets import Segment
from hubd.store import StoredReading, Where

_SQL_AGGREGATES = {"mean": "avg", "min": "min", "max": "max", "sum": "sum", "count": "count"}
_OPERATORS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "=", "ne": "!="}

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

    def raw(
        self,
        start: int,
        end: int,
        der_ids: tuple[str, ...] | None,
        fields: tuple[str, ...],
        where: Where,
        after: tuple[int, str] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        sql: list[str] = ["measured_at >= ? AND measured_at < ?"]
        params: list[Any] = [start, end]
        if der_ids is not None:
            sql.append(f"der_id IN ({', '.join('?' * len(der_ids))})")
            params.extend(der_ids)
        if after is not None:
            sql.append("(measured_at, der_id) > (?, ?)")
            params.extend(after)
        condition, values = _where(where)
        params.extend(values)
        columns = ", ".join(("der_id", "measured_at", *fields))
        return self._db.execute(
            f"SELECT {columns} FROM readings WHERE {' AND '.join(sql)}{condition} ORDER BY measured_at, der_id LIMIT ?",
            (*params, limit),
        ).fetchall()

    def der_ids(self, start: int, end: int, first: str) -> list[str]:
        # DISTINCT walks the primary key; one probe per DER keeps those with readings in range.
        rows = self._db.execute(
            "SELECT DISTINCT der_id FROM readings WHERE der_id >= ? ORDER BY der_id", (first,)
        ).fetchall()
        probe = "SELECT 1 FROM readings WHERE der_id = ? AND measured_at >= ? AND measured_at < ? LIMIT 1"
        return [r[0] for r in rows if self._db.execute(probe, (r[0], start, end)).fetchone()]

    def bucket_stats(
        self,
        der_id: str,
        start: int,
        end: int,
        segments: list[Segment],
        specs: tuple[tuple[str, str], ...],
        where: Where,
    ) -> dict[int, dict[str, Any]]:
        bucket = _bucket_expression(segments)
        condition, values = _where(where)
        scope = f"FROM readings WHERE der_id = ? AND measured_at >= ? AND measured_at < ?{condition}"
        params = (der_id, start, end, *values)
        plain = [(how, field) for field, how in specs if how in _SQL_AGGREGATES]
        columns = "".join(f", {_SQL_AGGREGATES[how]}({field})" for how, field in plain)
        out: dict[int, dict[str, Any]] = {}
        for index, n, *row in self._db.execute(f"SELECT {bucket} AS b, count(*){columns} {scope} GROUP BY b", params):
            stats: dict[str, Any] = {"n": n}
            for (how, field), value in zip(plain, row, strict=True):
                stats[f"{how}:{field}"] = value
            out[index] = stats
        for field, how in specs:
            if how not in ("first", "last"):
                continue
            # SQLite fills a bare column from the row that holds the single min()/max(): the first or last reading.
            pick = "min" if how == "first" else "max"
            sql = f"SELECT {bucket} AS b, {pick}(measured_at), {field} {scope} AND {field} IS NOT NULL GROUP BY b"
            for index, at, value in self._db.execute(sql, params):
                out.setdefault(index, {"n": 0})[f"{how}:{field}"] = (at, value)
        return out

    def nearest(self, der_id: str, field: str, at: int, before: bool) -> tuple[int, float] | None:
        order = "measured_at < ? ORDER BY measured_at DESC" if before else "measured_at >= ? ORDER BY measured_at"
        row = self._db.execute(
            f"SELECT measured_at, {field} FROM readings WHERE der_id = ? AND {field} IS NOT NULL AND {order} LIMIT 1",
            (der_id, at),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def series(self, der_id: str, start: int, end: int, fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        present = " AND ".join(f"{f} IS NOT NULL" for f in fields)
        return self._db.execute(
            f"SELECT measured_at, {', '.join(fields)} FROM readings WHERE der_id = ? AND measured_at >= ? "
            f"AND measured_at < ? AND {present} ORDER BY measured_at",
            (der_id, start, end),
        ).fetchall()

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM readings").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def _where(where: Where) -> tuple[str, list[float]]:
    """Value conditions as SQL (AND-combined); a reading without the field never matches."""
    sql = "".join(f" AND {field} {_OPERATORS[op]} ?" for field, op, _ in where)
    return sql, [operand for _, _, operand in where]


def _bucket_expression(segments: list[Segment]) -> str:
    """SQL for the bucket index of ``measured_at``: integer arithmetic per run of equal buckets."""
    parts = [f"{s.first_index} + (measured_at - {s.start}) / {s.step}" for s in segments]
    if len(parts) == 1:
        return parts[0]
    cases = " ".join(
        f"WHEN measured_at < {nxt.start} THEN {part}" for part, nxt in zip(parts, segments[1:], strict=False)
    )
    return f"CASE {cases} ELSE {parts[-1]} END"
