"""30-minute slot summaries beside the readings, kept exact at write time, so settlement reads a point per slot.

Why: InfluxDB 1.x aggregates about 0.4 µs per reading and statistic (bench/README.md, bench/influx), so the
seven statistics a settlement slot needs cost it several times SQLite's whole query. The sink therefore
writes, with every batch, a summary of each 30-minute slot (UTC, every :00 and :30) the batch touched, and a
bucket query whose buckets are exactly these slots reads the summaries instead of the readings.

Layout (docs/operations.md, InfluxDB): measurement ``<measurement>_30m``, tag ``der_id``, time = the slot's
start; fields ``n`` (readings), ``clock_flagged`` (readings with a clock flag), ``first_at``/``last_at`` (ms,
the slot's first and last reading) and per quantity ``q`` the slot has: ``q_n``, ``q_min``, ``q_max``,
``q_sum``. ``q_sum`` adds the values in time order, as SQLite's ``sum``/``avg`` do, so ``q_sum / q_n`` is
SQLite's ``avg`` to the last bit.

Exact by construction: a batch's readings all later than everything its DER has stored extend that DER's
newest slot, whose summary the sink holds (or start a new slot, with nothing stored in it yet); any other
reading (late, replacing, or in a slot the sink has not seen since it started) has its slot summarized
again from what InfluxDB holds after the write. The summaries are complete from the time recorded in the
hub's database (``complete_from``): a store filled before that answers earlier slots from the readings.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hubd.config import InfluxConfig
from hubd.model import FIELDS, MIN_TIME_MS
from hubd.query.buckets import Bucket
from hubd.store import Where
from hubd.store.influx import pushdown
from hubd.store.influx.lines import Point
from hubd.store.influx.pushdown import ns, quote_name

SLOT_MS = 1_800_000
_QUANTITIES = frozenset(FIELDS)
_ZEROS = ",".join(f"{q}_n=0i" for q in FIELDS)  # a summary made again says which quantities it no longer has
_KNOWN = frozenset(("count", "min", "max", "sum", "mean", "span"))
SlotKey = tuple[str, int]  # (der_id, slot start)


def measurement(config: InfluxConfig) -> str:
    return f"{config.measurement}_30m"


def slot_of(at: int) -> int:
    return at - at % SLOT_MS


class Summary:
    """One DER's readings in one slot, added in time order."""

    __slots__ = ("first_at", "flagged", "last_at", "n", "stats")

    def __init__(self) -> None:
        self.n = 0
        self.flagged = 0
        self.first_at = 0
        self.last_at = 0
        self.stats: dict[str, list[Any]] = {}  # quantity -> [count, min, max, sum]

    def copy(self) -> Summary:
        out = Summary()
        out.n, out.flagged, out.first_at, out.last_at = self.n, self.flagged, self.first_at, self.last_at
        out.stats = {q: list(s) for q, s in self.stats.items()}
        return out

    def add(self, at: int, values: dict[str, Any]) -> None:
        if not self.n:
            self.first_at = at
        self.n += 1
        self.last_at = at
        if values.get("clock_flag") is not None:
            self.flagged += 1
        for name, value in values.items():
            if name in _QUANTITIES and value is not None:
                v = float(value)
                s = self.stats.get(name)
                if s is None:
                    self.stats[name] = [1, v, v, 0.0 + v]  # 0.0 + v: SQLite's sum starts from 0.0 (-0.0 → 0.0)
                else:
                    s[0] += 1
                    if v < s[1]:
                        s[1] = v
                    if v > s[2]:
                        s[2] = v
                    s[3] += v

    def line(self, tag: str, slot: int, again: bool) -> str:
        """As a line of ``tag`` (measurement and DER, escaped); ``again``: a slot summarized before, whose
        quantities it no longer has must read as none (InfluxDB keeps fields a point is written without)."""
        fields = [f"n={self.n}i,clock_flagged={self.flagged}i,first_at={self.first_at}i,last_at={self.last_at}i"]
        if again:
            fields.append(_ZEROS)
        for q, (count, low, high, total) in self.stats.items():
            fields.append(f"{q}_n={count}i,{q}_min={low!r},{q}_max={high!r},{q}_sum={total!r}")
        return f"{tag} {','.join(fields)} {slot}"


class SlotKeeper:
    """The sink's side: the summaries a written batch changes, and each DER's newest slot."""

    def __init__(self, config: InfluxConfig) -> None:
        self._raw = quote_name(config.measurement)
        self._tag = _escape(measurement(config))
        self._newest: dict[str, tuple[int, Summary]] = {}  # per DER: its newest slot, summarized whole

    def extend(
        self, points: Iterable[Point], latest: dict[str, int], doubtful: set[SlotKey]
    ) -> tuple[dict[SlotKey, Summary], set[SlotKey]]:
        """The summaries of the slots the written ``points`` extend (each DER's readings later than its
        ``latest`` before the write, in slots not in ``doubtful``), and the slots to summarize again from
        InfluxDB (the rest)."""
        by_slot: dict[SlotKey, list[Point]] = defaultdict(list)
        for p in points:
            by_slot[(p[0], slot_of(p[1]))].append(p)
        extended: dict[SlotKey, Summary] = {}
        again: set[SlotKey] = set()
        never = MIN_TIME_MS - 1
        for key, found in by_slot.items():
            der_id, slot = key
            before = latest.get(der_id, never)
            newest = self._newest.get(der_id)
            if key in doubtful or any(p[1] <= before for p in found):
                again.add(key)
                continue
            if slot_of(before) < slot or before == never:  # nothing stored in this slot yet
                summary = Summary()
            elif newest is not None and newest[0] == slot:
                summary = newest[1].copy()
            else:  # the DER's newest slot, stored before this sink started: read it
                again.add(key)
                continue
            for at, values in sorted((p[1], p[2]) for p in found):
                summary.add(at, values)
            extended[key] = summary
        return extended, again

    def statements(self, slots: Iterable[SlotKey]) -> list[str]:
        """One statement per slot to summarize again: its stored readings, in time order."""
        return [
            f"SELECT * FROM {self._raw} WHERE \"der_id\" = '{_quote(d)}' "
            f"AND time >= {ns(s)} AND time < {ns(s + SLOT_MS)}"
            for d, s in slots
        ]

    @staticmethod
    def summarize(series: list[dict[str, Any]]) -> Summary | None:
        """A slot's summary from its readings as InfluxDB answered a ``statements`` statement."""
        summary = Summary()
        for s in series:
            names = s["columns"]
            for row in s["values"]:
                values = dict(zip(names, row, strict=True))
                summary.add(int(values.pop("time")), values)
        return summary if summary.n else None

    def lines(self, summaries: dict[SlotKey, Summary], again: set[SlotKey]) -> list[str]:
        return [
            s.line(f"{self._tag},der_id={_escape(d)}", slot, (d, slot) in again) for (d, slot), s in summaries.items()
        ]

    def keep(self, summaries: dict[SlotKey, Summary]) -> None:
        """Once written: each DER's newest slot, for the next batch to extend."""
        for (der_id, slot), summary in summaries.items():
            newest = self._newest.get(der_id)
            if newest is None or newest[0] <= slot:
                self._newest[der_id] = (slot, summary)


def usable(buckets: list[Bucket], specs: tuple[tuple[str, str], ...], where: Where, flagged: bool | None) -> bool:
    """Whether the summaries answer these bucket statistics exactly: whole slots, no condition, no first or
    last value."""
    return (
        bool(buckets)
        and not where
        and flagged is None
        and all(how in _KNOWN for _, how in specs)
        and all(b.lo == b.start and b.hi == b.end == b.start + SLOT_MS and b.start % SLOT_MS == 0 for b in buckets)
    )


class SlotPlan:
    """The statements for one group of DERs' slot statistics, and how their answers become each DER's
    statistics (the interface of hubd.store.influx.pushdown.Plan)."""

    def __init__(self, config: InfluxConfig, buckets: list[Bucket], specs: tuple[tuple[str, str], ...]) -> None:
        self.buckets = buckets
        self.specs = specs
        self._from = quote_name(measurement(config))
        self._index = {b.start: i for i, b in enumerate(buckets)}
        quantities = sorted({f for f, _ in specs})
        self._columns = ["n", "clock_flagged", "first_at", "last_at"]
        self._columns += [f"{q}_{part}" for q in quantities for part in ("n", "min", "max", "sum")]
        self._edges = pushdown.Edges(config.measurement, sorted({f for f, how in specs if how == "span"}))

    def statements(self, der_condition: str | None, ders: int) -> list[tuple[str, int]]:
        also = f" AND {der_condition}" if der_condition else ""
        lo, hi = self.buckets[0].lo, self.buckets[-1].hi
        listed = ", ".join(quote_name(c) for c in self._columns)
        span = f"time >= {ns(lo)} AND time < {ns(hi)}"
        select = f'SELECT {listed} FROM {self._from} WHERE {span}{also} GROUP BY "der_id"'
        return [(select, ders * len(self.buckets)), *self._edges.statements(lo, hi, also, ders)]

    def read(
        self, answers: list[list[dict[str, Any]]]
    ) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[tuple[str, str, int, bool], tuple[int, float] | None]]:
        stats: dict[str, dict[int, dict[str, Any]]] = {}
        for series in answers[0]:
            der = series["tags"]["der_id"]
            positions = {c: i for i, c in enumerate(series["columns"])}
            for row in series["values"]:
                index = self._index.get(row[0])
                if index is not None and row[positions["n"]]:
                    stats.setdefault(der, {})[index] = self._stats({c: row[i] for c, i in positions.items()})
        return stats, self._edges.read(answers[1:], stats, self.buckets[0].lo, self.buckets[-1].hi)

    def _stats(self, got: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": got["n"], "flagged": got["clock_flagged"] or 0}
        for field, how in self.specs:
            count = got.get(f"{field}_n") or 0
            if how == "count":
                out[f"count:{field}"] = count
            elif how == "span":
                out[f"span:{field}"] = (got["first_at"], got["last_at"], count)
            elif how == "mean":
                out[f"mean:{field}"] = got[f"{field}_sum"] / count if count else None
            else:  # min, max, sum: none without a value
                out[f"{how}:{field}"] = float(got[f"{field}_{how}"]) if count else None
        return out


# -- from when the summaries are complete: kept in the hub's own database --------------------------------------


def _target(config: InfluxConfig) -> str:
    return "|".join((config.url.rstrip("/"), config.database, config.retention_policy or "", config.measurement))


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30)
    db.execute("CREATE TABLE IF NOT EXISTS influx_slots (target TEXT PRIMARY KEY, complete_from INTEGER NOT NULL)")
    return db


def complete_from(path: Path, config: InfluxConfig) -> int | None:
    """The time from which every slot of this InfluxDB target has its summary; None: not known (yet)."""
    if not path.exists():
        return None
    db = _connect(path)
    try:
        found = db.execute("SELECT complete_from FROM influx_slots WHERE target = ?", (_target(config),)).fetchone()
        return None if found is None else int(found[0])
    finally:
        db.close()


def record_complete_from(path: Path, config: InfluxConfig, at: int) -> None:
    db = _connect(path)
    try:
        with db:
            db.execute("INSERT OR IGNORE INTO influx_slots VALUES (?, ?)", (_target(config), at))
    finally:
        db.close()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
