"""bench/status_page: the status page's SQL on a fleet of 100,000 DERs, beside SQLite's floor for the same rows.

Builds (once, cached under bench/out/) a state file of DERS DERs (pv / ess / meter in 20 areas; 1 % revoked)
and a store with a reading every 30 minutes for the last HOURS hours from 90 % of them (a cumulative register
and an interval energy), generated inside SQLite. Then times, as the page's thread runs them (``Fleet``):

- the fleet's states by type and area (every DER's last reading: one primary-key probe each);
- one page of 50 DERs (the first, and one deep in the ids);
- the energy per 30-minute slot by DER type over the HOURS hours: every slot read; a first page view (slots
  read newest first for one second, the rest left to the page's thread); a view a minute later (only the slots
  of the last hour read again);

beside the floor: a bare ``sum`` over the readings in the same hours (the rows any per-slot sum must read), and
a ``count(*)`` of all readings (what a plain ``GROUP BY der_id`` would read, at the least).

Run: ``.venv/bin/python bench/status_page.py [--ders 100000] [--hours 6] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hubd.auth.registry import Registry
from hubd.config import parse_config
from hubd.model import now_ms
from hubd.ops.fleet import SLOT_MS, Fleet
from hubd.store.sqlite import SqliteStore


def build(folder: Path, ders: int, hours: int, end: int) -> None:
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    Registry(folder / "hub.sqlite3").close()  # the schema
    SqliteStore(folder / "readings.sqlite3", "normal").close()
    state = sqlite3.connect(folder / "hub.sqlite3")
    state.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "INSERT INTO ders (der_id, type, area, status, added_at) SELECT printf('DER-%06d', i), "
        "CASE i % 3 WHEN 0 THEN 'pv' WHEN 1 THEN 'ess' ELSE 'meter' END, printf('area-%02d', i % 20), "
        "CASE WHEN i % 100 = 0 THEN 'revoked' ELSE 'registered' END, 0 FROM n",
        (ders,),
    )
    state.commit()
    state.close()
    db = sqlite3.connect(folder / "readings.sqlite3")
    db.execute("PRAGMA synchronous=OFF")
    slots = hours * 2
    start = end - slots * SLOT_MS
    db.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?), "
        "s(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM s WHERE k < ? - 1) "
        "INSERT INTO readings (der_id, measured_at, energy_kwh, energy_interval_kwh, interval_s, received_at, "
        "stored_at, source_id, format_code) SELECT printf('DER-%06d', i), ? + k * ? + (i % 1000) * 1000, "
        "100.0 + k * 0.5, 0.5, 1800, 0, 0, 'bench', 'hub.v1' FROM n, s WHERE i % 10 != 0",
        (ders, slots, start, SLOT_MS),
    )
    db.commit()
    db.close()
    (folder / "done").touch()


def timed(call: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        began = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ders", type=int, default=100_000)
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    end = now_ms() // SLOT_MS * SLOT_MS
    folder = Path(__file__).resolve().parent / "out" / f"status-{args.ders}-{args.hours}h-{end}"
    began = time.perf_counter()
    build(folder, args.ders, args.hours, end)
    print(
        f"fleet of {args.ders:,} DERs, {args.hours} h of 30-minute readings: "
        f"built in {time.perf_counter() - began:.1f} s"
    )
    config = parse_config({"data_dir": str(folder), "http": {"fresh_s": 1800, "silent_s": 7200}}, "bench")
    fleet = Fleet(config)
    start = end - args.hours * 3600_000
    floor = sqlite3.connect(folder / "readings.sqlite3")
    rows_in_range = (
        "SELECT sum(energy_kwh) FROM readings INDEXED BY readings_by_time WHERE measured_at >= ? AND measured_at < ?"
    )
    n_range = floor.execute(rows_in_range.replace("sum(energy_kwh)", "count(*)"), (start, end)).fetchone()[0]
    t_range, _ = timed(lambda: floor.execute(rows_in_range, (start, end)).fetchone(), args.repeat)
    t_all, (n_all,) = timed(lambda: floor.execute("SELECT count(*) FROM readings").fetchone(), args.repeat)
    t_states, states = timed(lambda: fleet.states(end), args.repeat)
    t_first, _ = timed(lambda: fleet.ders(end, "", 50), args.repeat)
    t_deep, _ = timed(lambda: fleet.ders(end, f"DER-{args.ders // 2:06d}", 50), args.repeat)
    t_energy, (energy, _) = timed(lambda: Fleet(config).energy(start, end, end), args.repeat)  # every slot
    t_budget, (_, pending) = timed(lambda: Fleet(config).energy(start, end, end, 1.0), args.repeat)  # a page's
    fleet.energy(start, end, end)
    later = iter(range(1, 1000))  # each later view a minute after the one before: the recent slots are read again
    t_again, _ = timed(lambda: fleet.energy(start, end, end + next(later) * 61_000), args.repeat)
    by_state: dict[str, int] = {}
    for _, _, state, count in states:
        by_state[state] = by_state.get(state, 0) + count
    print(
        f"floor: a sum over the {n_range:,} readings in range {t_range * 1000:.0f} ms; a count(*) "
        f"of all {n_all:,} readings {t_all * 1000:.0f} ms"
    )
    print(
        f"fleet states by type and area ({by_state}): {t_states * 1000:.0f} ms "
        f"({t_states / t_all:.2f} x the full count)"
    )
    print(f"a page of 50 DERs: first {t_first * 1000:.1f} ms, from the middle {t_deep * 1000:.1f} ms")
    total = sum(sum(v) for v in energy.values())
    print(
        f"energy per slot by type ({total:,.0f} kWh): every slot {t_energy * 1000:.0f} ms "
        f"({t_energy / t_range:.1f} x the floor); a first page view {t_budget * 1000:.0f} ms ({pending} slots "
        f"left to the thread); a view a minute later {t_again * 1000:.0f} ms"
    )
    fleet.close()


if __name__ == "__main__":
    main()
