"""The fleet as the status page shows it, aggregated in SQL: DERs by type, area and state, a page of DERs with
the age of their last reading, today's energy per 30-minute slot by DER type, the quarantine, and the
refusals of the last hour (from the audit trail).

It reads the embedded store's file with the state file attached (read-only connections of its own, used from
one thread), so each view is one statement however many DERs there are (the energy: one a slot); the last
reading of a DER is one probe of the readings' primary key. With InfluxDB (hubd.ops.fleet_influx) the DERs'
last times are loaded into an in-memory readings table and a slot's figures into tables the same SQL reads.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hubd import audit as audit_trail
from hubd.config import Config
from hubd.model import ErrorCode
from hubd.ops.fleet_influx import InfluxFleetReadings
from hubd.store.influx.client import InfluxUnavailable
from hubd.store.sqlite import empty_readings

SLOT_MS = 30 * 60 * 1000
STATES = ("fresh", "late", "silent", "revoked")
_CODES = frozenset(code.value for code in ErrorCode)
# A refusal's answer repeats a refusal already recorded by the step that refused.
_NOT_REFUSALS = frozenset({"answer.sent"})

# One slot's energy by DER type; see Fleet.energy.
_SLOT_ENERGY = """
WITH slot AS (
    SELECT der_id, min(energy_kwh) AS lo, max(energy_kwh) AS hi, sum(energy_interval_kwh) AS iv
    FROM main.readings INDEXED BY readings_by_time WHERE measured_at >= :start AND measured_at < :end
    GROUP BY der_id),
before AS (
    SELECT der_id, max(energy_kwh) AS hi FROM main.readings INDEXED BY readings_by_time
    WHERE measured_at >= :before AND measured_at < :start AND energy_kwh IS NOT NULL GROUP BY der_id)
"""
# The total of one slot from ``slot`` and ``before`` (the CTEs above, or temp tables filled from InfluxDB).
_SLOT_TOTAL = """
SELECT coalesce(d.type, 'other'), sum(coalesce(slot.iv, 0) + coalesce(CASE WHEN before.hi IS NULL THEN slot.hi - slot.lo
       WHEN slot.hi >= before.hi THEN slot.hi - before.hi ELSE slot.hi END, 0))
FROM slot LEFT JOIN before USING (der_id) LEFT JOIN state.ders d USING (der_id) GROUP BY 1
"""
_INFLUX_LASTS_S = 10.0  # with InfluxDB: the DERs' last times are read again after this long
_SETTLED_S = 900  # a slot that ended over an hour ago: read again every 15 minutes at most
_RECENT_S = 60  # a later one: every minute

_LAST = "(SELECT max(r.measured_at) FROM main.readings r WHERE r.der_id = d.der_id)"
_STATE = (
    "CASE WHEN d.status = 'revoked' THEN 'revoked' WHEN last IS NULL OR last < :silent THEN 'silent' "
    "WHEN last < :fresh THEN 'late' ELSE 'fresh' END"
)


@dataclass(frozen=True, slots=True)
class DerRow:
    der_id: str
    type: str
    area: str | None
    status: str
    last_at: int | None  # measurement time of its last reading
    state: str


class Fleet:
    """Read-only views over the readings and the state file; one thread at a time (the page's)."""

    def __init__(self, config: Config) -> None:
        self._readings = config.readings_path
        # The page reads SQLite's readings file itself; with another backend it reads an empty one: DERs show
        # no last reading (as never heard from) and no energy, the rest of the page is as always.
        self._embedded = config.store.backend == "sqlite"
        self._state = config.registry_path
        self._audit = config.audit_path
        self._fresh_ms = config.http.fresh_s * 1000
        self._silent_ms = config.http.silent_s * 1000
        self._db: sqlite3.Connection | None = None
        self._slots: dict[int, tuple[int, dict[str, float]]] = {}  # slot start -> (when read, kWh by type)
        self._stopped = False
        self._influx = None if self._embedded else InfluxFleetReadings(config.store.influxdb)
        self._lasts_read = -_INFLUX_LASTS_S  # when the last times were read from InfluxDB (monotonic)

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            if self._embedded:
                db = sqlite3.connect(_read_only(self._readings), uri=True, check_same_thread=False)
            else:
                db = sqlite3.connect(":memory:", check_same_thread=False)
                empty_readings(db)
                db.execute("CREATE TEMP TABLE slot (der_id TEXT PRIMARY KEY, lo REAL, hi REAL, iv REAL)")
                db.execute("CREATE TEMP TABLE before (der_id TEXT PRIMARY KEY, hi REAL)")
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("ATTACH DATABASE ? AS state", (_read_only(self._state),))
            self._db = db
        return self._db

    def _bounds(self, now: int) -> dict[str, int]:
        self._influx_lasts()
        return {"fresh": now - self._fresh_ms, "silent": now - self._silent_ms}

    def _influx_lasts(self) -> None:
        """With InfluxDB: each DER's last time as one row of the in-memory readings table, read at most every
        ``_INFLUX_LASTS_S``; while InfluxDB does not answer, the page shows the times it read last."""
        if self._influx is None or time.monotonic() - self._lasts_read < _INFLUX_LASTS_S:
            return
        try:
            lasts = self._influx.last_times()
        except (InfluxUnavailable, RuntimeError):
            return
        db = self._open()
        with db:
            db.execute("DELETE FROM main.readings")
            db.executemany(
                "INSERT INTO main.readings (der_id, measured_at, received_at, stored_at, source_id, format_code) "
                "VALUES (?, ?, 0, 0, '', '')",
                lasts.items(),
            )
        self._lasts_read = time.monotonic()

    def states(self, now: int) -> list[tuple[str, str, str, int]]:
        """(type, area or "", state, DERs) for every combination that has DERs."""
        sql = (
            f"SELECT type, area, {_STATE} AS state, count(*) FROM "
            f"(SELECT d.type, coalesce(d.area, '') AS area, d.status, {_LAST} AS last FROM state.ders d) d "
            "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        )
        return [tuple(row) for row in self._open().execute(sql, self._bounds(now))]

    def ders(self, now: int, after: str, limit: int) -> list[DerRow]:
        """A page of DERs by id, from the first after ``after``."""
        sql = (
            f"SELECT der_id, type, area, status, last, {_STATE} FROM (SELECT d.der_id, d.type, d.area, d.status, "
            f"{_LAST} AS last FROM state.ders d WHERE d.der_id > :after ORDER BY d.der_id LIMIT :limit) d"
        )
        rows = self._open().execute(sql, {**self._bounds(now), "after": after, "limit": limit})
        return [DerRow(*row) for row in rows]

    def energy(
        self, start: int, end: int, now: int, budget_s: float | None = None
    ) -> tuple[dict[str, list[float]], int]:
        """kWh per 30-minute slot of [start, end) up to ``now``, by DER type, and how many slots are not read yet.

        Interval energies are summed, and a register rises from its highest value in the slot before to its
        highest in the slot (a fall counts as a reset). A view for the eye: settlement figures come from the
        extraction queries. Each slot is one statement over its own readings and the slot before's; a slot that
        ended over an hour ago is kept for ``_SETTLED_S``, a later one for ``_RECENT_S``. Slots are read newest
        first for at most ``budget_s`` (None: all), so a page over a large fleet answers at once and the rest
        of the day is read after it (bench/README.md, status_page)."""
        slots = (end - start + SLOT_MS - 1) // SLOT_MS
        began = time.monotonic()
        self._slots = {k: v for k, v in self._slots.items() if start <= k < end}
        for index in reversed(range(slots)):
            begins = start + index * SLOT_MS
            kept = self._slots.get(begins)
            keep_ms = (_SETTLED_S if begins + SLOT_MS + 3600_000 <= now else _RECENT_S) * 1000
            if begins > now or (kept is not None and now - kept[0] < keep_ms):
                continue
            if self._stopped or (budget_s is not None and time.monotonic() - began >= budget_s):
                break
            try:
                self._slots[begins] = (now, self._slot_energy(begins))
            except (InfluxUnavailable, RuntimeError):  # InfluxDB away: the slot stays to be read
                break
        out: dict[str, list[float]] = {}
        pending = 0
        for index in range(slots):
            begins = start + index * SLOT_MS
            kept = self._slots.get(begins)
            if kept is None:
                pending += begins <= now
                continue
            for der_type, kwh in kept[1].items():
                out.setdefault(der_type, [0.0] * slots)[index] = kwh
        return out, pending

    def _slot_energy(self, begins: int) -> dict[str, float]:
        if self._influx is not None:
            return self._influx_slot_energy(begins)
        rows = self._open().execute(
            _SLOT_ENERGY + _SLOT_TOTAL, {"start": begins, "end": begins + SLOT_MS, "before": begins - SLOT_MS}
        )
        return {der_type: float(kwh or 0.0) for der_type, kwh in rows}

    def _influx_slot_energy(self, begins: int) -> dict[str, float]:
        assert self._influx is not None
        found = self._influx.slot(begins, begins + SLOT_MS, begins - SLOT_MS)
        db = self._open()
        with db:
            db.execute("DELETE FROM temp.slot")
            db.execute("DELETE FROM temp.before")
            db.executemany("INSERT INTO temp.slot VALUES (?, ?, ?, ?)", [(d, *f[:3]) for d, f in found.items()])
            db.executemany("INSERT INTO temp.before VALUES (?, ?)", [(d, f[3]) for d, f in found.items()])
            rows = db.execute(_SLOT_TOTAL).fetchall()
        return {der_type: float(kwh or 0.0) for der_type, kwh in rows}

    def quarantine(self, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """How many entries the quarantine holds, and the newest ``limit`` (without their payloads)."""
        db = self._open()
        if not _has_table(db, "quarantine"):
            return 0, []
        total = int(db.execute("SELECT count(*) FROM state.quarantine").fetchone()[0])
        rows = db.execute(
            "SELECT id, received_at, topic, format_code, source_id, code, reason, size FROM state.quarantine "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        names = ("id", "received_at", "topic", "format_code", "source_id", "code", "reason", "size")
        return total, [dict(zip(names, row, strict=True)) for row in rows]

    def refusals(self, since: int) -> dict[str, int]:
        """Refusals since ``since`` by error code, from the audit trail: refused readings (a record's
        ``codes``), and refused messages, requests and logins (a record's outcome)."""
        counts: Counter[str] = Counter()
        if not self._audit.exists():
            return {}
        for record in audit_trail.since(self._audit, since):
            codes = record.get("codes")
            if isinstance(codes, dict):
                counts.update({str(k): int(v) for k, v in codes.items() if isinstance(v, int)})
            elif record.get("outcome") in _CODES and record.get("event") not in _NOT_REFUSALS:
                counts[str(record["outcome"])] += 1
        return dict(sorted(counts.items()))

    def stop(self) -> None:
        """Read no further slot (called from another thread when the hub stops)."""
        self._stopped = True

    def close(self) -> None:
        if self._influx is not None:
            self._influx.close()
        if self._db is not None:
            self._db.close()
            self._db = None


def _read_only(path: Path) -> str:
    return f"file:{quote(str(path.resolve()))}?mode=ro"


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM state.sqlite_master WHERE name = ?", (name,)).fetchone() is not None
