"""The market tables in the state file: groups of DERs, plans per slot, external series per slot or hour.

Created if missing, so a state file from before them keeps working. Every write is one transaction: an import
that fails part-way stores nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hubd.auth.registry import check_id
from hubd.config import Config
from hubd.model import ErrorCode, HubError
from hubd.state import open_state

_SCHEMA = """
CREATE TABLE IF NOT EXISTS der_groups (
    name TEXT PRIMARY KEY,
    added_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS der_group_members (
    name TEXT NOT NULL,
    der_id TEXT NOT NULL,
    PRIMARY KEY (name, der_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plans (
    target TEXT NOT NULL,           -- der:<id> or group:<name>
    slot_start INTEGER NOT NULL,    -- epoch ms (UTC)
    slot_end INTEGER NOT NULL,
    kwh REAL NOT NULL,
    planned_by TEXT NOT NULL,
    planned_at INTEGER NOT NULL,
    PRIMARY KEY (target, slot_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS series (
    kind TEXT NOT NULL,             -- jepx, weather
    place TEXT NOT NULL,            -- a JEPX area (or system), a DER area for weather
    quantity TEXT NOT NULL,
    start INTEGER NOT NULL,         -- epoch ms (UTC): the span the value holds for
    end INTEGER NOT NULL,
    value REAL NOT NULL,
    source TEXT NOT NULL,
    imported_at INTEGER NOT NULL,
    PRIMARY KEY (kind, place, quantity, start)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Point:
    """One value of an external series: ``quantity`` at ``place`` over [start, end)."""

    place: str
    quantity: str
    start: int
    end: int
    value: float


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """A plan for one DER (``der:<id>``) or group (``group:<name>``) and one slot, in kWh."""

    target: str
    slot_start: int
    slot_end: int
    kwh: float


class MarketData:
    """The market tables; one instance per thread that uses it (the daemon's query thread has its own)."""

    def __init__(self, path: Path) -> None:
        self._db = open_state(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- groups ---------------------------------------------------------------------------------------

    def add_group(self, name: str, der_ids: Iterable[str], known: Iterable[str], now: int) -> int:
        """Create the group (or extend it) with ``der_ids``, each of which must be in ``known``; the new members."""
        check_id(name, "group name")
        wanted = list(dict.fromkeys(der_ids))
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise HubError(ErrorCode.UNKNOWN_DER, f"no such DER: {', '.join(unknown[:20])}")
        with self._transaction():
            self._db.execute("INSERT INTO der_groups VALUES (?, ?) ON CONFLICT DO NOTHING", (name, now))
            before = self._db.total_changes
            self._db.executemany(
                "INSERT INTO der_group_members VALUES (?, ?) ON CONFLICT DO NOTHING", [(name, d) for d in wanted]
            )
            return self._db.total_changes - before

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Every group with its members, sorted."""
        out: dict[str, list[str]] = {name: [] for (name,) in self._db.execute("SELECT name FROM der_groups")}
        for name, der_id in self._db.execute("SELECT name, der_id FROM der_group_members ORDER BY der_id"):
            out[name].append(der_id)
        return {name: tuple(out[name]) for name in sorted(out)}

    # -- plans ----------------------------------------------------------------------------------------

    def store_plans(self, entries: list[PlanEntry], planned_by: str, now: int) -> list[float | None]:
        """Store plans, each replacing an earlier one for its target and slot; what each replaced (None: none)."""
        replaced: list[float | None] = []
        with self._transaction():
            for entry in entries:
                row = self._db.execute(
                    "SELECT kwh FROM plans WHERE target = ? AND slot_start = ?", (entry.target, entry.slot_start)
                ).fetchone()
                replaced.append(row[0] if row else None)
                self._db.execute(
                    "INSERT OR REPLACE INTO plans VALUES (?, ?, ?, ?, ?, ?)",
                    (entry.target, entry.slot_start, entry.slot_end, entry.kwh, planned_by, now),
                )
        return replaced

    def plans(self, target: str, start: int, end: int) -> dict[int, float]:
        """The plan of one target per slot start in [start, end)."""
        rows = self._db.execute(
            "SELECT slot_start, kwh FROM plans WHERE target = ? AND slot_start >= ? AND slot_start < ?",
            (target, start, end),
        )
        return dict(rows.fetchall())

    # -- series ---------------------------------------------------------------------------------------

    def replace_series(self, kind: str, points: list[Point], source: str, now: int) -> int:
        """Store points, replacing those of the same place, quantity and start (a re-import is idempotent)."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(kind, p.place, p.quantity, p.start, p.end, p.value, source, now) for p in points],
            )
        return len(points)

    def series(self, kind: str, place: str, quantity: str, start: int, end: int) -> list[tuple[int, int, float]]:
        """(start, end, value) of the points overlapping [start, end), by start."""
        rows = self._db.execute(
            "SELECT start, end, value FROM series WHERE kind = ? AND place = ? AND quantity = ? "
            "AND start < ? AND end > ? ORDER BY start",
            (kind, place, quantity, end, start),
        )
        return rows.fetchall()

    def series_summary(self) -> list[tuple[str, str, str, int, int, int]]:
        """(kind, place, quantity, points, first start, last end) of every series, for ``hubd series list``."""
        rows = self._db.execute(
            "SELECT kind, place, quantity, count(*), min(start), max(end) FROM series "
            "GROUP BY kind, place, quantity ORDER BY kind, place, quantity"
        )
        return rows.fetchall()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")


def groups_of(config: Config) -> dict[str, tuple[str, ...]]:
    """Every group with its members, read once (for a command that needs nothing else of the market)."""
    market = MarketData(config.registry_path)
    try:
        return market.groups()
    finally:
        market.close()
