"""Run a Query against a store and shape one page of the answer.

Raw rows are ordered by (measured_at, der_id), instants and buckets by DER (then bucket). The cursor is the
key of the last row given, so the next page resumes exactly after it even when new readings arrive between
pages: nothing lost, nothing repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from hubd.model import format_time
from hubd.query import energy
from hubd.query.buckets import Bucket, buckets
from hubd.query.conditions import COMPARE, Query, encode_cursor
from hubd.store import CLOCK_COLUMNS, ReadingQuery


def run(query: Query, store: ReadingQuery) -> dict[str, Any]:
    """One page of the answer: ``{"ok": true, "rows": [...], "count": n, "next_cursor": ...}``, and
    ``"unknown_der_ids"`` when ``der_ids`` named DERs the registry does not know (on every page)."""
    if query.mode == "raw":
        answer = _raw(query, store)
    elif query.mode == "at":
        answer = _at(query, store)
    else:
        answer = _buckets(query, store)
    if query.unknown_der_ids:
        answer["unknown_der_ids"] = list(query.unknown_der_ids)
    return answer


def columns(query: Query) -> list[str]:
    """Every key a row of this query may have, in order: a table's header even when no row comes back."""
    if query.mode != "buckets":
        return ["der_id", "measured_at", *query.fields]
    slot = ["slot"] if query.interval == "30m" else []
    return ["der_id", "bucket_start", *slot, *(name for _, _, name in query.columns), "n"]


def _page(rows: list[dict[str, Any]], keys: list[tuple[Any, ...]], limit: int) -> dict[str, Any]:
    """Cut at ``limit``; a cursor (the last row's key) only when more rows follow."""
    cursor = encode_cursor(*keys[limit - 1]) if len(rows) > limit else None
    rows = rows[:limit]
    return {"ok": True, "rows": rows, "count": len(rows), "next_cursor": cursor}


def _shape(fields: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    """A raw row: its quantities, and its clock flag and estimated offset when it has one."""
    out: dict[str, Any] = {"der_id": row[0], "measured_at": format_time(row[1])}
    for name, value in zip((*fields, *CLOCK_COLUMNS), row[2:], strict=True):
        if value is not None:
            out[name] = value
    return out


def _raw(query: Query, store: ReadingQuery) -> dict[str, Any]:
    after = (query.cursor[0], query.cursor[1]) if query.cursor else None
    found = store.raw(
        query.start, query.end, query.der_ids, query.fields, query.where, after, query.limit + 1, query.flagged
    )
    return _page([_shape(query.fields, row) for row in found], [(row[1], row[0]) for row in found], query.limit)


def _matches(query: Query, values: dict[str, Any]) -> bool:
    return all(
        values.get(field) is not None and COMPARE[op](values[field], operand) for field, op, operand in query.where
    )


def _at(query: Query, store: ReadingQuery) -> dict[str, Any]:
    """Per DER, the reading nearest to ``at`` within the tolerance (the earlier one on a tie)."""
    after = query.cursor[0] if query.cursor else ""
    nearest: dict[str, tuple[Any, ...]] = {}
    cursor: tuple[int, str] | None = None
    while True:  # the window is small (± tolerance), but page through it all the same
        batch = store.raw(query.start, query.end, query.der_ids, query.fields, (), cursor, 50_000, query.flagged)
        for row in batch:
            if row[0] <= after:
                continue
            best = nearest.get(row[0])
            if best is None or abs(row[1] - query.at) < abs(best[1] - query.at):
                nearest[row[0]] = row
        if len(batch) < 50_000:
            break
        cursor = (batch[-1][1], batch[-1][0])
    rows = []
    for der_id in sorted(nearest):
        row = nearest[der_id]
        if _matches(query, dict(zip(query.fields, row[2:], strict=False))):
            rows.append(_shape(query.fields, row))
            if len(rows) > query.limit:
                break
    return _page(rows, [(row["der_id"],) for row in rows], query.limit)


def _buckets(query: Query, store: ReadingQuery) -> dict[str, Any]:
    laid = buckets(query.start, query.end, query.interval, query.tz)
    after_der, after_bucket = query.cursor if query.cursor else ("", -1)
    ders: Sequence[str]
    if query.der_ids is None:
        ders = store.der_ids(query.start, query.end, after_der)
    else:
        ders = query.der_ids
        store.expect([d for d in ders if d >= after_der])
    specs = _store_specs(query.agg)
    labels = [format_time(bucket.start) for bucket in laid]
    rows: list[dict[str, Any]] = []
    keys: list[tuple[str, int]] = []
    for der_id in ders:
        if der_id < after_der:
            continue
        stats = store.bucket_stats(der_id, laid, specs, query.where, query.flagged)
        energies = _energy(query, store, der_id, laid, stats)
        _flagged_shares(query, store, der_id, laid, stats, energies)
        for index in sorted(set(stats) | set(energies)):
            bucket = laid[index]
            if der_id == after_der and bucket.start <= after_bucket:
                continue
            row = _bucket_row(query, der_id, labels[index], bucket, stats.get(index, _EMPTY), energies.get(index, {}))
            rows.append(row)
            keys.append((der_id, bucket.start))
        if len(rows) > query.limit:
            break
    return _page(rows, keys, query.limit)


_EMPTY: dict[str, Any] = {"n": 0}


def _store_specs(agg: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """What to ask the store for: delta needs the times of the register's first and last reading and its
    lowest and highest value per bucket, all from one pass."""
    specs: list[tuple[str, str]] = []
    for field, how in agg:
        if how == "delta":
            specs += [(field, "span"), (field, "min"), (field, "max")]
        elif not (how == "sum" and field == "energy_interval_kwh"):
            specs.append((field, how))
    return tuple(dict.fromkeys(specs))


def _energy(
    query: Query, store: ReadingQuery, der_id: str, laid: list[Bucket], stats: dict[int, dict[str, Any]]
) -> dict[int, dict[str, float]]:
    """Energies per bucket index, keyed like the store's stats: ``delta:energy_kwh``, ``sum:energy_interval_kwh``."""
    out: dict[int, dict[str, float]] = {}
    if ("energy_kwh", "delta") in query.agg:
        present = sorted(i for i, s in stats.items() if s["span:energy_kwh"][2])
        before = store.nearest(der_id, "energy_kwh", query.start, before=True)
        after = store.nearest(der_id, "energy_kwh", query.end, before=False)
        lows = [stats[i]["min:energy_kwh"] for i in present]
        highs = [stats[i]["max:energy_kwh"] for i in present]
        suspects = energy.falls(lows, highs, before and before[1], after and after[1])
        spans = []
        for position, index in enumerate(present):
            s = stats[index]
            first_at, last_at, count = s["span:energy_kwh"]
            if position in suspects or count != s["n"]:  # a fall, or readings without the register: read them
                values = store.series(der_id, laid[index].lo, laid[index].hi, ("energy_kwh",))
                spans.append(
                    energy.RegisterSpan(
                        index,
                        values[0][0],
                        values[0][1],
                        values[-1][0],
                        values[-1][1],
                        energy.rise_with_resets([v for _, v in values]),
                    )
                )
            else:  # a rising register: its first value is the lowest, its last the highest
                low, high = s["min:energy_kwh"], s["max:energy_kwh"]
                spans.append(energy.RegisterSpan(index, first_at, low, last_at, high, high - low))
        for index, value in energy.deltas(laid, spans, before, after).items():
            out.setdefault(index, {})["delta:energy_kwh"] = value
    if ("energy_interval_kwh", "sum") in query.agg:
        longest = 86_400_000  # an interval reading up to a day after the range may still reach into it
        rows = store.series(der_id, query.start, query.end + longest, ("energy_interval_kwh", "interval_s"))
        for index, value in energy.split_intervals(laid, [(t, e, s) for t, e, s in rows]).items():
            out.setdefault(index, {})["sum:energy_interval_kwh"] = value
    return out


def _bucket_row(
    query: Query, der_id: str, label: str, bucket: Bucket, stats: dict[str, Any], energies: dict[str, float]
) -> dict[str, Any]:
    row: dict[str, Any] = {"der_id": der_id, "bucket_start": label}
    if query.interval == "30m":
        row["slot"] = bucket.slot
    for field, how, name in query.columns:
        key = f"{how}:{field}"
        if key in energies:
            value: Any = energies[key]
        elif how in ("first", "last"):
            value = (stats.get(key) or (None, None))[1]
        else:
            value = stats.get(key)
        if value is not None:
            row[name] = value
    row["n"] = stats["n"]
    if stats.get("flagged"):
        row["clock_flagged"] = stats["flagged"]
    if "share" in energies:
        row["clock_flagged_share"] = energies["share"]
    return row


def _flagged_shares(
    query: Query,
    store: ReadingQuery,
    der_id: str,
    laid: list[Bucket],
    stats: dict[int, dict[str, Any]],
    energies: dict[int, dict[str, float]],
) -> None:
    """The share of each bucket's energy that flagged readings measured (as ``share``), for a DER with flagged
    readings in the range; a DER without pays nothing for it.

    The energy between two register readings is what the later one measured, spread over the time between
    them as ``delta`` spreads it; an interval reading's energy is its own, split as ``sum`` splits it.
    """
    if not any(bucket.get("flagged") for bucket in stats.values()):
        return
    flagged: dict[int, float] = {}
    total: dict[int, float] = {}

    def add(parts: dict[int, float], is_flagged: bool) -> None:
        for index, value in parts.items():
            total[index] = total.get(index, 0.0) + value
            if is_flagged:
                flagged[index] = flagged.get(index, 0.0) + value

    if ("energy_kwh", "delta") in query.agg:
        before = store.nearest(der_id, "energy_kwh", query.start, before=True)
        after = store.nearest(der_id, "energy_kwh", query.end, before=False)
        lo, hi = before[0] if before else query.start, after[0] + 1 if after else query.end
        series = store.flagged_series(der_id, lo, hi, ("energy_kwh",))
        for (t0, v0, _), (t1, v1, is_flagged) in pairwise(series):
            rise = v1 - v0 if v1 >= v0 else v1  # a fall: a reset to zero
            add(energy.split_intervals(laid, [(t1, rise, (t1 - t0) / 1000)]), bool(is_flagged))
    if ("energy_interval_kwh", "sum") in query.agg:
        longest = 86_400_000  # as in _energy
        fields = ("energy_interval_kwh", "interval_s")
        for t, value, interval_s, is_flagged in store.flagged_series(der_id, query.start, query.end + longest, fields):
            add(energy.split_intervals(laid, [(t, value, interval_s)]), bool(is_flagged))
    for index, energy_in in total.items():
        if energy_in > 0 and (flagged.get(index) or stats.get(index, _EMPTY).get("flagged")) and index in energies:
            energies[index]["share"] = round(flagged.get(index, 0.0) / energy_in, 4)
