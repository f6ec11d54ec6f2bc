"""The MQTT v5 driver: its packets against the specification, its sessions against a real Mosquitto.

Messages are published with ``mosquitto_pub`` (an independent MQTT implementation) wherever the test is about
what the driver receives; the driver runs in ``asyncio.run`` in the test's thread.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import broker_allowing
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger

from hubd.broker import EmbeddedBroker, free_port, load_template
from hubd.config import BrokerConfig
from hubd.mqtt import packets
from hubd.mqtt.driver import Handler, MqttDriver, MqttError, per_message
from hubd.mqtt.session import MqttSession

Received = list[tuple[str, bytes, dict[str, Any]]]

# -- packets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4), (268_435_455, 4)],
)
def test_varint_boundaries(value: int, size: int) -> None:
    encoded = packets.encode_varint(value)
    assert len(encoded) == size
    assert packets.decode_varint(encoded + b"\xff", 0) == (value, size)


def test_varint_limits() -> None:
    with pytest.raises(ValueError):
        packets.encode_varint(268_435_456)
    with pytest.raises(packets.MalformedPacket):
        packets.decode_varint(b"\xff\xff\xff\xff\x01", 0)
    with pytest.raises(IndexError):  # incomplete: the reader waits for more bytes
        packets.decode_varint(b"\x80", 0)


@given(st.integers(min_value=0, max_value=268_435_455))
def test_varint_round_trip(value: int) -> None:
    assert packets.decode_varint(packets.encode_varint(value), 0) == (value, len(packets.encode_varint(value)))


@pytest.mark.parametrize("payload_size", [0, 100, 117, 118, 16_300, 16_400, 70_000, 2_100_000])
@pytest.mark.parametrize("qos", [0, 1])
def test_publish_round_trip(payload_size: int, qos: int) -> None:
    payload = bytes(i % 251 for i in range(payload_size))
    users = [("b", "2"), ("a", "1"), ("b", "3")]
    properties = packets.publish_properties(
        content_type="application/json", response_topic="r/t", correlation_data=b"\x00c", user_properties=users
    )
    packet = packets.publish("hub/v1/data/x", payload, qos, 513 if qos else 0, properties)
    first, start, end = packets.split(packet) or (0, 0, 0)
    assert end == len(packet)
    topic, body, got_qos, packet_id, got = packets.parse_publish(first, packet[start:end])
    assert (topic, body, got_qos, packet_id) == ("hub/v1/data/x", payload, qos, 513 * qos)
    assert got == {
        "content_type": ["application/json"],
        "response_topic": ["r/t"],
        "correlation_data": [b"\x00c"],
        "user_property": users,
    }
    assert packets.parse_publish(packets.with_dup(packet)[0], packet[start:end])[2] == qos
    assert packets.with_dup(packet)[0] & packets.DUP


def test_split_waits_for_the_whole_packet() -> None:
    packet = packets.publish("t", b"x" * 200, 1, 7)
    assert packets.split(packet[:1]) is None
    assert packets.split(packet[:2]) is None  # the length takes two bytes here
    first, start, end = packets.split(packet[:10]) or (0, 0, 0)
    assert (first, start, end) == (0x32, 3, len(packet))


def test_answer_properties_fast_path_matches_the_table() -> None:
    fast = packets.publish_properties("application/json", correlation_data=b"abc")
    assert fast == packets.encode_properties([(0x03, "application/json"), (0x09, b"abc")])
    assert packets.publish_properties("application/json") == packets.encode_properties([(0x03, "application/json")])


def test_properties_the_hub_does_not_use_are_skipped_by_their_type() -> None:
    every_kind = [
        (0x01, 1),  # byte
        (0x23, 9),  # two-byte integer (topic alias)
        (0x02, 3600),  # four-byte integer
        (0x0B, 16_384),  # variable byte integer
        (0x03, "text/plain"),  # UTF-8 string
        (0x09, b"\x01\x02"),  # binary
        (0x26, ("k", "v")),  # string pair
        (0x0B, 3),  # a repeated one
        (0x08, "answers/here"),
    ]
    encoded = packets.encode_properties(every_kind)
    length, pos = packets.decode_varint(encoded, 0)
    assert packets.decode_properties(encoded, pos, pos + length) == {
        "payload_format_indicator": [1],
        "topic_alias": [9],
        "message_expiry_interval": [3600],
        "subscription_identifier": [16_384, 3],
        "content_type": ["text/plain"],
        "correlation_data": [b"\x01\x02"],
        "user_property": [("k", "v")],
        "response_topic": ["answers/here"],
    }
    with pytest.raises(packets.MalformedPacket):  # an identifier no version of MQTT defines: length unknown
        packets.decode_properties(b"\x7f\x00\x01", 0, 3)
    with pytest.raises(packets.MalformedPacket):  # runs past the end
        packets.decode_properties(b"\x03\x00\x09abc", 0, 6)


def test_connect_and_the_broker_packets() -> None:
    connect = packets.connect(
        "hubd",
        keepalive_s=30,
        clean_start=False,
        session_expiry_s=3600,
        receive_maximum=500,
        username="u",
        password="p",
    )
    assert connect == (
        b"\x10\x1f\x00\x04MQTT\x05\xc0\x00\x1e\x08\x11\x00\x00\x0e\x10\x21\x01\xf4\x00\x04hubd\x00\x01u\x00\x01p"
    )
    connack = packets.parse_connack(b"\x01\x00\x06\x21\x00\x14\x22\x00\x0a")
    assert connack.session_present and connack.reason == 0 and connack.first("receive_maximum") == 20
    assert packets.parse_connack(b"\x00\x87").reason == 0x87
    assert packets.subscribe(1, ["a/#"], 1) == b"\x82\x09\x00\x01\x00\x00\x03a/#\x01"
    assert packets.parse_suback(b"\x00\x01\x00\x01\x87") == (1, [1, 0x87], {})
    assert packets.puback(258) == b"\x40\x02\x01\x02"
    assert packets.parse_ack(b"\x01\x02") == (258, 0) and packets.parse_ack(b"\x01\x02\x10\x00") == (258, 0x10)
    assert packets.disconnect() == b"\xe0\x00"
    assert packets.parse_disconnect(b"\x8b\x00") == (0x8B, {})


# -- sessions against Mosquitto --------------------------------------------------------------------------------


def _config(broker: EmbeddedBroker, **overrides: Any) -> BrokerConfig:
    values: dict[str, Any] = {"client_id": f"driver-test-{broker.port}", "keepalive_s": 5, **overrides}
    return BrokerConfig(**values)


def _pub(broker: EmbeddedBroker, topic: str, *args: str, message: str | None = "{}") -> None:
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "5", "-t", topic, *args]
    subprocess.run([*command, "-m", message] if message is not None else command, check=True, timeout=10)


async def _apub(broker: EmbeddedBroker, topic: str, *args: str, message: str | None = "{}") -> None:
    await asyncio.to_thread(_pub, broker, topic, *args, message=message)


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def _recorder(received: Received) -> Handler:
    async def handler(topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        received.append((topic, payload, properties))

    return per_message(handler)


async def _nothing_arrives(broker: EmbeddedBroker, topics: list[str], wait_s: float = 0.3) -> None:
    """A fresh driver with the same client id gets nothing: every message before was acknowledged."""
    received: Received = []
    driver = MqttDriver(_config(broker), broker.url, topics, _recorder(received))
    await driver.start()
    await asyncio.sleep(wait_s)
    await driver.stop()
    assert received == []


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    yield lines
    logger.remove(sink)


def test_failed_message_is_delivered_again_after_reconnect_then_acknowledged(
    broker: EmbeddedBroker, log_lines: list[str]
) -> None:
    calls: list[bytes] = []

    async def flaky(topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("the store is down")

    async def main() -> None:
        driver = MqttDriver(_config(broker), broker.url, ["t/flaky"], per_message(flaky))
        await driver.start()
        await _apub(broker, "t/flaky", "-q", "1", message="m1")
        await _until(lambda: len(calls) == 1)
        await asyncio.sleep(0.1)
        assert len(calls) == 1  # no PUBACK, and MQTT v5 redelivers only on a new connection
        driver._session._abort_lost()  # the network drops: the driver reconnects by itself
        await _until(lambda: len(calls) == 2)
        await driver.stop()
        await _nothing_arrives(broker, ["t/flaky"])

    asyncio.run(main())
    assert calls == [b"m1", b"m1"]
    assert sum("message on t/flaky failed" in line for line in log_lines) == 1
    assert sum("disconnected from the broker" in line for line in log_lines) == 1


def test_messages_not_finished_when_stopping_go_to_the_next_driver(broker: EmbeddedBroker) -> None:
    """Receive maximum 1: the first message is in hand when stop() begins, the second waits at the gate."""
    release = asyncio.Event()
    first: Received = []

    async def slow(topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        first.append((topic, payload, properties))
        await release.wait()

    async def main() -> None:
        nonlocal release
        release = asyncio.Event()
        driver = MqttDriver(_config(broker, receive_maximum=1), broker.url, ["t/slow"], per_message(slow))
        await driver.start()
        await _apub(broker, "t/slow", "-q", "1", message="in-hand")
        await _apub(broker, "t/slow", "-q", "1", message="waiting")
        await _until(lambda: len(first) == 1)
        await asyncio.sleep(0.1)  # the second has arrived by now, and waits
        stopping = asyncio.create_task(driver.stop(timeout_s=5))
        await asyncio.sleep(0.05)
        release.set()  # the one in hand finishes (and is acknowledged) during stop()
        await stopping
        assert [p for _, p, _ in first] == [b"in-hand"]

        received: Received = []
        again = MqttDriver(_config(broker), broker.url, ["t/slow"], _recorder(received))
        await again.start()
        await _until(lambda: len(received) == 1)
        await asyncio.sleep(0.2)
        await again.stop()
        assert [p for _, p, _ in received] == [b"waiting"]

    asyncio.run(main())


def test_a_byte_limit_bounds_what_is_in_hand_and_a_larger_message_still_passes_alone(broker: EmbeddedBroker) -> None:
    """``broker.max_bytes_in_hand``: messages wait undecoded past it; one larger than it is taken when nothing else
    is in hand, so it is never stuck; every message is handled and acknowledged."""
    in_hand: list[int] = []  # sizes of the messages being handled
    seen: list[list[int]] = []  # what was in hand as each message started

    async def slow(topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        in_hand.append(len(payload))
        seen.append(list(in_hand))
        await asyncio.sleep(0.05)
        in_hand.remove(len(payload))

    async def main() -> None:
        driver = MqttDriver(_config(broker, max_bytes_in_hand=5000), broker.url, ["t/bytes"], per_message(slow))
        await driver.start()
        lines = "\n".join(["a" * 3000] * 4 + ["b" * 9000, "c" * 3000]) + "\n"
        command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", "t/bytes", "-l"]
        await asyncio.to_thread(subprocess.run, command, input=lines.encode(), check=True, timeout=10)
        await _until(lambda: len(seen) == 6)
        await driver.stop()
        await _nothing_arrives(broker, ["t/bytes"])

    asyncio.run(main())
    # At most two of 3,000 bytes: the second took the total past 5,000, so the next waited.
    assert max(sum(sizes) for sizes in seen if 9000 not in sizes) == 6000
    assert [sizes for sizes in seen if 9000 in sizes] == [[9000]]  # the large one alone


def test_a_message_over_the_byte_limit_waits_while_another_is_in_hand(broker: EmbeddedBroker) -> None:
    """The large one arrives while a small one is held in hand: it waits, undecoded, and is taken alone once
    the small one is done; the small one published after it waits behind it (arrival order is kept)."""
    in_hand: list[int] = []
    seen: list[list[int]] = []
    release = asyncio.Event()

    async def held(topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        in_hand.append(len(payload))
        seen.append(list(in_hand))
        if len(payload) == 3000:
            await release.wait()
        in_hand.remove(len(payload))

    async def main() -> None:
        driver = MqttDriver(_config(broker, max_bytes_in_hand=5000), broker.url, ["t/big"], per_message(held))
        await driver.start()
        await _apub(broker, "t/big", "-q", "1", message="a" * 3000)
        await _until(lambda: seen == [[3000]])
        await _apub(broker, "t/big", "-q", "1", message="b" * 9000)
        await _apub(broker, "t/big", "-q", "1", message="c" * 100)
        await _until(lambda: len(driver._waiting) == 2)  # both reached the hub and wait
        assert seen == [[3000]]
        release.set()
        await _until(lambda: len(seen) == 3)
        await driver.stop()
        await _nothing_arrives(broker, ["t/big"])

    asyncio.run(main())
    assert seen == [[3000], [9000], [100]]


def test_messages_published_while_down_arrive_on_connect(broker: EmbeddedBroker) -> None:
    async def main() -> None:
        received: Received = []
        driver = MqttDriver(_config(broker), broker.url, ["t/queued/#"], _recorder(received))
        await driver.start()  # creates the persistent session and its subscription
        await driver.stop()
        for i in range(3):
            await _apub(broker, f"t/queued/{i}", "-q", "1", message=str(i))
        driver = MqttDriver(_config(broker), broker.url, ["t/queued/#"], _recorder(received))
        await driver.start()
        await _until(lambda: len(received) == 3)
        await driver.stop()
        assert sorted((t, p) for t, p, _ in received) == [(f"t/queued/{i}", str(i).encode()) for i in range(3)]

    asyncio.run(main())


def test_qos0_and_user_properties_reach_the_handler(broker: EmbeddedBroker) -> None:
    async def main() -> None:
        received: Received = []
        driver = MqttDriver(_config(broker), broker.url, ["t/props"], _recorder(received))
        await driver.start()
        user = ["-D", "publish", "user-property", "b", "2", "-D", "publish", "user-property", "a", "1"]
        user += ["-D", "publish", "user-property", "b", "3"]
        answer = ["-D", "publish", "response-topic", "t/answers", "-D", "publish", "correlation-data", "c-1"]
        expiry = ["-D", "publish", "message-expiry-interval", "60", "-D", "publish", "content-type", "text/plain"]
        await _apub(broker, "t/props", "-q", "1", *user, *answer, *expiry, message="v5")
        await _apub(broker, "t/props", "-q", "0", message="fire and forget")
        await _until(lambda: len(received) == 2)
        await driver.stop()
        (_, payload, properties), (_, payload0, properties0) = received
        assert payload == b"v5"
        assert properties["user_property"] == [("b", "2"), ("a", "1"), ("b", "3")]
        assert properties["response_topic"] == ["t/answers"]
        assert properties["correlation_data"] == [b"c-1"]
        assert properties["content_type"] == ["text/plain"]
        assert payload0 == b"fire and forget" and properties0.get("user_property") is None

    asyncio.run(main())


def test_a_large_payload_arrives_whole(broker: EmbeddedBroker, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(i % 256 for i in range(3_000_000)))

    async def main() -> None:
        received: Received = []
        driver = MqttDriver(_config(broker), broker.url, ["t/big"], _recorder(received))
        await driver.start()
        await _apub(broker, "t/big", "-q", "1", "-f", str(big), message=None)
        await _apub(broker, "t/big", "-q", "1", message="after")
        await _until(lambda: len(received) == 2)
        await driver.stop()
        assert [p for _, p, _ in received] == [big.read_bytes(), b"after"]

    asyncio.run(main())


@pytest.fixture
def narrow_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker that takes at most 5 unacknowledged QoS 1 messages from a client (its Receive Maximum)."""
    with broker_allowing(tmp_path, 5) as embedded:
        yield embedded


def test_answers_beyond_the_broker_receive_maximum_all_arrive(narrow_broker: EmbeddedBroker) -> None:
    count = 300
    broker = narrow_broker

    async def main() -> None:
        answers: list[bytes] = []

        def on_answer(first: int, body: bytes) -> None:
            _, _, _, packet_id, properties = packets.parse_publish(first, body)
            listener.ack(packet_id)
            assert properties["content_type"] == ["application/json"]
            answers.append(properties["correlation_data"][0])

        listener = MqttSession(f"listener-{broker.port}", on_publish=on_answer, clean_start=True)
        await listener.connect("127.0.0.1", broker.port)
        assert await listener.subscribe(["t/answers"]) == [1]

        driver: MqttDriver

        async def answer(topic: str, payload: bytes, properties: dict[str, Any]) -> None:
            for i in range(3):  # three answers a message: the queue is always longer than the broker takes
                driver.publish("t/answers", {"ok": True}, payload + b"/%d" % i)

        driver = MqttDriver(_config(broker), broker.url, ["t/asks"], per_message(answer))
        await driver.start()
        assert driver._session.server_receive_maximum == 5
        lines = "".join(f"{i}\n" for i in range(count)).encode()
        command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", "t/asks", "-l"]
        await asyncio.to_thread(subprocess.run, command, input=lines, check=True, timeout=30)
        await _until(lambda: len(answers) == 3 * count, 15)
        await driver.stop()
        await listener.disconnect()
        assert sorted(answers) == sorted(b"%d/%d" % (i, j) for i in range(count) for j in range(3))
        await _nothing_arrives(broker, ["t/asks"])  # every message was acknowledged

    asyncio.run(main())


def test_answers_unacknowledged_when_the_connection_drops_are_sent_again(broker: EmbeddedBroker) -> None:
    """The answers are in flight (written to no socket yet) when the connection drops: resent with DUP=1."""

    async def main() -> None:
        answers: list[bytes] = []

        def on_answer(first: int, body: bytes) -> None:
            _, payload, _, packet_id, _ = packets.parse_publish(first, body)
            listener.ack(packet_id)
            answers.append(payload)

        listener = MqttSession(f"listener-{broker.port}", on_publish=on_answer, clean_start=True)
        await listener.connect("127.0.0.1", broker.port)
        await listener.subscribe(["t/answers"])
        driver = MqttDriver(_config(broker), broker.url, ["t/none"], _recorder([]))
        await driver.start()
        for i in range(5):
            driver.publish("t/answers", {"i": i})
        assert driver._session.unacknowledged == 5
        driver._session._abort_lost()  # in the same loop turn: nothing of them reached the socket
        await _until(lambda: len(answers) == 5)
        # The broker may deliver an answer before it acknowledges it to the driver: wait for both.
        await _until(lambda: driver._session.unacknowledged == 0)
        await driver.stop()
        await listener.disconnect()
        assert answers == [b'{"i":%d}' % i for i in range(5)]

    asyncio.run(main())


def test_reconnects_and_resubscribes_after_the_broker_restarts(broker: EmbeddedBroker, log_lines: list[str]) -> None:
    async def main() -> None:
        received: Received = []
        driver = MqttDriver(_config(broker), broker.url, ["t/restart"], _recorder(received))
        await driver.start()
        await asyncio.to_thread(broker.stop_sync)
        await asyncio.sleep(0.3)  # a failed attempt or two while the broker is away
        await asyncio.to_thread(broker.start_sync)
        await _until(lambda: driver._session.connected, 10)
        await _apub(broker, "t/restart", "-q", "1", message="after")
        await _until(lambda: len(received) == 1)
        await driver.stop()
        assert received[0][1] == b"after"

    asyncio.run(main())
    assert sum("disconnected from the broker" in line for line in log_lines) == 1
    assert sum("connected to mqtt://" in line for line in log_lines) == 2


def test_the_first_attempt_to_reconnect_to_a_broker_that_came_back_is_made_at_once(broker: EmbeddedBroker) -> None:
    """A broker restarted faster than the driver notices (as hubd restarts its own) is reached again at once: every
    moment before the subscription is made again, a broker that lost the session drops what edges send."""

    async def main() -> float:
        received: Received = []
        driver = MqttDriver(_config(broker), broker.url, ["t/back"], _recorder(received))
        await driver.start()
        generation = driver._session.generation
        broker.stop_sync()  # the event loop is held meanwhile: the driver sees the loss with the broker back
        broker.start_sync()
        back = time.monotonic()
        await _until(lambda: driver._session.generation > generation and driver.connected, 5)
        took = time.monotonic() - back
        await _apub(broker, "t/back", "-q", "1", message="after")
        await _until(lambda: len(received) == 1)
        await driver.stop()
        return took

    took = asyncio.run(main())
    # Waiting first, even the shortest backoff would take 50 ms or more; connecting and subscribing take a few.
    assert took < 0.05, f"reconnected {took * 1000:.0f} ms after the broker was back"


def test_password_login_and_refusal_log_no_password(tmp_path: Path, log_lines: list[str]) -> None:
    secret = "do-not-log-this-3f1c"
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "hub", secret], check=True, timeout=10)
    template = tmp_path / "closed.conf.in"
    closed = load_template().replace("\n{access_control}\n", f"\nallow_anonymous false\npassword_file {passwords}\n")
    template.write_text(closed, encoding="utf-8")

    async def main() -> None:
        with EmbeddedBroker(tmp_path / "closed-data", port=free_port(), template=template) as broker:
            received: Received = []
            config = _config(broker, username="hub")
            driver = MqttDriver(config, broker.url, ["t/x"], _recorder(received), password=secret)
            await driver.start()
            await driver.stop()
            wrong = MqttDriver(config, broker.url, ["t/x"], _recorder([]), password=secret + "-wrong")
            with pytest.raises(MqttError, match="refused the connection"):
                await wrong.start()

    asyncio.run(main())
    assert any("connected to mqtt://" in line for line in log_lines)
    assert not any(secret in line for line in log_lines)


def test_keepalive_holds_an_idle_connection(broker: EmbeddedBroker, log_lines: list[str]) -> None:
    """Keepalive 1 s: Mosquitto drops a client silent for 1.5 s; PINGREQ every half keepalive keeps it."""

    async def main() -> None:
        received: Received = []
        driver = MqttDriver(_config(broker, keepalive_s=1), broker.url, ["t/idle"], _recorder(received))
        await driver.start()
        await asyncio.sleep(2.5)
        await _apub(broker, "t/idle", "-q", "1", message="still here")
        await _until(lambda: len(received) == 1)
        await driver.stop()

    asyncio.run(main())
    assert not any("disconnected from the broker" in line for line in log_lines)


def test_start_raises_when_no_broker_listens() -> None:
    driver = MqttDriver(BrokerConfig(), f"mqtt://127.0.0.1:{free_port()}", ["t/x"], _recorder([]))
    with pytest.raises(OSError):
        asyncio.run(driver.start())
