"""The query side of ``store.backend: influxdb``: InfluxQL to fetch points, the hub's own logic to answer.

Whole 30-minute slots are read from the slot summaries the sink writes (hubd.store.influx.slots); other
bucket statistics InfluxDB can compute exactly are asked of it (hubd.store.influx.pushdown); the rest of this
docstring is about everything else, and about the buckets it cannot compute the same way.

InfluxQL selects and filters by time and DER well, but not the rest of the store's contract: its rows come
merged by time with no order among DERs at one instant, a field missing from a point is not NULL in a
comparison the way SQL's is, and its ``GROUP BY time()`` lays buckets of one width only (the pushdown asks
it run by run). So for raw rows and ``at`` this side fetches the points of a DER and time range (InfluxDB
does the indexing) and decides everything else in Python, the same way for both backends: conditions and the
clock flag are tested here and rows are sorted by (measured_at, der_id). Bucket statistics InfluxDB cannot
compute exactly are computed by the SQLite side's own SQL over the DER's points loaded into an in-memory
database, so the two backends cannot disagree on them. Correct first; the cost is in bench/README.md.
"""

from __future__ import annotations

import operator
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hubd.config import Config, InfluxConfig
from hubd.model import ErrorCode, HubError
from hubd.query.buckets import Bucket
from hubd.query.conditions import COMPARE
from hubd.store import CLOCK_COLUMNS, Where
from hubd.store.influx import pushdown, slots
from hubd.store.influx.client import InfluxUnavailable, SyncInflux
from hubd.store.influx.pushdown import der_condition, ns, quote_name
from hubd.store.sqlite import SqliteStore

_CHUNK = 10_000  # points per request: within a 1.x server's usual max-row-limit
_STATEMENTS = 50  # InfluxQL statements sent in one request
_GROUP = 50  # DERs whose points are fetched together for bucket statistics
_REUSE_S = 5.0  # a group's points answer the DERs after the first for this long


def _matches(point: dict[str, Any], where: Where, flagged: bool | None) -> bool:
    if flagged is not None and (point.get("clock_flag") is not None) != flagged:
        return False
    return all(point.get(f) is not None and COMPARE[op](point[f], operand) for f, op, operand in where)


class InfluxQuery:
    """Readings in InfluxDB, read from the hub's query thread (not thread-safe, like every query side)."""

    def __init__(self, config: InfluxConfig, hub_database: Path | None = None) -> None:
        self._client = SyncInflux(config)
        self._config = config
        self._hub_database = hub_database  # where the slot summaries' complete_from is kept (None: not used)
        self._complete_from: tuple[float, int | None] = (-_REUSE_S, None)  # (when read, value)
        self._from = quote_name(config.measurement)
        self._memory: SqliteStore | None = None  # bucket statistics: a group of DERs' points at a time
        self._loaded_key: tuple[int, int, tuple[str, ...]] | None = None  # what the memory holds: span, fields
        self._loaded: set[str] = set()  # and of which DERs
        self._loaded_when = 0.0  # when (monotonic)
        self._asked = ""  # the DER asked last from that load
        self._listed: list[str] = []  # the last der_ids() answer, in order
        self._found: tuple[float, tuple[int, int], list[str]] = (-_REUSE_S, (0, 0), [])  # when, span, DERs
        self._listed_at: dict[str, int] = {}
        self._measurement = config.measurement
        self._retention_policy = config.retention_policy
        self._database = config.database
        self._shard_ms: int | None = None  # the shard group duration (None: unknown)
        self._shard_asked = False
        self._pushed_key: tuple[Any, ...] | None = None  # what the pushed-down statistics are for
        self._pushed: dict[str, dict[int, dict[str, Any]]] = {}  # and them, by DER
        self._edges: dict[tuple[str, str, int, bool], tuple[int, float] | None] = {}  # nearest, asked with them
        # A group's readings of a span with some columns, kept for series() (_keep, _kept): by DER
        self._readings: tuple[int, int, frozenset[str], dict[str, list[dict[str, Any]]]] | None = None
        self._readings_when = 0.0
        self._readings_asked = ""  # the DER they were last handed to

    @classmethod
    def from_config(cls, config: Config) -> InfluxQuery:
        return cls(config.store.influxdb, config.registry_path)

    def _ask(self, statement: str) -> list[dict[str, Any]]:
        """One InfluxQL statement; InfluxDB away or failing is the protocol's ``unavailable`` for the asker."""
        try:
            return self._client.query(statement)
        except (InfluxUnavailable, RuntimeError) as exc:
            raise HubError(ErrorCode.UNAVAILABLE, f"the store (InfluxDB) cannot answer now: {exc}") from None

    def select(self, columns: tuple[str, ...], conditions: list[str], tail: str = "") -> list[dict[str, Any]]:
        """Points as {column: value} (``time`` in ms), merged by time."""
        names = ("time", "der_id", *columns)
        return [dict(zip(names, row, strict=True)) for row in self.select_rows(columns, conditions, tail)]

    def select_rows(self, columns: tuple[str, ...], conditions: list[str], tail: str = "") -> list[list[Any]]:
        """Points as [time, der_id, *columns], as InfluxDB's JSON has them (no dict per point)."""
        listed = ", ".join(quote_name(c) for c in ("der_id", *columns))
        statement = f"SELECT {listed} FROM {self._from} WHERE {' AND '.join(conditions)}{tail}"
        out: list[list[Any]] = []
        for series in self._ask(statement):
            out.extend(series["values"])
        return out

    def scan(self, start: int, end: int, conditions: list[str], columns: tuple[str, ...]) -> Iterator[dict[str, Any]]:
        """``scan_rows`` as {column: value}; ``received_at`` is among the columns."""
        columns = tuple(dict.fromkeys(("received_at", *columns)))
        names = ("time", "der_id", *columns)
        for row in self.scan_rows(start, end, conditions, columns):
            yield dict(zip(names, row, strict=True))

    def scan_rows(self, start: int, end: int, conditions: list[str], columns: tuple[str, ...]) -> Iterator[list[Any]]:
        """Every point in [start, end) meeting ``conditions``, by (time, der_id), fetched a chunk at a time, as
        [time, der_id, *columns].

        The first column should be one every point has (``received_at``): InfluxDB leaves out a point none
        of whose selected fields it has. A chunk that is full may end inside an instant (points at one time
        come in no order of DER), so its last instant is fetched whole on its own.
        """
        lo = start
        while lo < end:
            span = [f"time >= {ns(lo)}", f"time < {ns(end)}", *conditions]
            chunk = self.select_rows(columns, span, f" LIMIT {_CHUNK}")
            if len(chunk) < _CHUNK:
                yield from sorted(chunk, key=_order)
                return
            last = chunk[-1][0]
            yield from sorted((p for p in chunk if p[0] < last), key=_order)
            instant = [f"time >= {ns(last)}", f"time < {ns(last + 1)}", *conditions]
            yield from sorted(self.select_rows(columns, instant), key=_order)
            lo = last + 1

    def _chunks(
        self, start: int, end: int, conditions: list[str], columns: tuple[str, ...]
    ) -> Iterator[list[list[Any]]]:
        """Every point in [start, end) meeting ``conditions``, in chunks in no particular order, where a point
        may come twice (a full chunk's last instant is asked again from its start): for loading into a store
        whose upsert makes the second copy harmless. Half the requests of ``scan_rows``."""
        lo = start
        while lo < end:
            chunk = self.select_rows(
                columns, [f"time >= {ns(lo)}", f"time < {ns(end)}", *conditions], f" LIMIT {_CHUNK}"
            )
            yield chunk
            if len(chunk) < _CHUNK:
                return
            last = chunk[-1][0]
            if chunk[0][0] == last:  # a whole chunk at one instant: that instant whole, then on after it
                yield self.select_rows(columns, [f"time >= {ns(last)}", f"time < {ns(last + 1)}", *conditions])
                last += 1
            lo = last

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
        conditions = [der_condition(der_ids)] if der_ids else []
        if der_ids is not None and not der_ids:
            return []
        lo = max(start, after[0]) if after else start
        needed = (*fields, *(f for f, _, _ in where), *CLOCK_COLUMNS)
        out: list[tuple[Any, ...]] = []
        if limit <= 0:
            return out
        for p in self.scan(lo, end, conditions, needed):
            if after is not None and (p["time"], p["der_id"]) <= after:
                continue
            if _matches(p, where, flagged):
                out.append((p["der_id"], p["time"], *(_value(p.get(f)) for f in fields), *_clock(p)))
                if len(out) >= limit:
                    break
        return out

    def der_ids(self, start: int, end: int, first: str) -> list[str]:
        """The DERs with readings in the span, from ``first`` on; the next page of the same query (within
        ``_REUSE_S``) takes them from the last listing."""
        found_at, span, found = self._found
        if span != (start, end) or time.monotonic() - found_at >= _REUSE_S:
            statement = (
                f'SELECT last("received_at") FROM {self._from} WHERE time >= {ns(start)} AND time < {ns(end)} '
                'GROUP BY "der_id"'
            )  # last(): one point a DER, where count() would read them all
            found = sorted(series["tags"]["der_id"] for series in self._ask(statement) if series.get("tags"))
            self._found = (time.monotonic(), (start, end), found)
        listed = found[bisect_left(found, first) :]
        self.expect(listed)
        return listed

    def expect(self, der_ids: list[str]) -> None:
        """The DERs asked next, in order: ``_load``, ``_pushed_stats`` and ``series`` fetch them in groups.
        DERs all within what is expected already (one DER of the settlement view's list) keep that list."""
        if not der_ids or not all(d in self._listed_at for d in der_ids):
            self._listed, self._listed_at = der_ids, {d: i for i, d in enumerate(der_ids)}

    def bucket_stats(
        self,
        der_id: str,
        buckets: list[Bucket],
        specs: tuple[tuple[str, str], ...],
        where: Where,
        flagged: bool | None = None,
    ) -> dict[int, dict[str, Any]]:
        if not buckets:
            return {}
        if self._summarized(buckets, specs, where, flagged):
            return self._pushed_stats(der_id, buckets, specs, where, summaries=True)
        if pushdown.possible(specs, where, flagged) and self._shards_allow(buckets, specs):
            return self._pushed_stats(der_id, buckets, specs, where)
        fields = tuple(sorted({f for f, _ in specs} | {f for f, _, _ in where}))
        memory = self._load(der_id, buckets[0].lo, buckets[-1].hi, fields)
        return memory.bucket_stats(der_id, buckets, specs, where, flagged)

    def _summarized(
        self, buckets: list[Bucket], specs: tuple[tuple[str, str], ...], where: Where, flagged: bool | None
    ) -> bool:
        """Whether the slot summaries (hubd.store.influx.slots) answer: whole 30-minute slots, from the time
        the summaries are complete."""
        if self._hub_database is None or not slots.usable(buckets, specs, where, flagged):
            return False
        read_at, complete = self._complete_from
        if time.monotonic() - read_at >= _REUSE_S:
            complete = slots.complete_from(self._hub_database, self._config)
            self._complete_from = (time.monotonic(), complete)
        return complete is not None and buckets[0].lo >= complete

    def _shards_allow(self, buckets: list[Bucket], specs: tuple[tuple[str, str], ...]) -> bool:
        """Sums (and means) only for buckets each inside one shard group: across one, InfluxDB adds the
        shards' partial sums, which may differ from SQLite's in the last bit (hubd.store.influx.pushdown)."""
        if not any(how in ("mean", "sum") for _, how in specs):
            return True
        if not self._shard_asked:
            self._shard_ms, self._shard_asked = self._shard_group_ms(), True
        shard_ms = self._shard_ms
        return shard_ms is not None and not any(pushdown.crosses_shard(b, shard_ms) for b in buckets)

    def _shard_group_ms(self) -> int | None:
        try:
            found = self._ask(f"SHOW RETENTION POLICIES ON {quote_name(self._database)}")
        except HubError:
            return None
        for series in found:
            names = series["columns"]
            for row in series["values"]:
                policy = dict(zip(names, row, strict=False))
                if policy["name"] == self._retention_policy or (not self._retention_policy and policy["default"]):
                    return pushdown.go_duration_ms(str(policy["shardGroupDuration"]))
        return None

    def _pushed_stats(
        self,
        der_id: str,
        buckets: list[Bucket],
        specs: tuple[tuple[str, str], ...],
        where: Where,
        summaries: bool = False,
    ) -> dict[int, dict[str, Any]]:
        """InfluxDB's statistics for ``der_id``, asked for a group of the DERs ``der_ids`` listed (as
        ``_load`` groups them), in a few requests of many statements; from the slot summaries or the
        readings."""
        key = (buckets[0].lo, buckets[-1].hi, len(buckets), specs, where, summaries)
        fresh = time.monotonic() - self._loaded_when < _REUSE_S
        if key == self._pushed_key and der_id in self._loaded and der_id >= self._asked and fresh:
            self._asked = der_id
            return self._pushed.get(der_id, {})
        group = [der_id]
        at = self._listed_at.get(der_id)
        if at is not None:
            group = self._listed[at : at + max(1, min(pushdown.GROUP, pushdown.ROWS // len(buckets)))]
        plan: pushdown.Plan | slots.SlotPlan
        if summaries:
            plan = slots.SlotPlan(self._config, buckets, specs)
        else:
            plan = pushdown.Plan(self._measurement, buckets, specs, where)
        everyone = at == 0 and len(group) == len(self._listed)  # no DER condition: cheaper for InfluxDB
        condition = None if everyone else pushdown.ders_condition(tuple(group))
        self._pushed, self._edges = plan.read(self._ask_all(plan.statements(condition, len(group))))
        if isinstance(plan, slots.SlotPlan):  # each DER's open slot has no summary: from its readings
            for index, der_ids in plan.unsummarized(group, self._pushed).items():
                condition = pushdown.ders_condition(tuple(der_ids))
                lo, hi, columns = buckets[index].lo, buckets[-1].hi, ("clock_flag", *plan.quantities)
                readings = list(self.scan(lo, hi, [condition], columns))
                self._keep(lo, hi, columns, der_ids, readings, der_id)  # delta reads a register's last slot
                for der, by_index in plan.from_readings(readings).items():
                    self._pushed.setdefault(der, {}).update(by_index)
        self._pushed_key, self._loaded_key, self._loaded = key, None, set(group)
        self._loaded_when, self._asked = time.monotonic(), der_id
        return self._pushed.get(der_id, {})

    def _ask_all(self, statements: list[tuple[str, int]]) -> list[list[dict[str, Any]]]:
        """The answers to ``statements`` (each with the rows it may answer), in as few requests as the
        server's row limit allows (it counts the rows of all a request's statements)."""
        answers: list[list[dict[str, Any]]] = []
        request: list[str] = []
        rows = 0
        for statement, more in statements:
            if request and (rows + more > pushdown.ROWS or len(request) >= _STATEMENTS):
                answers += self._ask_many(request)
                request, rows = [], 0
            request.append(statement)
            rows += more
        return answers + self._ask_many(request)

    def _ask_many(self, statements: list[str]) -> list[list[dict[str, Any]]]:
        try:
            return self._client.query_many(statements)
        except (InfluxUnavailable, RuntimeError) as exc:
            raise HubError(ErrorCode.UNAVAILABLE, f"the store (InfluxDB) cannot answer now: {exc}") from None

    def _load(self, der_id: str, start: int, end: int, fields: tuple[str, ...]) -> SqliteStore:
        """The in-memory database holding ``der_id``'s points in [start, end) with ``fields``.

        A query over many DERs asks for them one at a time, in the order ``der_ids`` gave them: the points
        of the next ``_GROUP`` DERs are fetched together, in one request, so that InfluxDB's cost per request
        (and the database's per load) is paid once per group, not per DER. A group is used only by the DERs
        after the one that loaded it, in order, within ``_REUSE_S``: the next query (or page) reads afresh.
        """
        if self._memory is None:
            self._memory = SqliteStore(Path(":memory:"))
        memory = self._memory
        key = (start, end, fields)
        fresh = time.monotonic() - self._loaded_when < _REUSE_S
        if key == self._loaded_key and der_id in self._loaded and der_id > self._asked and fresh:
            self._asked = der_id
            return memory
        group = [der_id]
        at = self._listed_at.get(der_id)
        if at is not None:
            group = self._listed[at : at + _GROUP]
        memory.clear()
        self._pushed_key, self._edges = None, {}
        columns = ("received_at", *fields, "clock_flag")
        for rows in self._chunks(start, end, [der_condition(tuple(group))], columns):
            loaded = [(r[1], r[0], *r[3:]) for r in rows]
            loaded.sort(key=_KEY)  # in primary-key order: about half the cost of inserting in time order
            memory.load(columns[1:], loaded)
        self._loaded_key, self._loaded = key, set(group)
        self._loaded_when, self._asked = time.monotonic(), der_id
        return memory

    def nearest(self, der_id: str, field: str, at: int, before: bool) -> tuple[int, float] | None:
        if (der_id, field, at, before) in self._edges and time.monotonic() - self._loaded_when < _REUSE_S:
            return self._edges.pop((der_id, field, at, before))  # asked with the bucket statistics
        side = f"time < {ns(at)}" if before else f"time >= {ns(at)}"
        order = " ORDER BY time DESC LIMIT 1" if before else " LIMIT 1"
        found = self.select((field,), [der_condition((der_id,)), side], order)
        return (found[0]["time"], float(found[0][field])) if found else None

    def series(self, der_id: str, start: int, end: int, fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """The DER's readings with all ``fields``: from the readings a slot query just read for its group
        (``_kept``: ``delta`` checks a register's last slot, which is the DERs' open slot), else asked."""
        kept = self._kept(der_id, start, end, fields)
        if kept is not None:
            return [
                (r["time"], *(float(r[f]) for f in fields))
                for r in kept
                if start <= r["time"] < end and all(r.get(f) is not None for f in fields)
            ]
        # Only the fields: InfluxDB leaves out a point with none of them, which is left out here anyway (an
        # interval energy asked of a register-only DER costs nothing).
        rows = self.scan_rows(start, end, [der_condition((der_id,))], fields)
        return [(r[0], *(float(v) for v in r[2:])) for r in rows if None not in r[2:]]

    def _keep(
        self,
        start: int,
        end: int,
        columns: tuple[str, ...],
        der_ids: list[str],
        readings: Iterable[dict[str, Any]],
        asked: str,
    ) -> None:
        """Keep a group's readings of [start, end) for the DERs asked after ``asked`` within ``_REUSE_S``."""
        by_der: dict[str, list[dict[str, Any]]] = {d: [] for d in der_ids}
        for r in readings:
            by_der[r["der_id"]].append(r)
        self._readings = (start, end, frozenset(columns), by_der)
        self._readings_when, self._readings_asked = time.monotonic(), asked

    def _kept(self, der_id: str, start: int, end: int, fields: tuple[str, ...]) -> list[dict[str, Any]] | None:
        if self._readings is None or time.monotonic() - self._readings_when >= _REUSE_S:
            return None
        lo, hi, columns, by_der = self._readings
        if der_id not in by_der or der_id < self._readings_asked or not (lo <= start and end <= hi):
            return None
        if not columns.issuperset(fields):
            return None
        self._readings_asked = der_id
        return by_der[der_id]

    def flagged_series(self, der_id: str, start: int, end: int, fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        return [
            (p["time"], *(float(p[f]) for f in fields), int(p.get("clock_flag") is not None))
            for p in self.scan(start, end, [der_condition((der_id,))], (*fields, "clock_flag"))
            if all(p.get(f) is not None for f in fields)
        ]

    def count(self) -> int:
        found = self._ask(f'SELECT count("received_at") FROM {self._from}')
        return int(found[0]["values"][0][1]) if found else 0

    def close(self) -> None:
        self._client.close()
        if self._memory is not None:
            self._memory.close()
            self._memory = None


_KEY = operator.itemgetter(0, 1)


def _order(p: list[Any]) -> tuple[int, str]:
    return p[0], p[1]


def _value(value: Any) -> float | None:
    """A quantity as SQLite gives it: JSON brings 2.0 back as 2."""
    return None if value is None else float(value)


def _clock(p: dict[str, Any]) -> tuple[str | None, float | None]:
    offset = p.get("clock_offset_s")
    return p.get("clock_flag"), None if offset is None else float(offset)
