"""bench/principals: how many principals one Mosquitto's dynamic-security plugin holds comfortably.

What one run does, all on 127.0.0.1:

1. starts its own Mosquitto (``hubd.broker.EmbeddedBroker`` with the plugin, a free port, data in a temp dir)
   from a plugin file holding only the admin;
2. creates N DER principals over ``$CONTROL/dynamic-security/v1`` as hubd does at registration (per DER: a
   role with its six ACLs and a client bound to its client id; ``hubd.auth.dynsec.create_commands``), in
   batches of ``--batch`` DERs per control message, and times each batch: the plugin rewrites its whole file
   on every control message, so a batch costs more as the file grows;
3. prints, at every tenth of N: principals so far, the last batch's time per DER, the file's size, and the
   time one new DER's connect takes (CONNACK, with its PBKDF2 check), and the broker's resident memory;
4. times one more registration's batch (one DER) against the N, and ``hubd broker sync`` against the running
   broker (``hubd.auth.broker_sync``): once with nothing to change, once with one client to enable;
5. then rebuilds the same N principals' file from scratch (as ``hubd broker sync`` does) and times a broker
   start with it.

    .venv/bin/python bench/principals.py [--ders 10000] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from hubd.auth import dynsec
from hubd.auth.broker_sync import reconcile
from hubd.broker import EmbeddedBroker, free_port
from hubd.mqtt.session import MqttError, MqttSession

ADMIN = dynsec.Account("admin", "bench-admin-password")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _connect_ms(port: int, der_id: str, password: str) -> float:
    session = MqttSession(
        der_id, on_publish=lambda first, body: None, clean_start=True, username=der_id, password=password
    )
    started = time.perf_counter()
    await session.connect("127.0.0.1", port)
    took = (time.perf_counter() - started) * 1000
    await session.disconnect()
    return took


async def _wrong_connects_per_s(port: int, username: str, seconds: float = 3.0, clients: int = 4) -> float:
    """How fast a guesser learns "wrong password" from the broker's CONNECT (nothing limits it there)."""
    done = 0
    until = time.perf_counter() + seconds

    async def guesser(n: int) -> None:
        nonlocal done
        while time.perf_counter() < until:
            session = MqttSession(
                username, on_publish=lambda first, body: None, clean_start=True, username=username, password=f"g{n}"
            )
            try:
                await session.connect("127.0.0.1", port)
            except MqttError:
                done += 1
            finally:
                await session.disconnect()

    await asyncio.gather(*(guesser(n) for n in range(clients)))
    return done / seconds


async def run(ders: int, batch: int, folder: Path) -> None:
    plugin_file = folder / "dynamic-security.json"
    dynsec.write_plugin_file(plugin_file, dynsec.plugin_file([], ADMIN))
    broker = EmbeddedBroker(folder / "broker", port=free_port(), dynsec=(dynsec.find_plugin(), plugin_file))
    await broker.start()
    acl = dynsec.BrokerAcl("127.0.0.1", broker.port, ADMIN)
    print(f"{'principals':>10} {'ms/DER (last batch)':>20} {'file MiB':>9} {'connect ms':>11} {'broker RSS MiB':>15}")
    step = max(ders // 10, batch)
    total_started = time.perf_counter()
    try:
        made = 0
        while made < ders:
            commands = []
            for index in range(made, min(made + batch, ders)):
                der_id = f"PV-{index:06d}"
                commands += dynsec.create_commands(dynsec.der_principal("hub/v1", der_id), f"pw-{der_id}")[2:]
            started = time.perf_counter()
            await acl.run(commands)
            took = time.perf_counter() - started
            made = min(made + batch, ders)
            if made % step == 0 or made == ders:
                last = f"PV-{made - 1:06d}"
                connect = await _connect_ms(broker.port, last, f"pw-{last}")
                size = plugin_file.stat().st_size / 2**20
                rss = _rss_kib(broker.pid or 0) / 1024
                print(f"{made:>10} {took * 1000 / batch:>20.2f} {size:>9.1f} {connect:>11.1f} {rss:>15.0f}")
        print(f"created {ders} DER principals over the control topic in {time.perf_counter() - total_started:.1f} s")
        one = dynsec.der_principal("hub/v1", "PV-one-more")
        started = time.perf_counter()
        await acl.run(dynsec.create_commands(one, "pw-one-more"))
        print(f"one registration's commands with {ders} principals: {(time.perf_counter() - started) * 1000:.0f} ms")
        # hubd broker sync against the running broker: asking all it holds and comparing, then one repair.
        want = dynsec.plugin_file(
            [
                dynsec.Principal(f"PV-{i:06d}", f"PV-{i:06d}", dynsec.der_acls("hub/v1", f"PV-{i:06d}"), {})
                for i in range(ders)
            ],
            ADMIN,
        )
        await acl.run(dynsec.delete_commands("PV-one-more"))
        started = time.perf_counter()
        done = await reconcile(acl, want, {})
        print(f"live sync with {ders} principals, nothing to change: {time.perf_counter() - started:.2f} s", done.lines)
        await acl.run([{"command": "disableClient", "username": "PV-000000"}])
        started = time.perf_counter()
        done = await reconcile(acl, want, {})
        print(
            f"live sync with {ders} principals, one client to enable: {time.perf_counter() - started:.2f} s", done.lines
        )
    finally:
        await broker.stop()
    # The same principals rebuilt from the registry's hashes (hubd broker sync), then a broker start with them.
    principals = [
        dynsec.Principal(
            f"PV-{i:06d}", f"PV-{i:06d}", dynsec.der_acls("hub/v1", f"PV-{i:06d}"), dynsec.password_record(f"pw-{i}")
        )
        for i in range(ders)
    ]
    started = time.perf_counter()
    dynsec.write_plugin_file(plugin_file, dynsec.plugin_file(principals, ADMIN))
    written = time.perf_counter() - started
    again = EmbeddedBroker(folder / "broker", port=free_port(), dynsec=(dynsec.find_plugin(), plugin_file))
    started = time.perf_counter()
    await again.start()
    up = time.perf_counter() - started
    rate = await _wrong_connects_per_s(again.port, "PV-000000")
    await again.stop()
    size = plugin_file.stat().st_size / 2**20
    print(f"rebuilt file for {ders} DERs: {size:.1f} MiB written in {written:.2f} s; broker up in {up:.2f} s")
    print(f"wrong-password connects the broker answers (PBKDF2, {dynsec.ITERATIONS} rounds): {rate:.0f}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ders", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hubd-bench-principals-") as folder:
        asyncio.run(run(args.ders, args.batch, Path(folder)))


if __name__ == "__main__":
    main()
