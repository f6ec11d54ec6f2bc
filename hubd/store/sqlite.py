"""The embedded default store: one SQLite file in WAL mode, zero setup.

Readings are keyed by (der_id, measured_at) so a re-sent reading replaces the earlier one, unless the stored one
is a newer version (its sender's ``sent_at``); a second index on (measured_at, der_id) serves time-range
extraction in the order the protocol promises.
"""

from __future__ import annotations

import sqlite3
from operator import itemgetter
from pathlib import Path
from typing import Any

from hubd.config import Config
from hubd.model import FIELDS, MIN_TIME_MS
from hubd.query.buckets import Bucket
from hubd.query.conditions import OPERATORS
from hubd.store import CLOCK_COLUMNS, Rows, StoredReading, Where, add_rows

_SQL_AGGREGATES = {"mean": "avg", "min": "min", "max": "max", "sum": "sum", "count": "count"}

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
_KNOWN = frozenset((*FIELDS, *CLOCK_COLUMNS))


def empty_readings(db: sqlite3.Connection) -> None:
    """An empty readings table (and its clock columns) in ``db``: for a reader of SQLite's readings when the
    hub stores them elsewhere (the status page with InfluxDB)."""
    db.executescript(_SCHEMA)
    _add_clock_columns(db)
    _add_sent_at(db)


def _add_clock_columns(db: sqlite3.Connection) -> None:
    """Migration: the clock flag of a reading and its estimated offset (docs/protocol.md, Time). A database
    made before them gets them here; its readings are unflagged (NULL). Checked and added in one write
    transaction, so the writer process and the query side opening the file at once add them once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        present = {row[1] for row in db.execute("PRAGMA table_info(readings)")}
        if "clock_flag" not in present:
            db.execute("ALTER TABLE readings ADD COLUMN clock_flag TEXT")
        if "clock_offset_s" not in present:
            db.execute("ALTER TABLE readings ADD COLUMN clock_offset_s REAL")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _insert(names: tuple[str, ...], stored_at: int) -> str:
    """The INSERT for readings that carry exactly the quantities ``names``.

    Binding only the quantities a reading has, not all ten with NULLs, makes a write about 2.5 times cheaper
    (Python's sqlite3 pays per bound parameter); on a conflict every column is set, the absent quantities to
    NULL, so a reading replaces the whole earlier one of its DER and time. Only a version no older, though:
    one sent no earlier (``sent_at``; a reading without one is older than any with one, so a message stripped
    of its send time cannot beat one that had it), and of the same send time one received no earlier (a
    message that waited for a bcrypt check can commit after a later one). The version is compared only on a
    conflict, so a new reading costs just its one more bound parameter. ``stored_at`` is the same for a whole
    batch: written into the statement, not bound per row.
    """
    if not _KNOWN.issuperset(names):
        raise ValueError(f"not quantities of the unified schema: {sorted(set(names) - _KNOWN)}")
    columns = ", ".join(
        ("der_id", "measured_at", *names, "received_at", "source_id", "format_code", "sent_at", "stored_at")
    )
    return (
        f"INSERT INTO readings ({columns}) VALUES ({'?, ' * (len(names) + 6)}{int(stored_at)}) "
        f"ON CONFLICT (der_id, measured_at) DO UPDATE SET {_SET_ALL} WHERE {_NO_OLDER}"
    )


_SET_ALL = ", ".join(
    f"{column} = excluded.{column}"
    for column in (*FIELDS, "received_at", "stored_at", "source_id", "format_code", "sent_at", *CLOCK_COLUMNS)
)
_UNSENT = MIN_TIME_MS - 1  # the version of a reading without ``sent_at``: before every send time the hub takes
_NO_OLDER = f"(ifnull(excluded.sent_at, {_UNSENT}), excluded.received_at) >= (ifnull(sent_at, {_UNSENT}), received_at)"


def _version(row: tuple[Any, ...]) -> tuple[int, int]:
    """A row's version as the upsert compares them: (sent_at, received_at), no sent_at before any."""
    sent_at = row[-1]
    return (_UNSENT if sent_at is None else sent_at, row[-4])


def _add_sent_at(db: sqlite3.Connection) -> None:
    """Migration: a readings table made before versions gets the ``sent_at`` column (NULL: its readings have
    no version, so any reading sent with one replaces them, as arrival order did before). Checked and added
    in one write transaction, so the hub's two connections opening one file cannot both add it."""
    if "sent_at" in _columns(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if "sent_at" not in _columns(db):
            db.execute("ALTER TABLE readings ADD COLUMN sent_at INTEGER")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(readings)")}


# SQLite's page cache per connection (default 2 MB). Readings are clustered by DER, so a batch touches a leaf
# page per DER; with 2 MB those pages are read back from the OS on every batch once the file outgrows the
# cache. 16 MB holds them for a thousand DERs (bench/README.md: store time per reading -20 to -30 %).
_CACHE_KIB = 16 * 1024


# Pages the WAL may hold before a commit copies them into the database (SQLite's default: 1,000). Once each DER
# has a leaf page of its own (a few hundred readings each), every row of a batch dirties its own page, and with
# 1,000 pages a checkpoint came every few batches of one-reading messages; with 10,000 a DER's page is written
# back once for many batches. Commit CPU 27.6 → 16.3 µs per row with 500,000 rows stored (bench/README.md);
# the WAL file grows to ~40 MB.
_CHECKPOINT_PAGES = 10_000


def _latest_by_quantities(rows: Rows) -> dict[tuple[str, ...], list[tuple[Any, ...]]]:
    """The rows grouped by quantities, each group in key order, so that the last row to arrive for each
    (der_id, measured_at) is the one that stays.

    One statement per group binds only the quantities present; in key order, consecutive rows land in the same
    B-tree pages (about 30 % less work per row than arrival order, bench/README.md). With one group (the usual
    case) a stable sort keeps arrival order among rows of the same key, and the upsert lets the later replace
    the earlier (unless it is an older version); across groups the statements' order cannot say which came
    last, so each key keeps only its newest row first, by the same rule.
    """
    names = rows[0][0] if rows else ()
    if all(run_names == names for run_names, _ in rows):
        group = [row for _, run in rows for row in run]
        group.sort(key=_KEY)
        return {names: group} if group else {}
    latest: dict[tuple[str, int], tuple[tuple[str, ...], tuple[Any, ...]]] = {}
    for names, run in rows:
        for row in run:
            kept = latest.get((row[0], row[1]))
            if kept is None or _version(row) >= _version(kept[1]):  # as the upsert: an older one never replaces
                latest[row[0], row[1]] = (names, row)
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for names, row in latest.values():
        groups.setdefault(names, []).append(row)
    for group in groups.values():
        group.sort(key=_KEY)
    return groups


_KEY = itemgetter(0, 1)  # (der_id, measured_at)


class SqliteStore:
    """Readings in SQLite. Not thread-safe: one thread uses it (the hub's query thread to read, its writer
    process to write)."""

    def __init__(self, path: Path, synchronous: str = "full") -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        self._db.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
        # FULL: a commit survives power loss, which is what "acknowledged after commit" promises.
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        _add_clock_columns(self._db)
        _add_sent_at(self._db)
        self._buckets: list[tuple[int, int]] = []

    @classmethod
    def from_config(cls, config: Config) -> SqliteStore:
        """The query side of ``store.backend: sqlite``: its own connection, which WAL lets read beside the
        writer process."""
        return cls(config.readings_path, config.store.sqlite.synchronous)

    def write(self, readings: list[StoredReading], stored_at: int) -> None:
        rows: Rows = []
        for r in readings:
            add_rows(rows, (r,), (r.received_at, r.source_id, r.format_code, r.sent_at))
        self.write_rows(rows, stored_at)

    def write_rows(self, rows: Rows, stored_at: int) -> None:
        groups = _latest_by_quantities(rows)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for names, group in groups.items():
                db.executemany(_insert(names, stored_at), group)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT may leave it open: the next batch must start clean
                db.execute("ROLLBACK")
            raise

    def raw(
        self,
        start: int,
        end: int,
        der_ids: tuple[str, ...] | None,
        fields: tuple[str, ...],
        where: Where,
        after: tuple[int, str] | None,
        limit: int,
        flagged: bool | None = None,
    ) -> list[tuple[Any, ...]]:
        condition, params = _where(where)
        condition += _flagged(flagged)
        sql = ["measured_at >= :start AND measured_at < :end"]
        named: dict[str, Any] = {"start": start, "end": end, "limit": limit, **params}
        if der_ids is not None:
            sql.append(f"der_id IN ({', '.join(f':d{i}' for i in range(len(der_ids)))})")
            named |= {f"d{i}": der_id for i, der_id in enumerate(der_ids)}
        if after is not None:
            # One lower bound, at the cursor, so the index range starts there; the row value skips what the
            # cursor's own instant already gave.
            named["start"] = max(start, after[0])
            sql.append("(measured_at, der_id) > (:after_at, :after_der)")
            named |= {"after_at": after[0], "after_der": after[1]}
        columns = ", ".join(("der_id", "measured_at", *fields, *CLOCK_COLUMNS))
        return self._db.execute(
            f"SELECT {columns} FROM readings WHERE {' AND '.join(sql)}{condition} "
            "ORDER BY measured_at, der_id LIMIT :limit",
            named,
        ).fetchall()

    def expect(self, der_ids: list[str]) -> None:
        """Nothing to prepare: each DER is one primary-key range."""

    def der_ids(self, start: int, end: int, first: str) -> list[str]:
        # A skip scan: one primary-key probe per DER (not a walk over every reading), then one probe per DER
        # keeps those with readings in range.
        rows = self._db.execute(
            "WITH RECURSIVE d(der_id) AS (SELECT min(der_id) FROM readings WHERE der_id >= ? "
            "UNION ALL SELECT (SELECT min(der_id) FROM readings WHERE der_id > d.der_id) FROM d "
            "WHERE d.der_id IS NOT NULL) SELECT der_id FROM d WHERE der_id IS NOT NULL",
            (first,),
        ).fetchall()
        probe = "SELECT 1 FROM readings WHERE der_id = ? AND measured_at >= ? AND measured_at < ? LIMIT 1"
        return [r[0] for r in rows if self._db.execute(probe, (r[0], start, end)).fetchone()]

    def bucket_stats(
        self,
        der_id: str,
        buckets: list[Bucket],
        specs: tuple[tuple[str, str], ...],
        where: Where,
        flagged: bool | None = None,
    ) -> dict[int, dict[str, Any]]:
        self._load_buckets(buckets)
        condition, values = _where(where, "r.")
        condition += _flagged(flagged, "r.")
        own_condition, _ = _where(where)  # the same conditions inside the first/last probes
        own_condition += _flagged(flagged)
        columns = ["count(r.clock_flag)"]
        for field, how in specs:
            if how in _SQL_AGGREGATES:
                columns.append(f"{_SQL_AGGREGATES[how]}(r.{field})")
            elif how in ("first_at", "last_at"):
                pick = "min" if how == "first_at" else "max"
                columns.append(f"{pick}(CASE WHEN r.{field} IS NOT NULL THEN r.measured_at END)")
            elif how == "span":  # cheaper than first_at/last_at when every reading has the field (count == n)
                columns.append(f"min(r.measured_at), max(r.measured_at), count(r.{field})")
            else:  # first/last: the time and value of the earliest/latest reading in the bucket with the field
                order = "" if how == "first" else " DESC"
                probe = (
                    f"FROM readings WHERE der_id = :der AND measured_at >= b.lo AND measured_at < b.hi "
                    f"AND {field} IS NOT NULL{own_condition} ORDER BY measured_at{order} LIMIT 1"
                )
                columns += [f"(SELECT measured_at {probe})", f"(SELECT {field} {probe})"]
        # Buckets drive the join in index order, so each is one primary-key range scan and no sort is needed.
        sql = (
            f"SELECT b.idx, count(*){''.join(', ' + c for c in columns)} FROM temp.buckets b "
            f"JOIN readings r ON r.der_id = :der AND r.measured_at >= b.lo AND r.measured_at < b.hi{condition} "
            "GROUP BY b.idx"
        )
        out: dict[int, dict[str, Any]] = {}
        for index, n, *row in self._db.execute(sql, {"der": der_id, **values}):
            stats: dict[str, Any] = {"n": n, "flagged": row[0]}
            position = 1
            for field, how in specs:
                if how in _SQL_AGGREGATES or how in ("first_at", "last_at"):
                    stats[f"{how}:{field}"] = row[position]
                    position += 1
                elif how == "span":
                    stats[f"span:{field}"] = (row[position], row[position + 1], row[position + 2])
                    position += 3
                else:
                    stats[f"{how}:{field}"] = (row[position], row[position + 1])
                    position += 2
            out[index] = stats
        return out

    def _load_buckets(self, buckets: list[Bucket]) -> None:
        spans = [(b.lo, b.hi) for b in buckets]
        if spans == self._buckets:
            return
        self._db.execute("CREATE TEMP TABLE IF NOT EXISTS buckets (idx INTEGER PRIMARY KEY, lo INTEGER, hi INTEGER)")
        self._db.execute("DELETE FROM temp.buckets")
        self._db.executemany(
            "INSERT INTO temp.buckets VALUES (?, ?, ?)", [(i, lo, hi) for i, (lo, hi) in enumerate(spans)]
        )
        self._buckets = spans

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

    def flagged_series(self, der_id: str, start: int, end: int, fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """(measured_at, *fields, flagged) of one DER in [start, end) with every field present, by time."""
        present = " AND ".join(f"{f} IS NOT NULL" for f in fields)
        return self._db.execute(
            f"SELECT measured_at, {', '.join(fields)}, clock_flag IS NOT NULL FROM readings WHERE der_id = ? "
            f"AND measured_at >= ? AND measured_at < ? AND {present} ORDER BY measured_at",
            (der_id, start, end),
        ).fetchall()

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM readings").fetchone()[0])

    def dump(self, after: tuple[str, int] | None, limit: int) -> list[tuple[Any, ...]]:
        """Up to ``limit`` stored readings after the key ``after``, in key order (der_id, measured_at), each
        as (der_id, measured_at, *FIELDS, clock_flag, clock_offset_s, received_at, source_id, format_code,
        sent_at): a row of ``Rows`` for the quantities FIELDS + CLOCK_COLUMNS. For copying a store out."""
        columns = ", ".join(
            ("der_id", "measured_at", *FIELDS, *CLOCK_COLUMNS, "received_at", "source_id", "format_code", "sent_at")
        )
        start = after or ("", MIN_TIME_MS - 1)
        return self._db.execute(
            f"SELECT {columns} FROM readings WHERE (der_id, measured_at) > (?, ?) ORDER BY der_id, measured_at LIMIT ?",
            (*start, limit),
        ).fetchall()

    def load(self, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """Insert (der_id, measured_at, *columns) rows as they are, with no version and no source: for a
        scratch store filled from another (the InfluxDB query side's in-memory one)."""
        if not _KNOWN.issuperset(columns):
            raise ValueError(f"not columns of the readings: {sorted(set(columns) - _KNOWN)}")
        names = ", ".join(("der_id", "measured_at", *columns, "received_at", "stored_at", "source_id", "format_code"))
        self._db.execute("BEGIN")
        self._db.executemany(
            f"INSERT OR REPLACE INTO readings ({names}) VALUES ({'?, ' * (len(columns) + 2)}0, 0, '', '')", rows
        )
        self._db.execute("COMMIT")

    def clear(self) -> None:
        """Delete every reading: for a scratch store (the InfluxDB query side's in-memory one)."""
        self._db.execute("DELETE FROM readings")

    def close(self) -> None:
        self._db.close()


def _flagged(flagged: bool | None, table: str = "") -> str:
    """The condition on the clock flag: only flagged readings (True), only unflagged (False), any (None)."""
    if flagged is None:
        return ""
    return f" AND {table}clock_flag IS {'NOT ' if flagged else ''}NULL"


def _where(where: Where, table: str = "") -> tuple[str, dict[str, float]]:
    """Value conditions as SQL with named parameters (AND-combined); a reading without the field never matches."""
    sql = "".join(f" AND {table}{field} {OPERATORS[op]} :w{i}" for i, (field, op, _) in enumerate(where))
    return sql, {f"w{i}": operand for i, (_, _, operand) in enumerate(where)}
