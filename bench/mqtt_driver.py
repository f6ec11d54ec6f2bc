"""bench/mqtt_driver: the CPU an MQTT client costs per message in the hub's cycle, hubd's driver beside gmqtt.

The cycle is case A's without the hub's data path: receive a QoS 1 message, answer it with a QoS 1 publish
(content type, and the response topic the message carried), PUBACK the message after the handler returned,
take the broker's PUBACK of the answer. What one run does, all on 127.0.0.1:

1. starts its own Mosquitto (``hubd.broker.EmbeddedBroker``: the embedded config, so the broker takes 100
   unacknowledged answers at once, as in the hub);
2. for each client (hubd's ``MqttDriver``; a bare gmqtt client, if gmqtt is installed), subscribes it to
   ``bench/asks``, publishes N one-line JSON messages with ``mosquitto_pub -l -q 1 -M 100 -V 5`` and the
   response topic ``bench/answers``, and times publish start → a ``mosquitto_sub -C N`` (its persistent
   session made before) has received all N answers;
3. prints messages/s and the CPU µs per message of this process (the client's event loop is all it runs:
   ``time.process_time``) and of the broker (/proc).

    .venv/bin/python bench/mqtt_driver.py [--messages 50000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from hubd.broker import EmbeddedBroker, free_port
from hubd.config import BrokerConfig
from hubd.mqtt.driver import Done, MqttDriver

HOST = "127.0.0.1"
ASKS = "bench/asks"
ANSWERS = "bench/answers"
RECEIVE_MAXIMUM = 500  # hubd's default (broker.receive_maximum)
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    client: str
    messages: int
    seconds: float
    cpu_s: float
    system_s: float
    broker_cpu_s: float

    def line(self) -> str:
        rate = self.messages / self.seconds
        cpu = 1e6 * self.cpu_s / self.messages
        broker = 1e6 * self.broker_cpu_s / self.messages
        return (
            f"{self.client:<14} {self.messages:>8,} msgs {self.seconds:7.2f} s {rate:>9,.0f} msgs/s   "
            f"client CPU {cpu:6.1f} µs/msg (system {1e6 * self.system_s / self.messages:4.1f})   "
            f"broker CPU {broker:5.1f} µs/msg"
        )


def broker_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# -- the clients: start(handler-ready) → stop ----------------------------------------------------------------

Stop = Callable[[], Awaitable[None]]


async def run_hubd(port: int, round_no: int) -> Stop:
    driver: MqttDriver

    def answer(topic: str, payload: bytes, properties: dict[str, Any], done: Done) -> None:
        driver.publish(properties["response_topic"][0], {"ok": True, "accepted": 1, "rejected": []})
        done(True)

    config = BrokerConfig(client_id=f"bench-hubd-{round_no}", receive_maximum=RECEIVE_MAXIMUM)
    driver = MqttDriver(config, f"mqtt://{HOST}:{port}", [ASKS], answer)
    await driver.start()
    return driver.stop


async def run_gmqtt(port: int, round_no: int) -> Stop:
    """gmqtt 0.8 as the hub used it: ack after the callback; an answer past the broker's limit is retried."""
    from gmqtt import Client  # type: ignore[import-not-found,unused-ignore]

    loop = asyncio.get_running_loop()
    waiting: deque[tuple[str, bytes]] = deque()

    def send(topic: str, payload: bytes) -> bool:
        try:
            client.publish(topic, payload, qos=1, content_type="application/json")
        except OverflowError:
            return False
        return True

    def retry() -> None:
        while waiting and send(*waiting[0]):
            waiting.popleft()
        if waiting:
            loop.call_later(0.001, retry)

    async def on_message(client: Any, topic: str, payload: bytes, qos: int, properties: dict[str, Any]) -> int:
        body = orjson.dumps({"ok": True, "accepted": 1, "rejected": []})
        reply = properties["response_topic"][0]
        if waiting or not send(reply, body):
            waiting.append((reply, body))
            if len(waiting) == 1:
                loop.call_later(0.001, retry)
        return 0

    client = Client(
        f"bench-gmqtt-{round_no}",
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=3600,
        receive_maximum=RECEIVE_MAXIMUM,
    )
    client.on_message = on_message
    subscribed = loop.create_future()
    client.on_subscribe = lambda *args: subscribed.done() or subscribed.set_result(None)
    await client.connect(HOST, port, keepalive=30)
    client.subscribe(ASKS, qos=1)
    await asyncio.wait_for(subscribed, 10)

    async def stop() -> None:
        await client.disconnect()

    return stop


CLIENTS: dict[str, Callable[[int, int], Awaitable[Stop]]] = {"hubd driver": run_hubd, "gmqtt 0.8": run_gmqtt}


# -- one timed run -------------------------------------------------------------------------------------------


async def timed(name: str, broker: EmbeddedBroker, lines: Path, count: int, round_no: int) -> Result:
    mqtt = ["-h", HOST, "-p", str(broker.port), "-V", "5", "-q", "1"]
    session = ["-c", "-i", f"bench-answers-{round_no}-{name.split()[0]}", "-t", ANSWERS]
    # A persistent session first, so that no answer is missed however late the counting client connects.
    subprocess.run(["mosquitto_sub", *mqtt, *session, "-x", "600", "-E"], check=True, timeout=10)
    stop = await CLIENTS[name](broker.port, round_no)
    counter = await asyncio.create_subprocess_exec(
        "mosquitto_sub", *mqtt, *session, "-x", "600", "-C", str(count), stdout=subprocess.DEVNULL
    )
    assert broker.pid is not None
    broker_before = broker_cpu(broker.pid)
    cpu_before = time.process_time()
    system_before = os.times().system
    started = time.perf_counter()
    publisher = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        *mqtt,
        "-M",
        "100",
        "-t",
        ASKS,
        "-D",
        "publish",
        "response-topic",
        ANSWERS,
        "-l",
        stdin=lines.open("rb"),
    )
    try:
        await asyncio.wait_for(counter.wait(), 60 + count / 1000)
    finally:
        for process in (counter, publisher):
            if process.returncode is None:
                process.kill()
                await process.wait()
    seconds = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_before
    system_s = os.times().system - system_before
    broker_s = broker_cpu(broker.pid) - broker_before
    if counter.returncode != 0:
        raise RuntimeError(f"{name}: not every answer arrived (mosquitto_sub exited {counter.returncode})")
    await stop()
    return Result(name, count, seconds, cpu_s, system_s, broker_s)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each client, alternating")
    parser.add_argument("--only", choices=sorted(CLIENTS), help="run one client only")
    args = parser.parse_args()
    names = [args.only] if args.only else list(CLIENTS)
    if "gmqtt 0.8" in names:
        try:
            import gmqtt  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        except ImportError:
            print("gmqtt is not installed (.venv/bin/pip install 'gmqtt>=0.8,<0.9'): measuring hubd's driver only")
            names.remove("gmqtt 0.8")
    with tempfile.TemporaryDirectory(prefix="hubd-bench-mqtt-") as tmp:
        lines = Path(tmp) / "asks.jsonl"
        now_ms = int(time.time() * 1000)
        lines.write_bytes(
            b"".join(
                orjson.dumps(
                    {
                        "request_id": i,
                        "readings": [{"der_id": f"PV-{i % 1000:04d}", "measured_at": now_ms - i, "power_kw": 1.5}],
                    }
                )
                + b"\n"
                for i in range(args.messages)
            )
        )
        load = os.getloadavg()[0]
        print(f"{args.messages:,} messages a run, load average {load:.2f} at start, {os.cpu_count()} CPUs")
        with EmbeddedBroker(Path(tmp) / "broker", port=free_port()) as broker:
            for round_no in range(args.rounds):
                for name in names:
                    print((await timed(name, broker, lines, args.messages, round_no)).line(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
