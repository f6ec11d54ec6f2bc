"""bench/influx: the InfluxDB backend's figures, each beside its raw limit measured in the same run.

1. Ingest end to end: a real InfluxDB (Debian's ``influxd``, free loopback ports, temp dirs), Mosquitto and the
   hub as a process with ``store.backend: influxdb``; case B of bench/ingest (``--messages`` messages of
   ``--per-message`` readings, published with ``mosquitto_pub -q 1``, timed to the last answer, every answer
   and the stored count checked). Then InfluxDB's raw line-protocol write rate for the same points (the same
   lines the hub writes, in ``store.influxdb.batch_size`` requests, one at a time and two in flight as the
   hub's writer sends them), each pass into a fresh database, twice each way; the fastest pass is the raw rate.
2. The 30-minute settlement query (one day, ``energy_kwh`` delta and ``power_kw`` mean, every DER, every page)
   over ``--settle-ders`` x 1,440 one-minute readings, on SQLite and on InfluxDB holding the same readings;
   then the same slots with plain statistics and no ``delta``; each three times in turn, the fastest counts.

Everything runs on 127.0.0.1 and every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test suite's influxd

import ingest
from influx_server import InfluxServer

from hubd.auth.registry import Registry
from hubd.broker import EmbeddedBroker, free_port
from hubd.config import Config, QueryConfig, load_config, parse_config
from hubd.model import FIELDS
from hubd.query.conditions import parse_query
from hubd.query.execute import run
from hubd.store import CLOCK_COLUMNS, ReadingQuery, Rows
from hubd.store.factory import open_query, open_sink
from hubd.store.influx.client import AsyncInflux
from hubd.store.influx.lines import line, point


def influx_config(data_dir: Path, url: str, database: str) -> Config:
    influx = {"url": url, "database": database}
    return parse_config({"data_dir": str(data_dir), "store": {"backend": "influxdb", "influxdb": influx}})


# -- 1. ingest end to end, and the raw write rate of the same points ------------------------------------------


def ingest_case(work: Path, influxd: InfluxServer, args: argparse.Namespace) -> tuple[float, int, list[str]]:
    """Readings/s of the hub into InfluxDB (case B), and the lines of the points it stored."""
    processes = ingest.Processes()
    broker = EmbeddedBroker(work / "broker", port=free_port(), bind="127.0.0.1")
    hub: ingest.HubProcess | None = None
    try:
        broker.start_sync()
        influxd.query('CREATE DATABASE "hub"')
        config = work / "hubd.yaml"
        sets = ["store.backend=influxdb", f"store.influxdb.url={influxd.url}", "store.influxdb.database=hub", *args.set]
        ingest.write_config(config, work / "data", broker.url, "hubd-bench", args.bcrypt_rounds, sets)
        der_ids = [f"BENCH-{i:05d}" for i in range(args.ders)]
        ingest.write_allowlist(work / "allowlist.csv", der_ids)
        ingest.hubd_cli(config, "der", "import", str(work / "allowlist.csv"), timeout=args.timeout)
        hub = ingest.HubProcess(processes, config, work / "hubd.log")
        hub.start(args.timeout)
        passwords = asyncio.run(ingest.register_all(broker.url, der_ids, 16, args.timeout))
        base_ms = (int(time.time()) - 86400) * 1000
        case = ingest.run_case(
            processes,
            broker.port,
            work,
            "B",
            args.messages,
            args.per_message,
            passwords,
            base_ms,
            {"hub": hub.pid, "mosquitto": broker.pid or 0, "influxd": influxd.pid},
            args,
        )
        stored = ingest.stored_rows(load_config(config))
        if stored != case.readings:
            raise RuntimeError(f"InfluxDB holds {stored} readings, expected {case.readings}")
        print(f"  checked: every answer ok; InfluxDB holds {stored} readings")
        rate = case.readings / case.hub.seconds
    finally:
        if hub is not None:
            hub.stop()
        processes.stop_all()
        broker.stop_sync()
    lines = stored_lines(load_config(config))
    return rate, case.readings, lines


def stored_lines(config: Config) -> list[str]:
    """The stored points as the line protocol the hub wrote them in."""
    query = open_query(config)
    names = (*FIELDS, *CLOCK_COLUMNS)
    out: list[str] = []
    try:
        for p in query.scan(0, 2**42, [], (*FIELDS, *CLOCK_COLUMNS, "source", "format", "sent_at")):  # type: ignore[attr-defined]
            row = (
                p["der_id"],
                p["time"],
                *(p.get(n) for n in names),
                p["received_at"],
                p["source"],
                p["format"],
                p.get("sent_at"),
            )
            out.append(line("readings", point(names, row)))
    finally:
        query.close()
    return out


async def raw_rate(influxd: InfluxServer, lines: list[str], batch: int, database: str, in_flight: int = 1) -> float:
    """Readings/s of writing ``lines``, ``batch`` a request, ``in_flight`` requests at a time."""
    influxd.query(f'CREATE DATABASE "{database}"')
    client = AsyncInflux(influx_config(Path("."), influxd.url, database).store.influxdb)
    bodies = ["\n".join(lines[at : at + batch]) for at in range(0, len(lines), batch)]
    cpu = sum(ingest.cpu_seconds(influxd.pid))
    began = time.perf_counter()
    try:
        for at in range(0, len(bodies), in_flight):
            await asyncio.gather(*(client.write(body) for body in bodies[at : at + in_flight]))
    finally:
        await client.close()
    seconds = time.perf_counter() - began
    cpu = sum(ingest.cpu_seconds(influxd.pid)) - cpu
    print(f"  raw pass, {in_flight} in flight: {seconds:.2f} s, CPU influxd {cpu:.1f} s", flush=True)
    return len(lines) / seconds


# -- 2. the settlement query -----------------------------------------------------------------------------------


def settle_rows(ders: int, day_ms: int) -> list[Rows]:
    """One day of one-minute readings per DER, in batches of a DER each."""
    out: list[Rows] = []
    for d in range(ders):
        run = [
            (
                f"DER-{d:05d}",
                day_ms + m * 60_000,
                2.0 + (m % 30) / 10,
                1000.0 + m * 0.05,
                day_ms + m * 60_000 + 500,
                "bench",
                "hub.v1",
                day_ms + m * 60_000 + 100,
            )
            for m in range(1440)
        ]
        out.append([(("power_kw", "energy_kwh"), run)])
    return out


async def fill(config: Config, batches: list[Rows]) -> float:
    sink = open_sink(config)
    await sink.start()
    began = time.perf_counter()
    try:
        for rows in batches:
            await sink.write_rows(rows, 0)
    finally:
        await sink.close()
    return time.perf_counter() - began


SETTLEMENT = {"energy_kwh": "delta", "power_kw": "mean"}
STATISTICS = {"power_kw": ["mean", "max"], "energy_kwh": ["min", "max"]}  # no delta: one statement a group


def settlement(store: ReadingQuery, ders: Any, agg: dict[str, Any] = SETTLEMENT) -> tuple[float, int]:
    request: dict[str, Any] = {
        "start": "2025-06-01T00:00:00Z",
        "end": "2025-06-02T00:00:00Z",
        "interval": "30m",
        "tz": "UTC",
        "agg": agg,
        "limit": 10000,
    }
    config = QueryConfig(max_limit=10000, default_limit=10000)
    began = time.perf_counter()
    rows, cursor = 0, None
    while True:
        answer = run(parse_query({**request, **({"cursor": cursor} if cursor else {})}, config, ders), store)
        rows += answer["count"]
        cursor = answer["next_cursor"]
        if cursor is None:
            return time.perf_counter() - began, rows


def settlement_case(work: Path, influxd: InfluxServer, ders_count: int) -> dict[str, float]:
    day_ms = 1748736000000  # 2025-06-01
    registry = Registry(work / "settle-registry.sqlite3")
    for d in range(ders_count):
        registry.add_der(f"DER-{d:05d}", 0, {"type": "pv"})
    ders = registry.ders()
    registry.close()
    influxd.query('CREATE DATABASE "settle"')
    configs = {
        "sqlite": parse_config({"data_dir": str(work / "settle-sqlite")}),
        "influxdb": influx_config(work / "settle-influx", influxd.url, "settle"),
    }
    out: dict[str, float] = {}
    for name, config in configs.items():
        seconds = asyncio.run(fill(config, settle_rows(ders_count, day_ms)))
        print(f"  {name}: stored {ders_count * 1440:,} readings in {seconds:.1f} s", flush=True)
        store = open_query(config)
        try:  # in turn, three times: the fastest counts (InfluxDB compacts what was just written meanwhile)
            runs = [(settlement(store, ders), settlement(store, ders, STATISTICS)[0]) for _ in range(3)]
        finally:
            store.close()
        took, rows = min(r[0][0] for r in runs), runs[0][0][1]
        plain = min(r[1] for r in runs)
        listed = ", ".join(f"{r[0][0]:.2f}" for r in runs)
        print(f"  {name}: settlement query {took:.2f} s ({rows:,} rows; runs {listed})", flush=True)
        listed = ", ".join(f"{r[1]:.2f}" for r in runs)
        print(f"  {name}: the same slots with {STATISTICS} instead: {plain:.2f} s (runs {listed})", flush=True)
        out[name], out[f"{name}-plain"] = took, plain
    return out


def main(argv: list[str] | None = None) -> int:
    """Also ``bench/ingest.py --store influxdb`` (``argv``: the options after that)."""
    parser = argparse.ArgumentParser(
        prog="bench/ingest.py --store influxdb", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--ders", type=int, default=1000, help="DERs registered for the ingest case (default 1000)")
    parser.add_argument("--messages", type=int, default=2000, help="messages in the ingest case (default 2000)")
    parser.add_argument("--per-message", type=int, default=100, help="readings per message (default 100)")
    parser.add_argument("--settle-ders", type=int, default=1000, help="DERs × 1440 readings to settle (default 1000)")
    parser.add_argument("--bcrypt-rounds", type=int, default=4, help="bcrypt cost of the hub (default 4)")
    parser.add_argument("--inflight", type=int, default=100, help="mosquitto_pub -M: QoS 1 messages in flight")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit for each wait, in seconds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hubd.yaml override")
    parser.add_argument("--hubd", metavar="CMD", help="the command that runs hubd (as in bench/ingest.py)")
    parser.add_argument("--skip-settle", action="store_true", help="only the ingest figure")
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy record the hub's ingest run into DIR (as bench/ingest)"
    )
    parser.add_argument("--profile-format", choices=("raw", "flamegraph", "speedscope"), default="raw")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="InfluxDB on the last CPU alone, everything else (hub, Mosquitto, publisher) on the others, as "
        "when InfluxDB has a machine of its own; the raw rate is then InfluxDB's on its CPU",
    )
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    influx_cpus = {cpus[-1]} if args.pin and len(cpus) > 1 else None
    if influx_cpus is not None:
        os.sched_setaffinity(0, set(cpus[:-1]))  # inherited by every process started from here on
        print(f"pinned: InfluxDB on CPU {cpus[-1]}, the rest on {cpus[:-1]}", flush=True)
    if args.hubd:
        ingest.HUBD_COMMAND.extend(shlex.split(args.hubd))
    args.keep = False  # what bench/ingest's run_case reads
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="hubd-bench-influx-"))
    influxd = InfluxServer(work / "influxd", cpus=influx_cpus)
    try:
        influxd.start()
        print(f"machine: {ingest.machine()}", flush=True)
        print("1. ingest end to end into InfluxDB", flush=True)
        hub_rate, readings, lines = ingest_case(work, influxd, args)
        batch = load_config(work / "hubd.yaml").store.influxdb.batch_size
        # Each way twice, each pass into a fresh database, and the fastest pass counts (one pass can meet a
        # compaction of the hub's data): one request at a time, and two in flight as the hub's writer sends them.
        passes = [(n, asyncio.run(raw_rate(influxd, lines, batch, f"raw{k}", n))) for k, n in enumerate((1, 2, 1, 2))]
        raw = max(rate for _, rate in passes)
        print(f"  hub end to end: {hub_rate:,.0f} readings/s ({readings:,} readings, {args.per_message} per message)")
        ways = "; ".join(f"{n} in flight: " + ", ".join(f"{rate:,.0f}" for m, rate in passes if m == n) for n in (1, 2))
        print(f"  InfluxDB raw line protocol, same points: {raw:,.0f} readings/s (passes, {ways})")
        single = max(rate for n, rate in passes if n == 1)
        print(f"  ratio hub / raw: {hub_rate / raw:.2f} (against one request at a time only: {hub_rate / single:.2f})")
        if args.skip_settle:
            return 0
        print(f"2. settlement query, one day of 30-minute slots over {args.settle_ders * 1440:,} readings", flush=True)
        times = settlement_case(work, influxd, args.settle_ders)
        print(f"  InfluxDB / SQLite: {times['influxdb'] / times['sqlite']:.2f}×")
        print(f"  without delta, InfluxDB / SQLite: {times['influxdb-plain'] / times['sqlite-plain']:.2f}×")
        return 0
    finally:
        influxd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
