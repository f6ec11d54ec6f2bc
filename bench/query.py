"""bench/query: extraction speed on a synthetic fleet, beside SQLite's own floor for the same work.

Builds (once, cached under bench/out/) a store of DERS x one day of 1-minute readings (power and a cumulative
register), then times what the market system asks for most, each beside the bare SQLite statement that
touches the same rows (the floor on this machine, in this run):

- the 30-minute settlement table for all DERs (energy_kwh=delta, power_kw=mean, Asia/Tokyo), one page
  and in pages of 10,000 rows;
- a raw page of 10,000 rows (the first, and one deep in the day);
- ``at`` one instant across all DERs;
- paging through the whole day raw, sampling resident memory each page (it must stay flat).

Run: ``.venv/bin/python bench/query.py [--ders 1000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hubd.config import QueryConfig
from hubd.model import parse_time
from hubd.query.conditions import decode_cursor, parse_query
from hubd.query.execute import run
from hubd.store.sqlite import SqliteStore

DAY = "2026-11-27T00:00:00+09:00"
NEXT_DAY = "2026-11-28T00:00:00+09:00"
CONFIG = QueryConfig(max_limit=50_000, default_limit=10_000, max_der_ids=1000)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(path: Path, ders: int) -> None:
    """DERS x 1440 readings, generated inside SQLite (seconds, not minutes); one register reset per 100 DERs."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    SqliteStore(path, "normal").close()
    start = parse_time(DAY)
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    print(f"building {path} ({ders} DERs x 1440 readings)...", flush=True)
    db.execute(
        f"""
        WITH RECURSIVE d(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM d WHERE i < {ders - 1}),
                       m(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM m WHERE j < 1439)
        INSERT INTO readings (der_id, measured_at, power_kw, energy_kwh, received_at, stored_at, source_id,
                              format_code)
        SELECT printf('PV-%04d', i), {start} + j * 60000, 2.0 + (abs(random()) % 1000) / 1000.0,
               CASE WHEN i % 100 = 7 AND j >= 720 THEN (j - 720) / 30.0 ELSE 1000.0 + i + j / 30.0 END,
               0, 0, 'bench', 'hub.v1'
        FROM d, m ORDER BY 1, 2
        """
    )
    db.commit()
    db.close()


def timed(func: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds over ``repeat`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        began = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def all_pages(request: dict[str, Any], store: SqliteStore, sample: list[float] | None = None) -> int:
    query = parse_query(request, CONFIG, {})
    total = 0
    while True:
        answer = run(query, store)
        total += answer["count"]
        if sample is not None:
            sample.append(rss_mb())
        if answer["next_cursor"] is None:
            return total
        query = replace(query, cursor=decode_cursor(answer["next_cursor"], query.mode))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ders", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = Path(__file__).resolve().parent / "out" / f"query-{args.ders}.sqlite3"
    build(path, args.ders)
    store = SqliteStore(path, "normal")
    db = sqlite3.connect(path)
    start, end = parse_time(DAY), parse_time(NEXT_DAY)
    ders = [r[0] for r in db.execute("SELECT DISTINCT der_id FROM readings")]
    settlement = {
        "start": DAY,
        "end": NEXT_DAY,
        "interval": "30m",
        "tz": "Asia/Tokyo",
        "agg": {"energy_kwh": "delta", "power_kw": "mean"},
    }

    def floor_scan() -> int:  # every reading touched once, grouped per DER: SQLite's own cost
        n = 0
        for der in ders:
            n += db.execute(
                "SELECT count(*), avg(power_kw), max(energy_kwh) FROM readings WHERE der_id = ? "
                "AND measured_at >= ? AND measured_at < ?",
                (der, start, end),
            ).fetchone()[0]
        return n

    middle = parse_query({"start": DAY, "end": NEXT_DAY, "limit": 10_000}, CONFIG, {})
    deep = replace(middle, cursor=(start + 12 * 3_600_000, "PV-0000"))
    at_ms = start + 10 * 3_600_000
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], float]] = [
        (
            "settlement table, one page",
            lambda: run(parse_query({**settlement, "limit": 50_000}, CONFIG, {}), store),
            floor_scan,
            2.0,
        ),
        ("settlement table, 10k-row pages", lambda: all_pages({**settlement, "limit": 10_000}, store), floor_scan, 2.0),
        (
            "raw page 10k rows (first)",
            lambda: run(middle, store),
            lambda: db.execute(
                "SELECT * FROM readings WHERE measured_at >= ? AND measured_at < ? "
                "ORDER BY measured_at, der_id LIMIT 10001",
                (start, end),
            ).fetchall(),
            0.2,
        ),
        (
            "raw page 10k rows (midday)",
            lambda: run(deep, store),
            lambda: db.execute(
                "SELECT * FROM readings WHERE (measured_at, der_id) > (?, 'PV-0000') AND "
                "measured_at < ? ORDER BY measured_at, der_id LIMIT 10001",
                (start + 12 * 3_600_000, end),
            ).fetchall(),
            0.2,
        ),
        (
            f"at one instant, {len(ders)} DERs",
            lambda: run(parse_query({"at": at_ms}, CONFIG, {}), store),
            lambda: db.execute("SELECT * FROM readings WHERE measured_at = ?", (at_ms,)).fetchall(),
            0.1,
        ),
    ]
    rows = db.execute("SELECT count(*) FROM readings").fetchone()[0]
    print(f"\nstore: {rows:,} readings, {len(ders)} DERs, one day; median of {args.repeat} runs\n")
    print(f"{'case':34} {'hubd s':>8} {'floor s':>8} {'ratio':>6} {'target':>8}  result")
    for name, hub_case, floor_case, target in cases:
        hub_s, answer = timed(hub_case, args.repeat)
        floor_s, _ = timed(floor_case, args.repeat)
        count = answer["count"] if isinstance(answer, dict) else answer
        verdict = "ok" if hub_s <= target else "MISSED"
        print(f"{name:34} {hub_s:8.3f} {floor_s:8.3f} {hub_s / floor_s:6.1f} {target:7.2f}s  {verdict} ({count} rows)")
    samples: list[float] = []
    began = time.perf_counter()
    total = all_pages({"start": DAY, "end": NEXT_DAY, "limit": 10_000}, store, samples)
    took = time.perf_counter() - began
    print(
        f"\nwhole day raw in 10k-row pages: {total:,} rows, {len(samples)} pages in {took:.1f} s; resident memory "
        f"{min(samples):.0f} → {max(samples):.0f} MB (first page {samples[0]:.0f} MB, last {samples[-1]:.0f} MB)"
    )
    store.close()
    db.close()


if __name__ == "__main__":
    main()
