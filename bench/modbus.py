"""bench/modbus: one hub polling many simulated Modbus devices, beside the raw pymodbus client against them.

What one run does, all on 127.0.0.1:

1. Starts ``--devices`` simulated SunSpec inverters (models 1 and 103; pymodbus TCP servers, one port each)
   in a process of their own (this script with ``--serve``), so their CPU is not the hub's.
2. **raw**: for ``--raw-seconds``, one pymodbus client per device reads, back to back, the registers a poll
   of the hub reads (model 103: one request of 52 registers): reads/s across all devices, and p50/p99 read
   latency. This is the most the simulated devices and the client library give on this machine.
3. **hub**: a hub (embedded Mosquitto, SQLite store) in this process with one Modbus source per device,
   ``poll_s`` = ``--poll-s``, each inverter's DER added; after ``--warm-up`` seconds, for ``--seconds``:
   polls/s achieved (target: devices ÷ poll_s), p50/p99 poll latency (connect-free polls: request to
   decoded readings), and the hub's CPU per poll (this process, which runs the hub, plus its store process).
   Then checks that the store holds a reading per poll of the window, within one poll per device.

    ./dev bench modbus                           # 200 devices every second (about 40 s)
    .venv/bin/python bench/modbus.py --devices 50 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hubd.app import Hub
from hubd.auth.registry import Registry
from hubd.broker import free_port
from hubd.cli import setup_logging
from hubd.config import parse_config
from hubd.model import now_ms
from hubd.sources.modbus import ModbusSource
from hubd.sources.modbus.client import Link
from hubd.sources.modbus.simulate import COMMON_DEMO, INVERTER_103, Device, sunspec_image

IMAGE = sunspec_image([(1, COMMON_DEMO), (103, INVERTER_103)])
POLL_READ = (40070, 52)  # model 103's ID register on, as the hub's poll reads it


async def serve(count: int) -> None:
    """The devices, on free ports; their ports on one line of stdout, then serve until stdin closes."""
    devices: list[Device] = []
    while len(devices) < count:
        device = Device({1: (IMAGE, {})}, free_port())
        try:
            await device.start()
        except OSError:  # the free port was taken meanwhile (by the last device, say): another
            continue
        devices.append(device)
    print(json.dumps([device.port for device in devices]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for device in devices:
        await device.stop()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


async def raw(ports: list[int], seconds: float) -> tuple[float, list[float], float]:
    """Back-to-back reads, one client per device: reads/s, each read's latency in ms, CPU s per read."""
    latencies: list[float] = []
    links = [Link("127.0.0.1", port, 1, 2.0) for port in ports]
    await asyncio.gather(*(link.connect() for link in links))
    end = time.perf_counter() + seconds

    async def loop(link: Link) -> int:
        count = 0
        while time.perf_counter() < end:
            started = time.perf_counter()
            await link.read("holding", *POLL_READ)
            latencies.append((time.perf_counter() - started) * 1000)
            count += 1
        return count

    started, cpu = time.perf_counter(), own_cpu()
    counts = await asyncio.gather(*(loop(link) for link in links))
    elapsed, cpu = time.perf_counter() - started, own_cpu() - cpu
    for link in links:
        link.close()
    return sum(counts) / elapsed, latencies, cpu / max(sum(counts), 1)


def children_cpu() -> float:
    """CPU seconds of this process's live children but Mosquitto (the hub's store process)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip() == "mosquitto":
                continue
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def hub_run(ports: list[int], args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    ders = [f"INV-{i:04d}" for i in range(len(ports))]
    sources = [
        {"kind": "modbus", "name": f"inv-{i:04d}", "host": "127.0.0.1", "port": port}
        | {"profile": "sunspec", "der": der, "poll_s": args.poll_s, "timeout_s": 2.0}
        for i, (port, der) in enumerate(zip(ports, ders, strict=True))
    ]
    config = parse_config(
        {
            "data_dir": str(data_dir),
            "broker": {"embedded_port": free_port()},
            "http": {"bind": "127.0.0.1:0"},  # the operator's listener on a free port
            "log": {"level": "WARNING"},
            "sources": sources,
        },
        "bench",
    )
    registry = Registry(config.registry_path)
    for der in ders:
        registry.add_der(der, now_ms(), {"type": "pv"})
    registry.close()
    hub = Hub(config)
    task = asyncio.create_task(hub.run())
    await asyncio.wait_for(hub.ready.wait(), 30)
    await asyncio.sleep(args.warm_up)
    polled = [s for s in hub.sources.sources if isinstance(s, ModbusSource)]
    polls_before = sum(s.polls for s in polled)
    marks = [s.polls for s in polled]
    own_before, children_before = own_cpu(), children_cpu()
    started, since = time.perf_counter(), now_ms()
    await asyncio.sleep(args.seconds)
    elapsed = time.perf_counter() - started
    own, children = own_cpu() - own_before, children_cpu() - children_before
    until = now_ms()
    polls = sum(s.polls for s in polled) - polls_before
    latencies = [  # each source's polls of the window: the last ones it kept
        ms
        for s, mark in zip(polled, marks, strict=True)
        for ms in list(s.latencies_ms)[max(0, len(s.latencies_ms) - (s.polls - mark)) :]
    ]
    hub.stop()
    await task
    with sqlite3.connect(config.readings_path) as db:
        (stored,) = db.execute(
            "SELECT count(*) FROM readings WHERE measured_at >= ? AND measured_at < ?", (since, until)
        ).fetchone()
    return {
        "polls": polls,
        "seconds": elapsed,
        "cpu": own + children,
        "own": own,
        "store": children,
        "latencies": latencies,
        "stored": stored,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0, help="the hub's measured window")
    parser.add_argument("--warm-up", type=float, default=5.0)
    parser.add_argument("--raw-seconds", type=float, default=5.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    setup_logging("WARNING")
    devices = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(args.devices)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert devices.stdout is not None and devices.stdin is not None
        ports: list[int] = json.loads(devices.stdout.readline())
        rate, raw_latencies, raw_cpu = asyncio.run(raw(ports, args.raw_seconds))
        with tempfile.TemporaryDirectory(prefix="hubd-bench-modbus-") as data_dir:
            run = asyncio.run(hub_run(ports, args, Path(data_dir)))
    finally:
        if devices.stdin is not None:
            devices.stdin.close()
        devices.wait(30)
    target = args.devices / args.poll_s
    achieved = run["polls"] / run["seconds"]
    latencies = run["latencies"]
    print(f"{args.devices} simulated SunSpec inverters (pymodbus servers in one process), poll every {args.poll_s} s")
    print("| path | reads or polls/s | p50 ms | p99 ms | CPU per read or poll |")
    print("|---|---:|---:|---:|---:|")
    p50, p99 = percentile(raw_latencies, 0.5), percentile(raw_latencies, 0.99)
    print(f"| raw pymodbus client, back to back | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {raw_cpu * 1000:.2f} ms |")
    cpu_ms = run["cpu"] / max(run["polls"], 1) * 1000
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    print(f"| hub, one source per device | {achieved:,.1f} (target {target:,.0f}) | {p50:.2f} | {p99:.2f} "
          f"| {cpu_ms:.2f} ms |")  # fmt: skip
    share = achieved / rate if rate else float("nan")
    print(f"hub polls/s ÷ raw reads/s: {share:.3f}; hub CPU {run['cpu']:.1f} s in {run['seconds']:.1f} s "
          f"({run['cpu'] / run['seconds'] * 100:.0f} % of one core): event loop "
          f"{run['own'] / max(run['polls'], 1) * 1000:.2f} ms, store process "
          f"{run['store'] / max(run['polls'], 1) * 1000:.2f} ms per poll")  # fmt: skip
    print(f"readings stored in the window: {run['stored']:,} for {run['polls']:,} polls")
    print(f"poll latency mean {statistics.fmean(latencies):.2f} ms" if latencies else "no polls")
    ok = achieved >= 0.95 * target and abs(run["stored"] - run["polls"]) <= args.devices
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
