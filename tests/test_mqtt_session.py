"""The MQTT session's conformance: packets split at every byte across reads, what CONNACK says (Maximum QoS,
an assigned client id), DISCONNECT reasons named, the will and the hub's retained status."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

from conftest import RunningHub
from loguru import logger

from hubd.broker import EmbeddedBroker
from hubd.mqtt import packets
from hubd.mqtt.session import MqttSession


class _Wire(asyncio.Transport):
    """A transport that keeps what the session writes (nothing is read back from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _connack(properties: list[tuple[int, Any]]) -> bytes:
    return packets._packet(packets.CONNACK << 4, b"\x00\x00" + packets.encode_properties(properties))


def _stream() -> bytes:
    """What a broker might send: CONNACK with properties, SUBACK, PUBLISHes whose remaining lengths take one,
    two and three bytes, a PUBACK of the session's own publish, PINGRESP, and DISCONNECT 0x98."""
    props = packets.publish_properties("application/json", correlation_data=b"c-1")
    return b"".join(
        (
            _connack([(0x21, 7), (0x27, 100_000), (0x24, 1), (0x12, "auto-assigned-1")]),
            packets._packet(packets.SUBACK << 4, b"\x00\x01\x00\x01"),
            packets.publish("a/b", b"x", 1, 11, props),
            packets.publish("a/" + "c" * 150, b"y" * 200, 1, 12),
            packets.publish("big", b"z" * 20_000, 1, 13, props),
            packets.publish("q0", b"w", 0, 0),
            b"\x40\x03\x00\x02\x00",  # PUBACK of packet id 2 (1 is the subscription), success
            b"\xd0\x00",  # PINGRESP
            packets._packet(packets.DISCONNECT << 4, b"\x98\x00"),
        )
    )


async def _feed(chunks: list[bytes]) -> tuple[list[tuple[str, bytes, int]], MqttSession, list[int]]:
    got: list[tuple[str, bytes, int]] = []
    verdicts: list[int] = []

    def on_publish(first: int, body: bytes) -> None:
        topic, payload, _, packet_id, _ = packets.parse_publish(first, body)
        got.append((topic, payload, packet_id))

    session = MqttSession("asked-for", on_publish=on_publish, keepalive_s=0)
    session._connack = asyncio.get_running_loop().create_future()
    session.connection_made(_Wire())
    session._first_subscription = None
    done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
    session._subscribing[1] = done
    session.publish("out", b"answer", verdict=verdicts.append)  # queued: not connected until CONNACK is read
    for chunk in chunks:
        session.data_received(chunk)
    await asyncio.sleep(0)
    assert done.done() and done.result() == [1]
    return got, session, verdicts


def test_packets_split_at_every_byte_read_the_same() -> None:
    stream = _stream()
    whole, session, verdicts = asyncio.run(_feed([stream]))
    assert [(t, len(p), i) for t, p, i in whole] == [
        ("a/b", 1, 11),
        ("a/" + "c" * 150, 200, 12),
        ("big", 20_000, 13),
        ("q0", 1, 0),
    ]
    assert session.server_receive_maximum == 7 and session.server_maximum_packet == 100_000
    assert session.server_maximum_qos == 1 and session.client_id == "auto-assigned-1"
    assert verdicts == [0]  # the queued publish went out (packet id 2), and its PUBACK was read

    async def every_cut() -> None:
        for cut in range(1, len(stream)):
            split, _, told = await _feed([stream[:cut], stream[cut:]])
            assert split == whole, f"split at byte {cut}"
            assert told == [0]

    asyncio.run(every_cut())
    one_by_one, _, told = asyncio.run(_feed([stream[i : i + 1] for i in range(len(stream))]))
    assert one_by_one == whole and told == [0]


def test_a_disconnect_reason_is_named_in_the_log() -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING")
    try:
        asyncio.run(_feed([_stream()]))
    finally:
        logger.remove(sink)
    assert any("0x98 (administrative action)" in line for line in lines), lines


def test_a_broker_of_maximum_qos_0_gets_qos_0_publishes() -> None:
    async def run() -> tuple[list[bytes], list[int]]:
        session = MqttSession("c", on_publish=lambda first, body: None, keepalive_s=0)
        session._connack = asyncio.get_running_loop().create_future()
        wire = _Wire()
        session.connection_made(wire)
        session.data_received(_connack([(0x24, 0)]))
        told: list[int] = []
        session.publish("t", b"p", verdict=told.append)
        await asyncio.sleep(0)
        return wire.written, told

    written, told = asyncio.run(run())
    assert told == [0]
    assert written[-1] == packets.publish("t", b"p", 0, 0)  # QoS 0: no packet id, nothing waits for a PUBACK


def test_the_broker_assigns_a_client_id_when_asked_for_none(broker: EmbeddedBroker) -> None:
    async def run() -> str:
        session = MqttSession("", on_publish=lambda first, body: None, clean_start=True)
        await session.connect(broker.host, broker.port)
        name = session.client_id
        await session.disconnect()
        return name

    assert asyncio.run(run()).startswith("auto-")


def _retained(broker: EmbeddedBroker, topic: str) -> dict[str, Any]:
    out = subprocess.run(
        ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-t", topic, "-C", "1", "-W", "5"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return dict(json.loads(out.stdout))


def test_the_will_is_published_when_the_connection_dies(broker: EmbeddedBroker) -> None:
    async def run() -> None:
        session = MqttSession(
            "willing",
            on_publish=lambda first, body: None,
            clean_start=True,
            will=("test/status", b'{"status": "offline"}'),
        )
        await session.connect(broker.host, broker.port)
        session.publish_retained("test/status", b'{"status": "online"}')
        await asyncio.sleep(0.1)
        assert _retained(broker, "test/status")["status"] == "online"
        session._abort()  # as if the network had gone: no DISCONNECT
        await asyncio.sleep(0.2)

    asyncio.run(run())
    assert _retained(broker, "test/status")["status"] == "offline"


def test_the_hub_keeps_a_retained_status(hub: RunningHub) -> None:
    assert _retained(hub.broker, "hub/v1/status")["status"] == "online"
    hub.stop()
    assert _retained(hub.broker, "hub/v1/status")["status"] == "offline"
    hub.start()
    assert _retained(hub.broker, "hub/v1/status")["status"] == "online"
