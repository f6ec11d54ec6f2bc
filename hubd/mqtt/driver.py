"""MQTT driver (MQTT v5): QoS 1, a fixed client id, a persistent session, PUBACK after commit.

A message is acknowledged to the broker only once the hub's handler has said it is done with it (the
readings are committed and the answer is on its way). A message whose handler fails, or that arrives while
the hub is stopping, is never acknowledged: the broker keeps it in the persistent session and delivers it
again on the next connection. The protocol itself is ``mqtt_session`` (connection, flow control) and
``mqtt_packets`` (bytes); this module is the hub's policy on top: how many messages are in hand, when each
is acknowledged, reconnecting, stopping. Built on ``asyncio.Protocol`` rather than an MQTT library because
the library's cost per message was the whole of the hub's budget (bench/README.md).
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import orjson
from loguru import logger

from hubd.config import BrokerConfig
from hubd.model import format_time, now_ms
from hubd.mqtt.packets import MalformedPacket, parse_publish, publish_properties, reason_text
from hubd.mqtt.session import MqttError, MqttSession

__all__ = ["AnswerTooLarge", "Done", "Handler", "MqttDriver", "MqttError", "per_message"]


class AnswerTooLarge(Exception):
    """An answer larger than the broker takes; it was not sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the answer has {size} bytes, more than the broker takes in one packet ({limit})")
        self.size = size
        self.limit = limit


Done = Callable[[bool], None]
Handler = Callable[[str, bytes, dict[str, Any], Done], None]
"""Called with each message (topic, payload, v5 properties) in arrival order, and ``done``: the handler calls
``done(True)`` once, later, when it is finished with the message (it is then acknowledged), or ``done(False)``
(never acknowledged: the broker delivers it again). No task per message: a handler that takes messages in
by the hundred (the hub's data path) need not pay for one each."""


def per_message(handler: Callable[[str, bytes, dict[str, Any]], Awaitable[None]]) -> Handler:
    """A coroutine per message, in a task of its own: done when it returns, not done if it raises."""
    tasks: set[asyncio.Task[None]] = set()  # strong references while they run

    async def run(topic: str, payload: bytes, properties: dict[str, Any], done: Done) -> None:
        try:
            await handler(topic, payload, properties)
        except Exception:
            logger.exception("message on {} failed; not acknowledged, the broker will deliver it again", topic)
            done(False)
            return
        except BaseException:  # cancelled: not acknowledged either
            done(False)
            raise
        done(True)

    def start(topic: str, payload: bytes, properties: dict[str, Any], done: Done) -> None:
        task = asyncio.get_running_loop().create_task(run(topic, payload, properties, done))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return start


_RECONNECT_S = (0.1, 30.0)  # first and longest wait between attempts to reach the broker again


class MqttDriver:
    """One MQTT v5 connection that receives the hub's topics and publishes its answers.

    At most ``config.receive_maximum`` messages are in hand at once (handed to the handler, or done and
    waiting for their answer to go out); the others wait undecoded, in arrival order. The broker should do
    this itself (the hub announces Receive Maximum), but Mosquitto 2.0.11 honours it only until the first
    PUBACK and then sends up to that many more per PUBACK (bench/README.md): a backlog reaches the hub all at
    once, and decoded it takes ten times its size in memory.
    """

    def __init__(
        self,
        config: BrokerConfig,
        url: str,
        topics: list[str],
        handler: Handler,
        password: str | None = None,
        status_topic: str | None = None,
    ) -> None:
        self._config = config
        self._url = urlsplit(url)
        group = config.shared_group
        self._topics = [f"$share/{group}/{t}" if group else t for t in topics]
        self._handler = handler
        self._tls = tls_context(config) if self._url.scheme == "mqtts" else None
        # A retained "online" on <prefix>/status once connected, "offline" when hubd stops, and as the will the
        # broker publishes when the connection ends otherwise: edge terminals can tell whether the hub is up.
        self._status_topic = status_topic
        self._host = self._url.hostname or "127.0.0.1"
        self._port = self._url.port or (8883 if self._tls else 1883)
        self._session = MqttSession(
            config.client_id,
            on_publish=self._on_publish,
            on_lost=self._on_lost,
            on_sent=self._release_held,
            clean_start=False,
            session_expiry_s=config.session_expiry_s,
            receive_maximum=config.receive_maximum,
            keepalive_s=config.keepalive_s,
            username=config.username,
            password=password if config.username else None,
            will=(status_topic, _status("offline")) if status_topic else None,
        )
        self._accepting = True
        self._limit = config.receive_maximum
        self._byte_limit = config.max_bytes_in_hand
        self._in_hand = 0
        self._bytes_in_hand = 0  # of the PUBLISH packets in hand
        self._waiting: deque[tuple[int, bytes]] = deque()  # PUBLISH packets not yet taken, undecoded
        # Messages done whose PUBACK waits until the answers queued before it have gone out:
        # (session.queued_total when it finished, packet id, connection generation, packet size).
        self._held: deque[tuple[int, int, int, int]] = deque()
        self._drained: asyncio.Future[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def in_hand(self) -> tuple[int, int]:
        """Messages taken from the broker and not yet acknowledged, and their bytes."""
        return self._in_hand, self._bytes_in_hand

    @property
    def address(self) -> str:
        """host:port of the broker."""
        return f"{self._host}:{self._port}"

    # -- connecting ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and subscribe; raise (OSError, MqttError, TimeoutError) if the broker cannot be reached."""
        try:
            await self._connect()
        except BaseException:
            self._accepting = False  # no reconnecting behind the caller's back: start() failed
            if self._reconnecting is not None:
                self._reconnecting.cancel()
            await self._session.disconnect()
            raise

    async def _connect(self) -> None:
        # Subscribe on every connect, first of all: cheap, and it restores the subscription at once if the broker
        # lost the session (a broker restarted before it saved it takes edges' messages and drops them meanwhile).
        await self._session.connect(self._host, self._port, self._tls, topics=self._topics)
        codes = await self._session.subscribed()
        refused = [
            f"{topic}: {reason_text(code)}" for topic, code in zip(self._topics, codes, strict=False) if code >= 0x80
        ]
        if refused:
            raise MqttError("the broker refused the subscription to " + "; ".join(refused))
        if self._status_topic:
            self._session.publish_retained(self._status_topic, _status("online"))
        logger.info(
            "connected to {}://{}:{}; subscribed to {}",
            self._url.scheme,
            self._host,
            self._port,
            ", ".join(self._topics),
        )

    def _on_lost(self, exc: Exception | None) -> None:
        # What was not taken comes again on the next connection; what is held cannot be acknowledged now.
        self._waiting.clear()
        while self._held:
            self._release(self._held.popleft()[3])
        if self._accepting and (self._reconnecting is None or self._reconnecting.done()):
            logger.warning("disconnected from the broker ({}); reconnecting", exc or "closed by the broker")
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(), name="hubd-mqtt-reconnect")

    async def _reconnect(self) -> None:
        """Try again at once, then with a capped, jittered exponential backoff until connected (or stopped).

        At once, because a broker that came back (the embedded one is started again within a tenth of a
        second) without hubd's session takes the edges' messages meanwhile and, with no subscriber, drops them:
        every moment before ``_connect`` subscribes again is data lost.
        """
        wait, longest = _RECONNECT_S
        first = True
        while self._accepting:
            if not first:
                await asyncio.sleep(wait * random.uniform(0.5, 1.0))
                wait = min(wait * 2, longest)
            first = False
            try:
                await self._connect()
                return
            except MqttError as exc:  # refused: worth saying each time, it will not pass by itself
                logger.error("reconnecting to the broker failed: {}", exc)
                await self._session.disconnect()
            except (OSError, TimeoutError) as exc:  # not there yet: said once, when the connection was lost
                logger.debug("reconnecting to the broker failed: {}", exc)
                await self._session.disconnect()

    # -- inbound -------------------------------------------------------------------------------------------

    def _on_publish(self, first: int, body: bytes) -> None:
        if not self._accepting:
            return  # stopping: never acknowledged, so the broker delivers it again
        if not self._waiting and self._has_room(len(body)):
            self._take(first, body)
        else:
            self._waiting.append((first, body))

    def _has_room(self, size: int) -> bool:
        """Room for a message of ``size`` bytes: nothing in hand, or under both limits. One larger than the byte
        limit waits until nothing else is in hand, then goes through alone, so it is never stuck."""
        if self._in_hand == 0:
            return True
        return self._in_hand < self._limit and self._bytes_in_hand < self._byte_limit and size <= self._byte_limit

    def _take(self, first: int, body: bytes) -> None:
        try:
            topic, payload, _, packet_id, properties = parse_publish(first, body)
        except MalformedPacket as exc:
            logger.error("a malformed PUBLISH from the broker ({}); not acknowledged", exc)
            return
        self._in_hand += 1
        self._bytes_in_hand += len(body)
        done = partial(self._finished, packet_id, self._session.generation, len(body))
        try:
            self._handler(topic, payload, properties, done)
        except Exception:
            logger.exception("message on {} failed; not acknowledged, the broker will deliver it again", topic)
            done(False)

    def _finished(self, packet_id: int, generation: int, size: int, handled: bool) -> None:
        """One message done with: its PUBACK (if handled), or none so that the broker delivers it again."""
        session = self._session
        if not handled or packet_id == 0 or generation != session.generation:
            self._release(size)  # failed, QoS 0, or it came on a connection since lost: the broker sends it again
        elif session.sent_total >= session.queued_total:
            session.ack(packet_id)
            self._release(size)
        else:
            # Its answer may still wait for a packet id: acknowledge only once that answer is on its way.
            self._held.append((session.queued_total, packet_id, generation, size))

    def _release_held(self) -> None:
        """Answers went out from the queue: acknowledge the messages that waited for them."""
        held = self._held
        session = self._session
        while held and held[0][0] <= session.sent_total:
            _, packet_id, generation, size = held.popleft()
            if generation == session.generation:
                session.ack(packet_id)
            self._release(size)

    def _release(self, size: int) -> None:
        """One message out of hand: take the next waiting ones while there is room."""
        self._in_hand -= 1
        self._bytes_in_hand -= size
        waiting = self._waiting
        while waiting and self._has_room(len(waiting[0][1])):
            self._take(*waiting.popleft())
        if self._in_hand == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- outbound ------------------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        body: dict[str, Any],
        correlation_data: bytes | None = None,
        verdict: Callable[[int], None] | None = None,
    ) -> int:
        """Publish an answer (QoS 1), in order, waiting in the session's queue for a packet id; return its size.

        Raises ``AnswerTooLarge``, sending nothing, for an answer larger than the broker takes (the Maximum
        Packet Size of its CONNACK): a broker disconnects a client that sends one, and the request it answers
        would come again and again. ``verdict``: called with the reason code of the broker's PUBACK."""
        payload = orjson.dumps(body)
        properties = publish_properties("application/json", correlation_data=correlation_data)
        # At most: fixed header 5, topic 2 + 4 bytes a character, packet id 2, properties, payload.
        largest = 9 + 4 * len(topic) + len(properties) + len(payload)
        limit = self._session.server_maximum_packet
        if largest > limit and 9 + len(topic.encode()) + len(properties) + len(payload) > limit:
            raise AnswerTooLarge(len(payload), limit)
        self._session.publish(topic, payload, properties, verdict)
        return len(payload)

    # -- stopping ------------------------------------------------------------------------------------------

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking messages, let those in hand finish (commit, answer, PUBACK), then disconnect."""
        self._accepting = False
        self._waiting.clear()
        if self._reconnecting is not None and not self._reconnecting.done():
            self._reconnecting.cancel()
        if self._in_hand:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._drained, timeout_s)
            except TimeoutError:
                logger.warning(
                    "{} messages still in hand after {} s; the broker will deliver them again", self._in_hand, timeout_s
                )
        if self._status_topic and self._session.connected:
            self._session.publish_retained(self._status_topic, _status("offline"))
        await self._session.disconnect()


def _status(state: str) -> bytes:
    return orjson.dumps({"status": state, "at": format_time(now_ms())})


def tls_context(config: BrokerConfig) -> ssl.SSLContext:
    """TLS to the broker: the system's CA store, or ``broker.tls.ca_file``; a client certificate if given."""
    tls = config.tls
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context
