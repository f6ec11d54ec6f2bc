"""30-minute slot summaries beside the readings, so a settlement query reads a point per DER and slot.

Why: InfluxDB 1.x aggregates about 0.4 µs per reading and statistic (bench/README.md, bench/influx), so the
statistics a settlement slot needs cost it several times SQLite's whole query. The sink therefore writes a
summary of each DER's 30-minute slot (UTC, from every :00 and :30) once the slot is *closed*, and a bucket
query whose buckets are exactly these slots reads the summaries.

Layout (docs/operations.md, InfluxDB): measurement ``<measurement>_30m``, tag ``der_id``, time = the slot's
start; fields ``n`` (readings), ``clock_flagged`` (readings with a clock flag), ``first_at``/``last_at`` (ms,
the slot's first and last reading) and per quantity ``q``: ``q_n``, ``q_min``, ``q_max``, ``q_sum``.
``q_sum`` adds the values in time order, as SQLite's ``sum``/``avg`` and InfluxDB's ``sum`` within a shard
do, so ``q_sum / q_n`` is SQLite's ``avg`` to the last bit.

When a summary is written: a DER's *open* slot is the one holding its newest reading; it has no summary (a
live slot would be rewritten with every batch, doubling what InfluxDB takes in). After each batch is stored,
every slot the batch touched and the DER's previous open slot are summarized, except the DER's open slot:
slots made only of the batch's readings in Python, slots with stored readings by InfluxDB's own aggregates
of what it now holds. So a closed slot with readings always has a summary that agrees with them; a query
reads the summaries of closed slots and asks InfluxDB for the open ones. The slots a batch will summarize
are noted in the spool's file before its readings are written and cleared once the summaries are, so a crash
in between is made good at the next start.

The summaries are complete from the time recorded in the hub's database (``complete_from``): from the start
for a database the hub began writing empty, else from the slot after the newest reading it found there.
"""

from __future__ import annotations

import sqlite3
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hubd.config import InfluxConfig
from hubd.model import FIELDS
from hubd.query.buckets import Bucket
from hubd.store import Where
from hubd.store.influx import pushdown
from hubd.store.influx.lines import Point, escape_tag
from hubd.store.influx.pushdown import ns, quote_name

SLOT_MS = 1_800_000
_QUANTITIES = frozenset(FIELDS)
_KNOWN = frozenset(("count", "min", "max", "sum", "mean", "span"))
SlotKey = tuple[str, int]  # (der_id, slot start)


def measurement(config: InfluxConfig) -> str:
    return f"{config.measurement}_30m"


def slot_of(at: int) -> int:
    return at - at % SLOT_MS


class Summary:
    """One DER's readings in one slot."""

    __slots__ = ("first_at", "flagged", "last_at", "n", "stats")

    def __init__(self) -> None:
        self.n = 0
        self.flagged = 0
        self.first_at = 0
        self.last_at = 0
        self.stats: dict[str, list[Any]] = {}  # quantity -> [count, min, max, sum]

    def add(self, at: int, values: dict[str, Any]) -> None:
        """One reading, in time order."""
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
                    self.stats[name] = [1, v, v, 0.0 + v]  # 0.0 + v: a sum starts from 0.0 (so -0.0 gives 0.0)
                else:
                    s[0] += 1
                    s[1] = min(s[1], v)
                    s[2] = max(s[2], v)
                    s[3] += v

    def line(self, tag: str, slot: int) -> str:
        """As a line of ``tag`` (measurement and DER, escaped). A quantity the slot lacks is written with a
        count of 0: InfluxDB keeps a field a point is written again without, and a replaced reading may have
        taken the slot's last value of it away."""
        fields = [f"n={self.n}i,clock_flagged={self.flagged}i,first_at={self.first_at}i,last_at={self.last_at}i"]
        for q in FIELDS:
            s = self.stats.get(q)
            fields.append(
                f"{q}_n=0i" if s is None else f"{q}_n={s[0]}i,{q}_min={s[1]!r},{q}_max={s[2]!r},{q}_sum={s[3]!r}"
            )
        return f"{tag} {','.join(fields)} {slot}"


# -- the write side ------------------------------------------------------------------------------------------


def to_summarize(points: Iterable[Point], latest: dict[str, int]) -> tuple[set[SlotKey], set[SlotKey]]:
    """The slots a batch closes or changes: (every one of them, those made of the batch's readings alone).

    ``latest``: each DER's newest stored time before the batch. Every slot the batch touches and each DER's
    previous open slot, except the DER's open slot after the batch; a slot later than the DER's previous
    open one holds only the batch's readings."""
    touched: dict[str, set[int]] = {}
    for der_id, at, _ in points:  # on the write path of every reading: kept plain
        found = touched.get(der_id)
        if found is None:
            touched[der_id] = {at - at % SLOT_MS}
        else:
            found.add(at - at % SLOT_MS)
    closing: set[SlotKey] = set()
    fresh: set[SlotKey] = set()
    for der_id, found in touched.items():
        before = latest.get(der_id)
        if before is not None:
            previous = before - before % SLOT_MS
            if len(found) == 1 and previous in found:  # the usual batch: the open slot goes on
                continue
            found.add(previous)
        open_slot = max(found)
        for slot in found:
            if slot != open_slot:
                closing.add((der_id, slot))
                if before is None or slot > slot_of(before):
                    fresh.add((der_id, slot))
    return closing, fresh


def summarize_points(points: Iterable[Point], keys: set[SlotKey]) -> dict[SlotKey, Summary]:
    """The summaries of ``keys`` from the batch's own readings (slots with nothing stored before)."""
    found: dict[SlotKey, list[Point]] = defaultdict(list)
    for p in points:
        key = (p[0], slot_of(p[1]))
        if key in keys:
            found[key].append(p)
    out: dict[SlotKey, Summary] = {}
    for key, listed in found.items():
        summary = out[key] = Summary()
        for _, at, values in sorted(listed, key=lambda p: p[1]):
            summary.add(at, values)
    return out


class Stored:
    """Summaries of slots with stored readings, by InfluxDB's aggregates of what it holds: per slot, one
    statement for the counts, extremes and sums of its DERs, and one each for their first and last reading
    (a selector without ``GROUP BY time()`` keeps the reading's own time)."""

    _AGGREGATES = [("count", "received_at"), ("count", "clock_flag")] + [
        (how, q) for q in FIELDS for how in ("count", "min", "max", "sum")
    ]

    def __init__(self, config: InfluxConfig) -> None:
        self._from = quote_name(config.measurement)

    def statements(self, slot: int, der_ids: list[str]) -> list[str]:
        condition = pushdown.ders_condition(tuple(der_ids))
        where = f"WHERE time >= {ns(slot)} AND time < {ns(slot + SLOT_MS)} AND {condition}"
        listed = ", ".join(f"{how}({quote_name(f)})" for how, f in self._AGGREGATES)
        return [
            f'SELECT {listed} FROM {self._from} {where} GROUP BY "der_id"',
            f'SELECT first("received_at") FROM {self._from} {where} GROUP BY "der_id"',
            f'SELECT last("received_at") FROM {self._from} {where} GROUP BY "der_id"',
        ]

    def read(self, slot: int, answers: list[list[dict[str, Any]]]) -> dict[SlotKey, Summary]:
        aggregates, firsts, lasts = answers
        out: dict[SlotKey, Summary] = {}
        for series in aggregates:
            row = series["values"][0]
            got = dict(zip(self._AGGREGATES, row[1:], strict=True))
            if not got[("count", "received_at")]:
                continue
            summary = out[(series["tags"]["der_id"], slot)] = Summary()
            summary.n = got[("count", "received_at")]
            summary.flagged = got[("count", "clock_flag")] or 0
            for q in FIELDS:
                if got[("count", q)]:
                    summary.stats[q] = [
                        got[("count", q)],
                        float(got[("min", q)]),
                        float(got[("max", q)]),
                        float(got[("sum", q)]),
                    ]
        for answer, name in ((firsts, "first_at"), (lasts, "last_at")):
            for series in answer:
                found = out.get((series["tags"]["der_id"], slot))
                if found is not None:
                    setattr(found, name, int(series["values"][0][0]))
        return out


def lines(config: InfluxConfig, summaries: dict[SlotKey, Summary]) -> list[str]:
    tag = escape_tag(measurement(config))
    return [s.line(f"{tag},der_id={escape_tag(d)}", slot) for (d, slot), s in summaries.items()]


# -- the read side -------------------------------------------------------------------------------------------


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
    """The statements for one group of DERs' slot statistics and how their answers become each DER's
    statistics (the interface of hubd.store.influx.pushdown.Plan). A DER's slots after its last summary in
    the range are its open slot, or empty (or, while a batch is being written, not summarized yet): their
    readings are read (``unsummarized``) and summarized here (``from_readings``)."""

    def __init__(self, config: InfluxConfig, buckets: list[Bucket], specs: tuple[tuple[str, str], ...]) -> None:
        self.buckets = buckets
        self.specs = specs
        self._from = quote_name(measurement(config))
        self._index = {b.start: i for i, b in enumerate(buckets)}
        self.quantities = tuple(sorted({f for f, _ in specs}))
        needed = {"count": "n", "span": "n", "mean": "sum", "min": "min", "max": "max", "sum": "sum"}
        columns = [f"{f}_{part}" for f, how in specs for part in ("n", needed[how])]
        self._columns = list(dict.fromkeys(["n", "clock_flagged", "first_at", "last_at", *columns]))  # no more:
        # InfluxDB's cost grows with each field read
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
            by_index = stats.setdefault(series["tags"]["der_id"], {})
            make = self._maker(series["columns"])
            n = series["columns"].index("n")
            for row in series["values"]:
                index = self._index.get(row[0])
                if index is not None and row[n]:
                    by_index[index] = make(row)
        return stats, self._edges.read(answers[1:], stats, self.buckets[0].lo, self.buckets[-1].hi)

    def unsummarized(self, der_ids: list[str], stats: dict[str, dict[int, Any]]) -> dict[int, list[str]]:
        """The DERs by the first bucket after their last summary (0: none in the range), where it is one."""
        out: dict[int, list[str]] = {}
        for der_id in der_ids:
            summarized = stats.get(der_id)
            start = max(summarized) + 1 if summarized else 0
            if start < len(self.buckets):
                out.setdefault(start, []).append(der_id)
        return out

    def from_readings(self, readings: Iterable[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
        """Statistics of the buckets these readings (in time order, as ``InfluxQuery.scan`` gives them) fall
        in, made as the summaries are, so both answer alike."""
        found: dict[tuple[str, int], Summary] = {}
        starts = [b.start for b in self.buckets]
        for r in readings:
            index = bisect_right(starts, r["time"]) - 1
            key = (r["der_id"], index)
            summary = found.get(key) or found.setdefault(key, Summary())
            summary.add(r["time"], r)
        make = self._maker(["time", *self._columns])
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for (der_id, index), summary in found.items():
            values = {"n": summary.n, "clock_flagged": summary.flagged}
            values |= {"first_at": summary.first_at, "last_at": summary.last_at}
            for q, parts in summary.stats.items():
                values |= dict(zip((f"{q}_n", f"{q}_min", f"{q}_max", f"{q}_sum"), parts, strict=True))
            out.setdefault(der_id, {})[index] = make([None, *(values.get(c) for c in self._columns)])
        return out

    def _maker(self, columns: list[str]) -> Callable[[list[Any]], dict[str, Any]]:
        """How a row of these columns (time first, then ``_columns`` as InfluxDB kept them: it leaves out a
        field the measurement never had) becomes the statistics ``bucket_stats`` gives, SQLite's way:
        a count of 0 and no value where the slot had none. One row per DER and slot: kept cheap."""
        at = {c: i for i, c in enumerate(columns)}
        n, flagged, first_at, last_at = at["n"], at["clock_flagged"], at["first_at"], at["last_at"]
        picks = []
        for field, how in self.specs:
            count = at.get(f"{field}_n")
            value = at.get(f"{field}_{'sum' if how == 'mean' else how}")
            picks.append((f"{how}:{field}", how, count, value))

        def make(row: list[Any]) -> dict[str, Any]:
            out: dict[str, Any] = {"n": row[n], "flagged": row[flagged] or 0}
            for key, how, count_at, value_at in picks:
                count = (row[count_at] or 0) if count_at is not None else 0
                if how == "count":
                    out[key] = count
                elif how == "span":
                    out[key] = (row[first_at], row[last_at], count)
                elif not count or value_at is None:
                    out[key] = None
                elif how == "mean":
                    out[key] = row[value_at] / count
                else:  # min, max, sum
                    out[key] = float(row[value_at])
            return out

        return make


# -- from when the summaries are complete: kept in the hub's own database --------------------------------------


def _target(config: InfluxConfig) -> str:
    """The database, retention policy and measurement: not the URL, which may change while the data stays."""
    return "|".join((config.database, config.retention_policy or "", config.measurement))


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30)
    db.execute("CREATE TABLE IF NOT EXISTS influx_slots (target TEXT PRIMARY KEY, complete_from INTEGER NOT NULL)")
    return db


def complete_from(path: Path, config: InfluxConfig) -> int | None:
    """The time from which every closed slot of this InfluxDB target has its summary; None: not known (yet)."""
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
