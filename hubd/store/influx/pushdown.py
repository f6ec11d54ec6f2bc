"""Bucket statistics computed inside InfluxDB, giving exactly what the SQLite store's SQL gives.

The hub lays the buckets itself (hubd.query.buckets: local midnights, daylight-saving days of 23 or 25 hours)
and InfluxDB only aggregates within them. Consecutive buckets of one width form a *run*, asked as
``time >= lo AND time < hi GROUP BY time(width, offset), "der_id"`` in UTC, with the offset the run's first
start modulo its width: a 30-minute day with a clock change is just 46 or 50 buckets of one run, a ``1d``
bucket of 23 hours a run of its own. InfluxQL's ``tz()`` is not needed (InfluxDB 1.6 lays a London day of 23
hours correctly with it too, but the hub's own buckets are the reference).

What InfluxDB computes, for a group of DERs at once:

- ``n``, ``flagged``, ``count``, ``min``, ``max``: ``count("received_at")`` (every point has it),
  ``count("clock_flag")`` and the field's ``count``/``min``/``max``, in one statement per run.
- ``sum`` and ``mean``: InfluxDB's ``sum`` and ``mean`` (a sum divided by the count, like SQLite's ``avg``).
  Both add a bucket's values one at a time in time order; but InfluxDB adds each shard's part apart and then the parts,
  which can differ in the last bit, so when a bucket crosses a shard group boundary (the retention policy's
  ``shardGroupDuration``) these are not pushed down.
- ``first``/``last`` and ``span`` (the times of a bucket's first and last reading, for ``delta``): one selector
  statement per bucket, ``SELECT first(f) ... GROUP BY "der_id"``: without ``GROUP BY time()`` a selector
  keeps the point's own time, which ``delta`` needs to interpolate at the bucket edges.
- The register's readings either side of the range (``nearest``, for ``delta``): one ``last``/``first``
  statement per group.

Not pushed down, computed by the hub from the points as before (hubd.store.influx.query): a ``clock_flagged``
filter (InfluxQL has no ``IS NULL``) and a ``ne`` condition (InfluxQL and SQL differ on a missing field).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from hubd.query.buckets import Bucket
from hubd.store import Where

_GO_ZERO_MS = 62_135_596_800_000  # Go's zero time (year 1) before 1970: InfluxDB aligns shard groups to it
_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "="}
_SELECTORS = ("first", "last", "span")
ROWS = 10_000  # DER x bucket rows per statement at most (a server's usual max-row-limit)
GROUP = 1_000  # DERs asked together at most (each named in every statement, unless they are all there are)
# InfluxDB's timestamps are int64 nanoseconds: 1677-09-21 … 2262-04-11. A query range is clamped to them.
_LOWEST_MS = -9_223_372_036_854
_HIGHEST_MS = 9_223_372_036_854


def ns(ms: int) -> int:
    return min(max(ms, _LOWEST_MS), _HIGHEST_MS) * 1_000_000


def quote_name(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def go_duration_ms(text: str) -> int | None:
    """``168h0m0s`` as milliseconds; None for what is not a duration of hours, minutes and seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not text or parts is None:
        return None
    h, m, s = (int(p or 0) for p in parts.groups())
    return ((h * 60 + m) * 60 + s) * 1000 or None


def crosses_shard(bucket: Bucket, shard_ms: int) -> bool:
    return (bucket.lo + _GO_ZERO_MS) // shard_ms != (bucket.hi - 1 + _GO_ZERO_MS) // shard_ms


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive buckets of one width: one ``GROUP BY time()`` statement."""

    first: int  # index of its first bucket
    count: int
    width: int
    offset: int
    lo: int
    hi: int


def runs(buckets: list[Bucket]) -> list[Run]:
    out: list[Run] = []
    for index, b in enumerate(buckets):
        width = b.end - b.start
        last = out[-1] if out else None
        if last is not None and last.width == width and buckets[index - 1].end == b.start:
            out[-1] = Run(last.first, last.count + 1, width, last.offset, last.lo, b.hi)
        else:
            out.append(Run(index, 1, width, b.start % width, b.lo, b.hi))
    return out


def possible(specs: tuple[tuple[str, str], ...], where: Where, flagged: bool | None) -> bool:
    """Whether InfluxDB can compute these statistics exactly (the shard rule aside)."""
    known = {"mean", "min", "max", "sum", "count", *_SELECTORS}
    return flagged is None and all(op in _OPS for _, op, _ in where) and all(how in known for _, how in specs)


_PLAIN_ID = re.compile(r"[A-Za-z0-9._:-]+\Z")  # the registry's DER ids (hubd.auth.registry.ID_PATTERN)


def ders_regex(der_ids: tuple[str, ...]) -> str | None:
    """The group's DERs as one regular expression, which InfluxDB matches about twice as fast as an OR of
    equalities (bench/README.md, InfluxDB); None when an id has other characters than the registry allows."""
    if not all(_PLAIN_ID.match(d) for d in der_ids):
        return None
    return '"der_id" =~ /^(?:' + "|".join(re.sub(r"([.:-])", r"\\\1", d) for d in der_ids) + ")$/"


def quote_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def der_condition(der_ids: tuple[str, ...]) -> str:
    return "(" + " OR ".join(f'"der_id" = {quote_value(d)}' for d in der_ids) + ")"


def ders_condition(der_ids: tuple[str, ...]) -> str:
    """The DERs as one regular expression where their ids allow it, else as an OR of equalities."""
    return ders_regex(der_ids) or der_condition(der_ids)


def where_sql(where: Where) -> str:
    return "".join(f" AND {quote_name(f)} {_OPS[op]} {float(v)!r}" for f, op, v in where)


class Plan:
    """The statements for one group of DERs and how their answers become each DER's statistics."""

    def __init__(
        self,
        measurement: str,
        buckets: list[Bucket],
        specs: tuple[tuple[str, str], ...],
        where: Where,
    ) -> None:
        self.buckets = buckets
        self.specs = specs
        self._from = quote_name(measurement)
        self._where = where_sql(where)
        self._starts = [b.start for b in buckets]
        counted = {f for f, how in specs if how in ("count", "span")}
        self._aggregates = [("count", "received_at"), ("count", "clock_flag")]
        self._aggregates += [("count", f) for f in sorted(counted)]
        self._aggregates += [(how, f) for f, how in specs if how in ("min", "max", "mean", "sum")]
        self._aggregates = list(dict.fromkeys(self._aggregates))
        # per bucket: (selector, field) statements; span reads the first and last point of any field
        picks: list[tuple[str, str]] = []
        for field, how in specs:
            if how == "span":
                picks += [("first", "received_at"), ("last", "received_at")]
            elif how in ("first", "last"):
                picks.append((how, field))
        self._picks = list(dict.fromkeys(picks))
        self._edges = Edges(measurement, sorted({f for f, how in specs if how == "span"}))

    def statements(self, der_condition: str | None, ders: int) -> list[tuple[str, int]]:
        """Each statement with the rows it may answer (to keep a request within a server's row limit), for
        ``ders`` DERs named by ``der_condition`` (None: every DER, when the group is all there are)."""
        also = f" AND {der_condition}" if der_condition else ""
        listed = ", ".join(f"{how}({quote_name(f)})" for how, f in self._aggregates)
        out = []
        for run in runs(self.buckets):
            span = f"time >= {ns(run.lo)} AND time < {ns(run.hi)}"
            by = f'GROUP BY time({run.width}ms, {run.offset}ms), "der_id" fill(none)'
            out.append((f"SELECT {listed} FROM {self._from} WHERE {span}{also}{self._where} {by}", ders * run.count))
        for b in self.buckets:
            for how, f in self._picks:
                span = f"time >= {ns(b.lo)} AND time < {ns(b.hi)}"
                selected = f"{how}({quote_name(f)})"
                out.append(
                    (f'SELECT {selected} FROM {self._from} WHERE {span}{also}{self._where} GROUP BY "der_id"', ders)
                )
        return out + self._edges.statements(self.buckets[0].lo, self.buckets[-1].hi, also, ders)

    def read(
        self, answers: list[list[dict[str, Any]]]
    ) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[tuple[str, str, int, bool], tuple[int, float] | None]]:
        """Each DER's statistics by bucket index, and the register's readings either side of the range
        (keyed as ``nearest`` is asked: der_id, field, at, before)."""
        stats: dict[str, dict[int, dict[str, Any]]] = {}
        count_runs = len(runs(self.buckets))
        for series_list in answers[:count_runs]:
            for series in series_list:
                der = series["tags"]["der_id"]
                for row in series["values"]:
                    if row[1]:
                        index = bisect_right(self._starts, row[0]) - 1
                        stats.setdefault(der, {})[index] = self._aggregate_stats(row[1:])
        position = count_runs
        picked: dict[tuple[str, int, str, str], tuple[int, Any]] = {}
        for index in range(len(self.buckets)):
            for how, f in self._picks:
                for series in answers[position]:
                    time_ms, value = series["values"][0]
                    picked[(series["tags"]["der_id"], index, how, f)] = (time_ms, value)
                position += 1
        for der, by_index in stats.items():
            for index, s in by_index.items():
                self._selected(der, index, s, picked)
        return stats, self._edges.read(answers[position:], stats, self.buckets[0].lo, self.buckets[-1].hi)

    def _aggregate_stats(self, values: list[Any]) -> dict[str, Any]:
        got = dict(zip(self._aggregates, values, strict=True))
        for key in got:  # InfluxDB counts a field a series never had as null, SQL as 0
            if key[0] == "count":
                got[key] = got[key] or 0
        out: dict[str, Any] = {"n": got[("count", "received_at")], "flagged": got[("count", "clock_flag")]}
        for field, how in self.specs:
            if how in ("min", "max", "sum", "mean"):
                out[f"{how}:{field}"] = _float(got[(how, field)])
            elif how == "count":
                out[f"count:{field}"] = got[("count", field)]
            elif how == "span":  # the times come from the selectors (_selected)
                out[f"span:{field}"] = (None, None, got[("count", field)])
        return out

    def _selected(
        self, der: str, index: int, s: dict[str, Any], picked: dict[tuple[str, int, str, str], tuple[int, Any]]
    ) -> None:
        for field, how in self.specs:
            if how == "span":
                first = picked.get((der, index, "first", "received_at"), (None, None))[0]
                last = picked.get((der, index, "last", "received_at"), (None, None))[0]
                s[f"span:{field}"] = (first, last, s[f"span:{field}"][2])
            elif how in ("first", "last"):
                at, value = picked.get((der, index, how, field), (None, None))
                s[f"{how}:{field}"] = (at, _float(value))


class Edges:
    """A register's readings either side of a query's range (``nearest``, for ``delta``), for a group of
    DERs at once: a ``last``/``first`` statement per field and side, with no condition but the DERs'."""

    def __init__(self, measurement: str, fields: list[str]) -> None:
        self._from = quote_name(measurement)
        self._fields = fields

    def statements(self, lo: int, hi: int, also: str, ders: int) -> list[tuple[str, int]]:
        out = []
        for f in self._fields:
            for pick, side in (("last", f"time < {ns(lo)}"), ("first", f"time >= {ns(hi)}")):
                selected = f"{pick}({quote_name(f)})"
                out.append((f'SELECT {selected} FROM {self._from} WHERE {side}{also} GROUP BY "der_id"', ders))
        return out

    def read(
        self, answers: list[list[dict[str, Any]]], stats: dict[str, Any], lo: int, hi: int
    ) -> dict[tuple[str, str, int, bool], tuple[int, float] | None]:
        """Keyed as ``nearest`` is asked (der_id, field, at, before); None for a DER of ``stats`` with none."""
        edges: dict[tuple[str, str, int, bool], tuple[int, float] | None] = {}
        position = 0
        for f in self._fields:
            for before, at in ((True, lo), (False, hi)):
                for der in stats:
                    edges[(der, f, at, before)] = None
                for series in answers[position]:
                    time_ms, value = series["values"][0]
                    edges[(series["tags"]["der_id"], f, at, before)] = (time_ms, float(value))
                position += 1
        return edges


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
