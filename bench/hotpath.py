"""bench/hotpath: the event loop's CPU per data message, from the driver's hand-over to the answer's publish.

bench/ingest measures the whole chain (Mosquitto, the MQTT clients, the hub's two processes) on two shared
cores, where a change of 10 % in the hub drowns in the machine's noise. This runs a real hub in this process
(its own Mosquitto, its store process, DERs registered over MQTT) and hands it messages the way its MQTT
driver does, ``--per-turn`` of them per event-loop turn, timing this process's CPU until every message is
answered: the event loop's own cost per message, without the broker, the clients or the driver's receive
path (``bench/mqtt_driver.py`` has that). The store process's CPU is printed apart.

    .venv/bin/python bench/hotpath.py                      # 30,000 one-reading messages, 3 rounds
    .venv/bin/python bench/hotpath.py --readings 100 --messages 3000
    .venv/bin/python bench/hotpath.py --profile 25         # cProfile's top 25 functions (by own time)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import os
import pstats
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import INITIAL_PASSWORD, child_pids, cpu_seconds, hubd_cli, register_all, write_allowlist, write_lines

from hubd.app import Hub
from hubd.auth.credentials import hash_password
from hubd.broker import EmbeddedBroker, free_port
from hubd.config import load_config


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="hubd-hotpath-") as tmp:
        work = Path(tmp)
        broker = EmbeddedBroker(work / "broker", port=free_port())
        await broker.start()
        hub: Hub | None = None
        running: asyncio.Task[None] | None = None
        try:
            config = {
                "data_dir": str(work / "hub"),
                "broker": {"url": broker.url, "client_id": "hotpath"},
                "auth": {"initial_password_hash": hash_password(INITIAL_PASSWORD, 4), "bcrypt_rounds": 4},
                "log": {"level": "WARNING"},
                "http": {"bind": "127.0.0.1:0"},  # the operator's listener on a free port
            }
            (work / "hubd.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
            der_ids = [f"PV-{n:05d}" for n in range(args.ders)]
            write_allowlist(work / "allow.csv", der_ids)
            hubd_cli(work / "hubd.yaml", "der", "import", str(work / "allow.csv"), timeout=60)
            hub = Hub(load_config(work / "hubd.yaml"))
            running = asyncio.create_task(hub.run())
            await asyncio.wait_for(hub.ready.wait(), 30)
            passwords = await register_all(broker.url, der_ids, 16, 30)
            lines = work / "lines.jsonl"
            for round_no in range(args.rounds):
                # Written by a fresh interpreter, so that under callgrind this process counts the hub's work only.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as writer:
                    start_ms = 1_767_225_600_000 + round_no * 10**9
                    writer.submit(write_lines, lines, args.messages, args.readings, passwords, start_ms).result()
                payloads = lines.read_bytes().splitlines()
                await _timed(hub, payloads, args, round_no)
        finally:
            if hub is not None and running is not None:
                hub.stop()
                await running
            await broker.stop()


async def _timed(hub: Hub, payloads: list[bytes], args: argparse.Namespace, round_no: int) -> None:
    answered = 0
    failed = 0
    finished = asyncio.get_running_loop().create_future()

    def done(handled: bool) -> None:
        nonlocal answered, failed
        answered += 1
        failed += not handled
        if answered == len(payloads) and not finished.done():
            finished.set_result(None)

    store_pid = child_pids(os.getpid())
    store_before = sum(sum(cpu_seconds(pid)) for pid in store_pid)
    profiler = cProfile.Profile() if args.profile else None
    began_cpu, began = time.process_time(), time.monotonic()
    if profiler:
        profiler.enable()
    topic = hub.mqtt.data_topic
    for start in range(0, len(payloads), args.per_turn):
        for payload in payloads[start : start + args.per_turn]:
            hub.mqtt.on_message(topic, payload, {}, done)
        await asyncio.sleep(0)
    await asyncio.wait_for(finished, 300)
    if profiler:
        profiler.disable()
    cpu, wall = time.process_time() - began_cpu, time.monotonic() - began
    store = sum(sum(cpu_seconds(pid)) for pid in store_pid) - store_before
    readings = len(payloads) * args.readings
    print(
        f"round {round_no + 1}: {len(payloads):,} messages × {args.readings} readings in {wall:.2f} s; "
        f"event loop {cpu / len(payloads) * 1e6:.1f} µs/message ({cpu / readings * 1e6:.2f} µs/reading), "
        f"store process {store / readings * 1e6:.2f} µs/reading; {failed} not acknowledged",
        flush=True,
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ders", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--readings", type=int, default=1, help="readings per message")
    parser.add_argument("--per-turn", type=int, default=60, help="messages handed over per loop turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions")
    asyncio.run(main(parser.parse_args()))
